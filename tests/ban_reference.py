"""The Ban and Ban&Pick routing as the core computed it before the per-call fast path (commit f96d674): a
frozen, straightforward copy of ban / ban_keep / ban_k / ratio_of / keep_prefix / route_probs and the
engines' fit_slots, kept as the slow reference the fast path must match bit for bit. Test-only; the
helpers it imports from the core (probs, choice_scores, force, the checks) were not changed by it."""

from __future__ import annotations

import math

import torch

from banpick_cli.routing.pick import check_positive, force
from banpick_cli.routing.spec import Routing
from banpick_cli.routing.topk import check_mask, choice_scores, probs, to_mask


def route_probs(p, spec, k, dtype):
    choice = choice_scores(p, spec)
    if spec.topk_method != "noaux_tc":
        values, indices = torch.topk(choice, k, dim=-1)
        indices = torch.where(torch.isfinite(values), indices, spec.num_experts)
        return _routing(p, spec, indices, dtype)
    values, indices = torch.topk(choice, k, dim=-1, sorted=False)
    indices = torch.where(torch.isfinite(values), indices, spec.num_experts)
    routing = _routing(p, spec, indices, dtype)
    order = torch.argsort(values, dim=-1, descending=True, stable=True)
    return Routing(routing.indices.gather(1, order), routing.weights.gather(1, order), routing.k)


def keep_prefix(p, spec, k_per_token, indices, dtype):
    slots = torch.arange(indices.shape[1], device=indices.device)
    kept = torch.where(slots < k_per_token.to(indices.device).unsqueeze(-1), indices, spec.num_experts)
    return _routing(p, spec, kept, dtype)


def _routing(p, spec, indices, dtype):
    weights = _weights(p, spec, indices, dtype)
    return Routing(indices=indices, weights=weights, k=(indices < spec.num_experts).sum(dim=-1))


def _weights(p, spec, indices, dtype):
    real = indices < spec.num_experts
    w = p.gather(1, indices.clamp(max=spec.num_experts - 1)).masked_fill(~real, 0.0)
    if spec.renormalize:
        denom = w.sum(dim=-1, keepdim=True)
        if spec.scoring == "sigmoid":
            denom = denom + 1e-20
        w = torch.where(denom > 0, w / denom, w)
    w = w * spec.routed_scaling_factor
    return w.to(dtype) if spec.weights_in_logits_dtype else w


def ratio_of(p, indices, k_num):
    real = indices < p.shape[1]
    w = p.gather(1, indices.clamp(max=p.shape[1] - 1)) * real
    total = w.sum(-1)
    return torch.where(total > 0, w[:, :k_num].sum(-1) / total, torch.ones_like(total))


def ban_k(ratio, layer_sensitivity, r_min, r_max, k_base, k_min=3, lam=0.7, beta=0.5, clip=True):
    layer_sensitivity = float(layer_sensitivity)
    r_min, r_max = float(r_min), float(r_max)
    assert 0.0 <= layer_sensitivity <= 1.0 and math.isfinite(r_min) and math.isfinite(r_max) and r_min <= r_max
    r = ratio.double()
    if r_max > r_min:
        t = (r_max - r) / (r_max - r_min)
        t = t.clamp(0.0, 1.0) if clip else t
    else:
        t = torch.zeros_like(r)
    s = beta * layer_sensitivity + (1.0 - beta) * t
    k = torch.floor(k_min + (k_base - k_min) * lam * s)
    return k.clamp(k_min, k_base).long()


def ban_keep(logits, spec, layer_sensitivity, r_min, r_max, *, k_min, lam, beta, clip, ratio_k_num):
    k_base = spec.top_k
    k_num = k_min if ratio_k_num is None else ratio_k_num
    p = probs(logits, spec)
    base = route_probs(p, spec, k_base, logits.dtype)
    k = ban_k(ratio_of(p, base.indices, k_num), layer_sensitivity, r_min, r_max, k_base, k_min=k_min, lam=lam,
              beta=beta, clip=clip)
    return p, base, k, keep_prefix(p, spec, k, base.indices, logits.dtype)


def ban(logits, spec, layer_sensitivity, r_min, r_max, *, k_min=3, lam=0.7, beta=0.5, clip=True, ratio_k_num=None,
        reweight="model"):
    p, base, k, kept = ban_keep(logits, spec, layer_sensitivity, r_min, r_max, k_min=k_min, lam=lam, beta=beta,
                                clip=clip, ratio_k_num=ratio_k_num)
    if reweight == "model":
        return kept
    return Routing(kept.indices, base.weights.masked_fill(kept.indices == spec.num_experts, 0.0), kept.k)


def ban_pick(logits, spec, key_experts, layer_sensitivity, r_min, r_max, *, k_min=3, lam=0.7, beta=0.5, clip=True,
             ratio_k_num=None, range_factor=2.0, range_base="kept"):
    key = check_mask(key_experts, spec.num_experts, "key_experts")
    check_positive(range_factor, "range_factor")
    p, _, k, kept = ban_keep(logits, spec, layer_sensitivity, r_min, r_max, k_min=k_min, lam=lam, beta=beta, clip=clip,
                             ratio_k_num=ratio_k_num)
    n_key = int(key.sum())
    if n_key == 0:
        return kept
    reach = k if range_base == "kept" else torch.full_like(k, spec.top_k)
    limit = range_factor * reach.double()
    return force(p, choice_scores(p, spec), spec, to_mask(kept.indices, spec.num_experts), key, limit,
                 replace=False, evict="non_key", width=spec.top_k + n_key, dtype=logits.dtype)


def fit_slots(routing, logits, spec, slots, *, reweight=True):
    e = spec.num_experts
    indices, weights = routing.indices, routing.weights
    if routing.width > slots:
        indices, weights = indices[:, :slots], weights[:, :slots]
        if reweight:
            weights = _weights(probs(logits, spec), spec, indices, logits.dtype)
    elif routing.width < slots:
        pad = slots - routing.width
        indices = torch.nn.functional.pad(indices, (0, pad), value=e)
        weights = torch.nn.functional.pad(weights, (0, pad), value=0.0)
    real = indices < e
    first = torch.where(real[:, :1], indices[:, :1], 0)
    return weights.masked_fill(~real, 0.0).float(), torch.where(real, indices, first)
