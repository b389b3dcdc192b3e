"""Ban&Pick (paper section 6.1): Ban prunes each token to K_i experts, then Pick strategy C adds key experts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .ban import BETA, K_MIN, LAM, BanRule, ban_rule, check_ban_params
from .pick import check_positive, force
from .spec import RouterSpec, Routing
from .topk import check_mask, choice_scores, to_mask

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
    return ban_pick_rule(spec, key_experts, layer_sensitivity, r_min, r_max, k_min=k_min, lam=lam, beta=beta, clip=clip,
                         ratio_k_num=ratio_k_num, range_factor=range_factor, range_base=range_base)(logits)


def ban_pick_rule(
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
) -> Callable[[torch.Tensor], Routing]:
    """Returns one layer's Ban&Pick (`ban_pick` with these arguments) as a function of the logits, its knobs
    and key experts checked here, once. Raises ValueError (one line) for a bad knob."""
    check_ban_params(k_base=spec.top_k, k_min=k_min, lam=lam, beta=beta)
    key = check_mask(key_experts, spec.num_experts, "key_experts")
    check_positive(range_factor, "range_factor")
    if range_base not in RANGE_BASES:
        raise ValueError(f"range_base must be one of {RANGE_BASES}, got {range_base!r}")
    ban = ban_rule(spec, layer_sensitivity, r_min, r_max, k_min=k_min, lam=lam, beta=beta, clip=clip,
                   ratio_k_num=ratio_k_num)
    n_key = int(key.sum())
    return ban if n_key == 0 else BanPickRule(ban, key, n_key, range_factor, range_base)


@dataclass(frozen=True, eq=False)
class BanPickRule:
    """One layer's Ban&Pick with at least one key expert, built by `ban_pick_rule`."""

    ban: BanRule
    key: torch.Tensor  # bool [E]
    n_key: int
    range_factor: float
    range_base: str

    def __call__(self, logits: torch.Tensor) -> Routing:
        spec = self.ban.spec
        p, _, keep, kept = self.ban.keep(logits)
        k = keep.sum(-1)  # K_i: the kept slots are each token's first K_i
        reach = k if self.range_base == "kept" else torch.full_like(k, spec.top_k)
        limit = self.range_factor * reach.double()
        return force(p, choice_scores(p, spec), spec, to_mask(kept.indices, spec.num_experts), self.key, limit,
                     replace=False, evict="non_key", width=spec.top_k + self.n_key, dtype=logits.dtype)
