"""The model's own routing rule: scores, choice, top-k, weights; and keeping a per-token prefix of it."""

from __future__ import annotations

import functools
import math

import torch

from .spec import RouterSpec, Routing, scalar

# Experts outside the router's groups have choice score -inf; where an order among them is still
# needed (a forced key expert), they rank below every allowed expert and by probability among
# themselves. 1e6 is far below any real score and leaves float64 ample precision for p in [0, 1].
_OUTSIDE = 1e6


def probs(logits: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """Returns the router's scores [T, E] in float32: softmax over all experts, or sigmoid."""
    _check_logits(logits, spec)
    # softmax(dtype=float32) casts first, as .float().softmax() does, in one call
    return logits.softmax(dim=-1, dtype=torch.float32) if spec.scoring == "softmax" else logits.float().sigmoid()


def select_scores(logits: torch.Tensor, spec: RouterSpec, banned: torch.Tensor | None = None) -> torch.Tensor:
    """Returns the scores [T, E] the router chooses by: biased, with banned and out-of-group experts at -inf."""
    return choice_scores(probs(logits, spec), spec, banned)


def route(
    logits: torch.Tensor, spec: RouterSpec, k: int | None = None, banned: torch.Tensor | None = None
) -> Routing:
    """Returns the model's own routing, optionally with another k and with `banned` experts removed.

    A banned expert (bool [E]) is removed before group selection and top-k, as if the model did not
    have it, so the next expert fills its slot and K stays (how kl-scan prunes one expert). A slot
    that cannot be filled (k larger than the experts left) holds "no expert".
    """
    return route_probs(probs(logits, spec), spec, check_k(k, spec), logits.dtype, banned=banned)


def weights_for(logits: torch.Tensor, spec: RouterSpec, indices: torch.Tensor) -> torch.Tensor:
    """Returns the weights [T, W] the model's rule gives the expert set `indices` (sentinels get 0).

    The rule: gather the expert's own score, renormalise over the set if the model does, multiply by
    routed_scaling_factor, cast as the model does.
    """
    p = probs(logits, spec)
    check_indices(indices, p)
    return _weights(p, spec, indices, logits.dtype)


def keep_top(
    logits: torch.Tensor, spec: RouterSpec, k_per_token: torch.Tensor, base: Routing | None = None
) -> Routing:
    """Returns `base` (default: the model's routing) keeping each token's k_i most preferred experts.

    The rest of the slots become "no expert" and the weights follow the model's rule over what is
    kept. Preference is the router's choice score, which is the probability on softmax routers.
    """
    p = probs(logits, spec)
    indices = route_probs(p, spec, spec.top_k, logits.dtype).indices if base is None else base.indices
    check_indices(indices, p)
    return keep_top_probs(p, spec, check_counts(k_per_token, p.shape[0], "k_per_token"), indices, logits.dtype)


# --- shared by the strategy modules (not exported from the package) ---------------------------


def check_k(k: int | None, spec: RouterSpec) -> int:
    """Returns k (default spec.top_k), or raises ValueError if the router cannot choose that many."""
    k = spec.top_k if k is None else k
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= spec.available():
        raise ValueError(f"k must be an integer in [1, {spec.available()}] for this router, got {k!r}")
    return k


def route_probs(
    p: torch.Tensor,
    spec: RouterSpec,
    k: int,
    dtype: torch.dtype,
    banned: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
) -> Routing:
    """Returns the top-k routing of scores p [T, E] (float32), choosing by p plus biases."""
    indices, order = _top(p, spec, k, banned, extra)
    routing = _routing(p, spec, indices, dtype)
    if order is None:
        return routing
    return Routing(routing.indices.gather(1, order), routing.weights.gather(1, order), routing.k)


def top_indices(p: torch.Tensor, spec: RouterSpec, k: int) -> torch.Tensor:
    """Returns `route_probs(p, spec, k, ...).indices` [T, k] (preference order) without the weights."""
    indices, order = _top(p, spec, k)
    return indices if order is None else indices.gather(1, order)


def _top(
    p: torch.Tensor, spec: RouterSpec, k: int, banned: torch.Tensor | None = None, extra: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    # Returns the top-k experts [T, k], a slot whose choice score is not finite holding "no expert"; and, for
    # noaux_tc, the order [T, k] that sorts them. DeepSeek-V3 takes top-k unsorted and renormalises in that
    # order: the weights are computed in it, then sorted, so that they match it bit for bit.
    choice = choice_scores(p, spec, banned, extra)
    ordered = spec.topk_method != "noaux_tc"
    values, indices = torch.topk(choice, k, dim=-1, sorted=ordered)  # sorted: preference order
    device = p.device
    # isfinite, in two ops not five
    indices = torch.where(values.abs() < scalar(math.inf, device), indices, scalar(spec.num_experts, device))
    return indices, None if ordered else torch.argsort(values, dim=-1, descending=True, stable=True)


def keep_top_probs(
    p: torch.Tensor, spec: RouterSpec, k_per_token: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> Routing:
    """Returns the routing of `indices` [T, W] cut to each token's k_i most preferred experts."""
    pref = preference(choice_scores(p, spec), p)
    keep = top_in(to_mask(indices, spec.num_experts), pref, k_per_token)
    return from_mask(keep, pref, p, spec, indices.shape[1], dtype)


def keep_prefix(
    p: torch.Tensor, spec: RouterSpec, k_per_token: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> Routing:
    """Returns the routing of `indices` [T, W] (in the router's order of preference, as `route_probs`
    gives them) cut to each token's first k_i slots, weights by the model's rule over those.

    The same experts as `keep_top_probs` on such indices, without re-ranking every expert: what the
    per-token rules (Ban, DES, dynamic) run on every router call.
    """
    keep = slot_numbers(indices.shape[1], indices.device) < k_per_token.to(indices.device).unsqueeze(-1)
    return keep_slots(p, spec, keep, indices, dtype)


def keep_slots(
    p: torch.Tensor,
    spec: RouterSpec,
    keep: torch.Tensor,
    indices: torch.Tensor,
    dtype: torch.dtype,
    scores: torch.Tensor | None = None,
) -> Routing:
    """Returns the routing of `indices` [T, W] keeping the slots where `keep` (bool [T, W]) holds, weights by
    the model's rule over those. `scores`: `gather_scores(p, indices)`, when the caller has it already."""
    kept = torch.where(keep, indices, scalar(spec.num_experts, indices.device))
    return _routing(p, spec, kept, dtype, gather_scores(p, indices) if scores is None else scores)


def gather_scores(p: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Returns p [T, E] at `indices` [T, W]; a "no expert" slot reads the last expert's score (mask it)."""
    return p.gather(1, indices.clamp(max=scalar(p.shape[1] - 1, indices.device)))


@functools.lru_cache(maxsize=64)
def _cpu_slots(width: int) -> torch.Tensor:
    return torch.arange(width)


def slot_numbers(width: int, device: torch.device) -> torch.Tensor:
    """Returns 0..width-1 [width] on `device`."""
    # Made once on the CPU (an op per call is a good part of a 1-token call's cost); made per
    # call elsewhere, where a tensor kept across calls could come from a CUDA graph's private pool.
    return _cpu_slots(width) if device.type == "cpu" else torch.arange(width, device=device)


def _check_logits(logits: torch.Tensor, spec: RouterSpec) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] != spec.num_experts:
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a tensor [tokens, {spec.num_experts}], got {shape}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")


def check_indices(indices: torch.Tensor, p: torch.Tensor) -> None:
    if indices.dim() != 2 or indices.shape[0] != p.shape[0] or indices.dtype != torch.long:
        raise ValueError(f"indices must be a long tensor [{p.shape[0]}, W], got {list(indices.shape)} {indices.dtype}")


def check_counts(counts: torch.Tensor | int, tokens: int, name: str) -> torch.Tensor:
    counts = torch.as_tensor(counts, dtype=torch.long)
    if counts.dim() == 0:
        counts = counts.expand(tokens)
    if counts.shape != (tokens,):
        raise ValueError(f"{name} must be a long tensor [{tokens}], got shape {list(counts.shape)}")
    return counts


def check_mask(mask: torch.Tensor | None, size: int, name: str) -> torch.Tensor | None:
    """Returns `mask` as a bool tensor [size], or raises ValueError naming it."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (size,):
        got = f"{list(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor [{size}], got {got}")
    return mask


def choice_scores(
    p: torch.Tensor, spec: RouterSpec, banned: torch.Tensor | None = None, extra: torch.Tensor | None = None
) -> torch.Tensor:
    """Returns the choice scores [T, E]: p (+ correction bias, + extra), banned and out-of-group at -inf."""
    banned = check_mask(banned, spec.num_experts, "banned")
    scores = p if spec.correction_bias is None else p + spec.correction_bias.to(p.device)
    if extra is not None:
        scores = scores + extra
    if banned is not None:
        scores = scores.masked_fill(banned.to(p.device), float("-inf"))
    if spec.topk_method == "greedy" or spec.n_group == 1:
        return scores
    grouped = scores.view(-1, spec.n_group, spec.group_size)
    if spec.topk_method == "group_limited_greedy":  # DeepSeek-V2: a group scores its best expert
        group_scores = grouped.max(dim=-1).values
    else:  # noaux_tc, DeepSeek-V3: a group scores the sum of its best two
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    expert_mask = group_mask.unsqueeze(-1).expand(-1, -1, spec.group_size).reshape(-1, spec.num_experts)
    # DeepSeek-V2 fills 0.0 here, V3 -inf; softmax scores are > 0, so both choose the same experts.
    return scores.masked_fill(~expert_mask, float("-inf"))


def preference(choice: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Returns a float64 order key [T, E]: the choice score, and below it by p where choice is -inf."""
    return torch.where(torch.isfinite(choice), choice.double(), p.double() - _OUTSIDE)


def to_mask(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Returns bool [T, E]: which experts `indices` [T, W] selects (sentinel slots ignored)."""
    mask = torch.zeros(indices.shape[0], num_experts + 1, dtype=torch.bool, device=indices.device)
    return mask.scatter_(1, indices, True)[:, :num_experts]


def top_in(mask: torch.Tensor, key: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Returns bool [T, E]: within `mask`, the n_i experts with the highest `key` per token."""
    ranked = torch.where(mask, key, float("-inf"))
    order = torch.argsort(ranked, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(mask.shape[1], device=mask.device).expand_as(order))
    return mask & (ranks < n.to(mask.device).unsqueeze(-1))


def rank_of(key: torch.Tensor) -> torch.Tensor:
    """Returns long [T, E]: each expert's 1-based rank under `key`, highest first."""
    order = torch.argsort(key, dim=-1, descending=True, stable=True)
    ranks = torch.arange(1, key.shape[1] + 1, device=key.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ranks)


def from_mask(
    mask: torch.Tensor, pref: torch.Tensor, p: torch.Tensor, spec: RouterSpec, width: int, dtype: torch.dtype
) -> Routing:
    """Returns the Routing [T, width] of the expert set `mask` [T, E], in order of `pref`."""
    values, indices = torch.topk(torch.where(mask, pref, float("-inf")), min(width, spec.num_experts), dim=-1)
    indices = torch.where(values > float("-inf"), indices, spec.num_experts)
    if width > spec.num_experts:  # the promised width, even where it exceeds the experts there are
        indices = torch.nn.functional.pad(indices, (0, width - spec.num_experts), value=spec.num_experts)
    return _routing(p, spec, indices, dtype)


def _routing(
    p: torch.Tensor, spec: RouterSpec, indices: torch.Tensor, dtype: torch.dtype, scores: torch.Tensor | None = None
) -> Routing:
    # `scores`: p gathered where `indices` has a real expert (any value elsewhere), when the caller has it.
    real = indices < scalar(spec.num_experts, indices.device)
    w = torch.where(real, gather_scores(p, indices) if scores is None else scores, scalar(0.0, p.device))  # [T, W]
    return Routing(indices=indices, weights=_rule_weights(w, spec, dtype), k=real.sum(dim=-1))


def _weights(p: torch.Tensor, spec: RouterSpec, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _rule_weights(torch.where(indices < spec.num_experts, gather_scores(p, indices), 0.0), spec, dtype)


def _rule_weights(w: torch.Tensor, spec: RouterSpec, dtype: torch.dtype) -> torch.Tensor:
    # The model's weights from the experts' own scores w [T, W] (0 at "no expert" slots).
    if spec.renormalize:
        denom = w.sum(dim=-1, keepdim=True)
        if spec.scoring == "sigmoid":
            denom = denom + 1e-20  # DeepSeek-V3's guard, kept for bit-exactness
        w = torch.where(denom > scalar(0.0, w.device), w / denom, w)  # a token with no expert keeps weight 0, not NaN
    if spec.routed_scaling_factor != 1:  # w * 1.0 is w, bit for bit: skip the op
        w = w * spec.routed_scaling_factor
    return w.to(dtype) if spec.weights_in_logits_dtype else w
