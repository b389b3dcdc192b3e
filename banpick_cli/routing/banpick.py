"""Ban&Pick (paper section 6.1): Ban prunes each token to K_i experts, then Pick strategy C adds key experts."""

from __future__ import annotations

import torch

from .ban import BETA, K_MIN, LAM, ban_k, check_ban_params, ratio_of
from .pick import check_positive, force
from .spec import RouterSpec, Routing
from .topk import check_mask, choice_scores, keep_prefix, probs, route_probs, to_mask

RANGE_BASES = ("kept", "base")  # reading 20: top-2*K_i, or top-2*K_base


def ban_pick(
    logits: torch.Tensor,
    spec: RouterSpec,
    key_experts: torch.Tensor,
    layer_sensitivity: float,
    r_min: float,
    r_max: float,
    *,
    k_min: int = K_MIN,
    lam: float = LAM,
    beta: float = BETA,
    clip: bool = True,
    ratio_k_num: int | None = None,
    range_factor: float = 2.0,
    range_base: str = "kept",
) -> Routing:
    """Returns Ban's routing with each missing key expert added when it ranks within the range.

    Reading 19: K_i comes from the unmodified routing, the top-K_i are kept, then strategy C adds
    every key expert (bool [E]) that is not kept, Ban-pruned ones included, whose 1-based rank under
    the router's unmodified choice scores is <= range_factor * K_i (range_base="kept", reading 20)
    or <= range_factor * K_base (range_base="base"). Weights: the model's rule over kept + added.
    Width K_base + |key|; `Routing.k` counts the experts each token runs. No key expert: Ban alone.
    """
    k_base = spec.top_k
    check_ban_params(k_base=k_base, k_min=k_min, lam=lam, beta=beta)
    key = check_mask(key_experts, spec.num_experts, "key_experts")
    check_positive(range_factor, "range_factor")
    if range_base not in RANGE_BASES:
        raise ValueError(f"range_base must be one of {RANGE_BASES}, got {range_base!r}")
    k_num = k_min if ratio_k_num is None else ratio_k_num
    if not isinstance(k_num, int) or not 1 <= k_num <= k_base:
        raise ValueError(f"ratio_k_num must be an integer in [1, k_base={k_base}], got {k_num!r}")
    p = probs(logits, spec)
    top = route_probs(p, spec, k_base, logits.dtype).indices  # [T, K_base], preference order
    k = ban_k(ratio_of(p, top, k_num), layer_sensitivity, r_min, r_max, k_base, k_min=k_min, lam=lam, beta=beta,
              clip=clip)
    n_key = int(key.sum())
    kept = keep_prefix(p, spec, k, top, logits.dtype)
    if n_key == 0:
        return kept
    reach = k if range_base == "kept" else torch.full_like(k, k_base)
    limit = range_factor * reach.double()
    return force(p, choice_scores(p, spec), spec, to_mask(kept.indices, spec.num_experts), key, limit,
                 replace=False, evict="non_key", width=k_base + n_key, dtype=logits.dtype)
