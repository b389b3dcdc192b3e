"""What the scan tests share: calibration text, sharpened tiny models (fixtures live in conftest.py)."""

from __future__ import annotations

import torch

from banpick_cli.models.loading import load_model

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "12 + 35 = 47",
    "def add(x, y): return x + y",
    "lazy dog and 12 quick foxes",
    "x + y = 47",
]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Returns True when two tensors are equal, NaN where the other is NaN."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def sharpened(path) -> "LoadedModel":  # noqa: F821
    """Loads a tiny model with a peaked output and strong experts, so KLs are far from zero.

    Random tiny models predict near-uniform distributions, where every KL is ~1e-7 and a wrong
    routing would hide in the noise; scaling the LM head and the experts makes pruning visible.
    """
    loaded = load_model(str(path), device="cpu")
    with torch.no_grad():
        loaded.model.get_output_embeddings().weight.mul_(40.0)
        for layer in loaded.layers:
            for name, param in layer.block.experts.named_parameters():
                if "down" in name:
                    param.mul_(30.0)
    return loaded
