"""Pick (paper section 4.3): strategies A-E that reinforce a layer's key experts."""

from __future__ import annotations

import math

import torch

from .spec import RouterSpec, Routing
from .topk import (
    check_k,
    check_mask,
    choice_scores,
    from_mask,
    preference,
    probs,
    rank_of,
    route,
    route_probs,
    to_mask,
    top_in,
)

STRATEGIES = ("A", "B", "C", "D", "E")
EVICTIONS = ("non_key", "weakest")  # reading 15, and its literal alternative
BIAS_REFERENCES = ("weights", "probs", "logits")  # reading 17, and two alternatives
BIAS_TARGETS = ("logits", "scores")


def pick(
    logits: torch.Tensor,
    spec: RouterSpec,
    key_experts: torch.Tensor,
    strategy: str = "C",
    *,
    k: int | None = None,
    range_factor: float = 2.0,
    evict: str = "non_key",
    bias_fraction: float = 0.2,
    bias: float | None = None,
    bias_reference: str = "weights",
    bias_target: str | None = None,
) -> Routing:
    """Returns the routing with the layer's key experts (bool [E]) reinforced by strategy A-E.

    A forced addition, B forced replacement, C range-based addition, D range-based replacement
    (range: 1-based rank <= range_factor * k under the router's unmodified choice scores), E logit
    bias. Width: k + |key| for A and C, k for B, D and E. No key expert: exactly `route(logits, spec, k)`.
    See docs/routing.md for the readings and the options `evict`, `bias_*`.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    key = check_mask(key_experts, spec.num_experts, "key_experts")
    k = check_k(k, spec)
    check_positive(range_factor, "range_factor")
    if evict not in EVICTIONS:
        raise ValueError(f"evict must be one of {EVICTIONS}, got {evict!r}")
    n_key = int(key.sum())
    if n_key == 0:
        return route(logits, spec, k)
    if strategy == "E":
        return _logit_bias(logits, spec, key, k, bias_fraction, bias, bias_reference, bias_target)
    p = probs(logits, spec)
    choice = choice_scores(p, spec)
    base = route_probs(p, spec, k, logits.dtype)
    limit = None if strategy in "AB" else torch.full((p.shape[0],), range_factor * k, dtype=torch.float64)
    replace = strategy in "BD"
    return force(p, choice, spec, to_mask(base.indices, spec.num_experts), key, limit,
                 replace=replace, evict=evict, width=k if replace else k + n_key, dtype=logits.dtype)


def force(
    p: torch.Tensor,
    choice: torch.Tensor,
    spec: RouterSpec,
    selected: torch.Tensor,
    key: torch.Tensor,
    limit: torch.Tensor | None,
    *,
    replace: bool,
    evict: str,
    width: int,
    dtype: torch.dtype,
) -> Routing:
    """Returns `selected` (bool [T, E]) with the missing key experts forced in (added or replacing).

    `limit` (float [T] or None): a key expert enters only if its 1-based rank under the choice
    scores is <= limit and it is one the router could choose (inside its groups).
    """
    pref = preference(choice, p)  # [T, E]
    missing = key.to(p.device) & ~selected
    if limit is not None:
        in_range = rank_of(pref).double() <= limit.to(p.device).unsqueeze(-1)
        missing = missing & in_range & torch.isfinite(choice)
    if not replace:
        final = selected | missing
    elif evict == "non_key":
        # Reading 15: each missing key expert evicts the weakest selected non-key expert; if there
        # are more missing key experts than such slots, the most preferred enter.
        evictable = selected & ~key.to(p.device)
        n = torch.minimum(missing.sum(-1), evictable.sum(-1))
        final = (selected & ~top_in(evictable, -pref, n)) | top_in(missing, pref, n)
    else:
        final = _evict_weakest(selected, missing, pref)
    return from_mask(final, pref, p, spec, width, dtype)


def _evict_weakest(selected: torch.Tensor, missing: torch.Tensor, pref: torch.Tensor) -> torch.Tensor:
    # Literal reading: missing key experts enter one at a time, most preferred first, each evicting
    # whatever selected expert is weakest now (a key expert forced in a step earlier included).
    final, left = selected.clone(), missing.clone()
    one = torch.ones(selected.shape[0], dtype=torch.long, device=selected.device)
    for _ in range(int(missing.sum(-1).max()) if missing.numel() else 0):
        has = left.any(-1, keepdim=True)
        enter = top_in(left, pref, one) & has
        out = top_in(final, -pref, one) & has
        final = (final & ~out) | enter
        left = left & ~enter
    return final


def _logit_bias(
    logits: torch.Tensor,
    spec: RouterSpec,
    key: torch.Tensor,
    k: int,
    fraction: float,
    bias: float | None,
    reference: str,
    target: str | None,
) -> Routing:
    # Reading 17: bias = 0.2 * mean of the token's top-k weights as the model outputs them, added to
    # the key experts' logits; selection and weights then come from the biased softmax. A sigmoid
    # router's gate is per expert, so there the bias joins the choice scores (like DeepSeek-V3's
    # correction bias) and the weights stay the unbiased gates.
    if reference not in BIAS_REFERENCES:
        raise ValueError(f"bias_reference must be one of {BIAS_REFERENCES}, got {reference!r}")
    target = target or ("logits" if spec.scoring == "softmax" else "scores")
    if target not in BIAS_TARGETS:
        raise ValueError(f"bias_target must be one of {BIAS_TARGETS}, got {target!r}")
    x = logits.float()
    if bias is not None:
        check_positive(bias, "bias", allow_zero=True)
        size = torch.full((x.shape[0],), float(bias), device=x.device)
    else:
        check_positive(fraction, "bias_fraction", allow_zero=True)
        base = route(logits, spec, k)
        if reference == "weights":
            size = fraction * base.weights.float().mean(-1)
        else:
            source = probs(logits, spec) if reference == "probs" else x
            size = fraction * source.gather(1, base.indices).mean(-1)
    added = size.unsqueeze(-1) * key.to(x.device)  # [T, E]
    if target == "logits":
        return route_probs(probs(x + added, spec), spec, k, logits.dtype)
    return route_probs(probs(x, spec), spec, k, logits.dtype, extra=added)


def check_positive(value: float, name: str, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
