"""Stacked variants: several routing variants of one layer share one forward of the KL engine (passes/kl.py).

The replicas are stacked replica-major (rows of replica v are contiguous): each decoder layer's per-text
arguments are repeated once per replica, and the router override routes each replica's tokens by its
own variant.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from banpick_cli.passes.kl_math import RouteVariant


def per_replica(variants: Sequence[RouteVariant]):
    """Returns a route override for stacked replicas: replica v's tokens are routed by variants[v]."""

    def override(position, logits, weights, indices):
        parts = logits.split(logits.shape[0] // len(variants))
        routed = [variant(part) for variant, part in zip(variants, parts)]
        return torch.cat([w for w, _ in routed]), torch.cat([i for _, i in routed])

    return override


def select_rows(kwargs: dict[str, Any], rows: int, r0: int, r1: int, replicas: int) -> dict[str, Any]:
    """Returns a decoder layer's keyword arguments for texts r0..r1 repeated `replicas` times.

    Per-text tensors (the causal mask [B, 1, T, T]) have the batch as their first dimension; shared
    ones (rotary embeddings [1, T, d], position ids) have 1 and broadcast, and are left alone.
    """

    def pick(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and rows > 1 and x.shape[0] == rows:
            x = x[r0:r1]
            return x.repeat(replicas, *[1] * (x.dim() - 1)) if replicas > 1 else x
        if isinstance(x, tuple):
            return tuple(pick(y) for y in x)
        return x

    return {key: pick(value) for key, value in kwargs.items()}
