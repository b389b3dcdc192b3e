"""Fixed-K: every token runs the router's own top-k with a smaller k (the simplest rival of per-token pruning)."""

from __future__ import annotations

import torch

from .spec import RouterSpec, Routing
from .topk import probs, route_probs


def fixed_k(logits: torch.Tensor, spec: RouterSpec, k: int | None = None) -> Routing:
    """Returns the model's own routing with top-k instead of top-K_base: width k, `Routing.k` == k.

    Choice (groups, correction bias) and weights are the model's rule over the k kept experts (a
    renormalising router renormalises over k), so Fixed-K at K_base is the model itself. k defaults
    to K_base; it must be in [1, K_base] (a larger k would add experts, not prune them).
    """
    k = spec.top_k if k is None else k
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= spec.top_k:
        raise ValueError(f"k must be an integer in [1, K_base={spec.top_k}] for fixed-k, got {k!r}")
    return route_probs(probs(logits, spec), spec, k, logits.dtype)
