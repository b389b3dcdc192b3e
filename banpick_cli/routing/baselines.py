"""The paper's baselines (appendix E): dynamic routing (top-p), DES, ODP and RICE."""

from __future__ import annotations

import math

import torch

from .pick import check_positive
from .spec import RouterSpec, Routing
from .topk import check_k, check_mask, keep_prefix, probs, route, route_probs

DYNAMIC_OVER = ("all", "topk")  # reading 21, and its alternative


def dynamic_k(
    logits: torch.Tensor, spec: RouterSpec, tau: float, *, cap: int | None = None, over: str = "all"
) -> torch.Tensor:
    """Returns k [T] (long): the fewest most-preferred experts whose weights sum to >= tau.

    over="all": r is the probability over all experts (reading 21; on a sigmoid router the scores
    divided by their sum over all experts). over="topk": r is the renormalised top-K_base weight.
    With no cap, k may reach every expert the router can choose; cap (e.g. K_base) bounds it.
    """
    return _dynamic(logits, spec, tau, cap, over)[0]


def dynamic(
    logits: torch.Tensor, spec: RouterSpec, tau: float, *, cap: int | None = None, over: str = "all"
) -> Routing:
    """Returns dynamic (top-p) routing: each token runs its dynamic_k most preferred experts.

    Weights follow the model's rule over them. Width: cap, else K_base (over="topk"), else every
    expert the router can choose.
    """
    k, p, top = _dynamic(logits, spec, tau, cap, over)
    return keep_prefix(p, spec, k, top, logits.dtype)


def des_bounds(k_base: int) -> tuple[int, int]:
    """Returns (k_lo, k_hi): the paper's 4..6 for K_base 8, scaled to K_base/2..3*K_base/4, rounded half up.

    K_base 2 (Mixtral) gives 1..2, the original DES; 6 (DeepSeek-V2-Lite) gives 3..5.
    """
    if not isinstance(k_base, int) or k_base < 2:
        raise ValueError(f"DES needs k_base >= 2 to prune anything, got {k_base!r}")
    k_lo = math.floor(k_base / 2 + 0.5)
    k_hi = min(k_base, max(k_lo + 1, math.floor(3 * k_base / 4 + 0.5)))
    return k_lo, k_hi


def des_ratios(p: torch.Tensor, k_lo: int, k_hi: int) -> torch.Tensor:
    """Returns [T, k_hi - k_lo]: r(j) / r(j+1) for j = k_lo .. k_hi-1, r(j) the j-th largest score."""
    if not isinstance(k_lo, int) or not isinstance(k_hi, int) or not 1 <= k_lo < k_hi <= p.shape[-1]:
        raise ValueError(f"DES needs 1 <= k_lo < k_hi <= {p.shape[-1]}, got k_lo={k_lo!r}, k_hi={k_hi!r}")
    r = torch.topk(p.float(), k_hi, dim=-1).values  # [T, k_hi], descending
    return r[:, k_lo - 1 : k_hi - 1] / r[:, k_lo:k_hi]


def des_thresholds(probs_calib: torch.Tensor, k_lo: int, k_hi: int) -> torch.Tensor:
    """Returns the medians [k_hi - k_lo] (float32) of des_ratios over calibration tokens [N, E].

    A true median: with an even count, the mean of the two middle values (torch.median returns
    the lower one).
    """
    ratios = des_ratios(probs_calib, k_lo, k_hi).double()
    n = ratios.shape[0]
    if n == 0:
        raise ValueError("des_thresholds needs at least one calibration token")
    ordered = ratios.sort(dim=0).values
    median = ordered[(n - 1) // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return median.float()


def des(
    logits: torch.Tensor,
    spec: RouterSpec,
    thresholds: torch.Tensor,
    k_lo: int | None = None,
    k_hi: int | None = None,
    key_tokens: torch.Tensor | None = None,
) -> Routing:
    """Returns DES routing: top-k_lo if the first ratio exceeds its median, else top-(k_lo+1) if the
    second does, ..., else all top-k_hi (strict >, reading 22). Width k_hi.

    Defaults to des_bounds(spec.top_k). `key_tokens` (bool [T]) forces k_hi on those tokens (ODP).
    Ratios are on the sorted scores; the experts kept are the router's own most preferred.
    """
    if (k_lo is None) != (k_hi is None):
        raise ValueError("give both k_lo and k_hi, or neither")
    if k_lo is None:
        k_lo, k_hi = des_bounds(spec.top_k)
    k_hi = check_k(k_hi, spec)
    p = probs(logits, spec)
    ratios = des_ratios(p, k_lo, k_hi)  # [T, n]
    thresholds = torch.as_tensor(thresholds, dtype=torch.float32, device=p.device)
    if thresholds.shape != (k_hi - k_lo,):
        raise ValueError(f"thresholds must have shape [{k_hi - k_lo}] for k_lo={k_lo}, k_hi={k_hi}")
    exceed = torch.cat([ratios > thresholds, torch.ones_like(ratios[:, :1], dtype=torch.bool)], dim=-1)
    k = k_lo + exceed.int().argmax(dim=-1)  # the first ratio over its median, else k_hi
    key_tokens = check_mask(key_tokens, p.shape[0], "key_tokens")
    if key_tokens is not None:
        k = torch.where(key_tokens.to(k.device), k_hi, k)
    top = route_probs(p, spec, k_hi, logits.dtype).indices
    return keep_prefix(p, spec, k, top, logits.dtype)


def odp(
    logits: torch.Tensor,
    spec: RouterSpec,
    thresholds: torch.Tensor,
    key_tokens: torch.Tensor,
    k_lo: int | None = None,
    k_hi: int | None = None,
) -> Routing:
    """Returns ODP routing: DES, with the caller's key tokens (bool [T], reading 23) kept at k_hi."""
    if key_tokens is None:
        raise ValueError("odp needs key_tokens, a bool tensor [tokens]")
    return des(logits, spec, thresholds, k_lo, k_hi, key_tokens=key_tokens)


def rice(
    logits: torch.Tensor,
    spec: RouterSpec,
    cognitive_experts: torch.Tensor,
    factor: float,
    *,
    base: Routing | None = None,
    renormalize: bool = False,
) -> Routing:
    """Returns `base` (default: the model's routing) with cognitive experts' final weights times factor.

    Selection is unchanged and there is no second renormalisation (reading 24); renormalize=True
    rescales each token's weights back to their total before the boost.
    """
    check_positive(factor, "factor")
    cognitive = check_mask(cognitive_experts, spec.num_experts, "cognitive_experts")
    base = route(logits, spec) if base is None else base
    real = base.indices < spec.num_experts
    hit = cognitive.to(base.indices.device)[base.indices.clamp(max=spec.num_experts - 1)] & real
    before = base.weights.float()
    after = torch.where(hit, before * factor, before)
    if renormalize:
        total = after.sum(-1, keepdim=True)
        after = torch.where(total > 0, after * (before.sum(-1, keepdim=True) / total), after)
    return Routing(indices=base.indices, weights=after.to(base.weights.dtype), k=base.k)


def _dynamic(
    logits: torch.Tensor, spec: RouterSpec, tau: float, cap: int | None, over: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (k [T], p [T, E], the most preferred experts [T, width])."""
    if not isinstance(tau, (int, float)) or not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")
    if over not in DYNAMIC_OVER:
        raise ValueError(f"over must be one of {DYNAMIC_OVER}, got {over!r}")
    width = spec.available() if over == "all" else spec.top_k
    if cap is not None:
        width = min(width, check_k(cap, spec))
    p = probs(logits, spec)
    top = route_probs(p, spec, max(width, spec.top_k), logits.dtype).indices  # preference order
    r = p.gather(1, top)
    total = p.sum(-1, keepdim=True) if over == "all" else r[:, : spec.top_k].sum(-1, keepdim=True)
    below = torch.cumsum(r / total.clamp_min(1e-30), dim=-1) < tau
    k = (below[:, :width].sum(-1) + 1).clamp(max=width)
    return k, p, top[:, :width]
