"""The router fingerprint a profile is stamped with: one hash, whoever computes it (HF loading, engines,
a checkpoint read from disk)."""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch


def router_fingerprint(tensors: Iterable[tuple[int, str, torch.Tensor]]) -> str:
    """Returns "sha256:<hex>" over (decoder layer index, name, router tensor) in order, rounded to bfloat16.

    Rounding to bfloat16 first makes the hash the same whether the checkpoint is loaded in float32 or
    bfloat16, while any retrained or different router changes it.
    """
    digest = hashlib.sha256()
    for layer_index, name, tensor in tensors:
        values = tensor.detach().to(torch.bfloat16).cpu().contiguous()
        digest.update(f"{layer_index}.{name}:{tuple(values.shape)};".encode())
        digest.update(values.view(torch.int16).numpy().tobytes())
    return "sha256:" + digest.hexdigest()
