"""Shared fixtures of the scan tests: calibration text, sharpened tiny models, profiles to scan."""

from __future__ import annotations

import json

import pytest
import torch

from banpick_cli.calibrate.profile_stage import ProfileSettings, run_profile
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


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("scan-data") / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


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


@pytest.fixture(scope="session")
def profiled(tiny_models, data_file, tmp_path_factory):
    """Returns family -> a profile of the domain 'math' on the test texts (read-only: copy before use)."""
    root = tmp_path_factory.mktemp("scan-profiles")
    cache = {}

    def make(family: str):
        if family not in cache:
            out = root / f"{family}.safetensors"
            settings = ProfileSettings(domain="math", data=str(data_file), samples=len(TEXTS), seq_len=16, candidate_ratio=1.2)
            run_profile(settings, out=out, model=str(tiny_models[family]), device="cpu")
            cache[family] = out
        return cache[family]

    return make
