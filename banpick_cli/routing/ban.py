"""Ban (paper section 5, appendix C): per-token dynamic pruning from layer and token sensitivity."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .spec import RouterSpec, Routing, scalar
from .topk import check_k, gather_scores, keep_slots, probs, route_probs, slot_numbers, top_indices

REWEIGHTS = ("model", "keep")  # reading 9, and its alternative

# The paper's defaults (section 4.2): K_min = 3, lambda = 0.7, beta = 0.5. One home; everything reads these.
K_MIN, LAM, BETA = 3, 0.7, 0.5


def token_ratio(logits: torch.Tensor, spec: RouterSpec, k_num: int = 3, k_base: int | None = None) -> torch.Tensor:
    """Returns R [T] (float32): the weight of the top-k_num experts over that of the top-k_base.

    Top means the router's own top-k_base (the probabilities on softmax routers, reading 3), whose
    first k_num are the numerator; renormalising the top-k_base would not change the ratio.
    """
    k_base = check_k(k_base, spec)
    if not isinstance(k_num, int) or not 1 <= k_num <= k_base:
        raise ValueError(f"k_num must be an integer in [1, k_base={k_base}], got {k_num!r}")
    p = probs(logits, spec)
    return ratio_of(p, top_indices(p, spec, k_base), k_num)


def ratio_of(p: torch.Tensor, indices: torch.Tensor, k_num: int, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Returns R [T]: the scores p [T, E] (probabilities: >= 0 or NaN) of the first k_num slots of `indices` over
    those of all slots; 1 where they sum to 0 or NaN. `scores`: `gather_scores(p, indices)`, if the caller has it."""
    real = indices < scalar(p.shape[1], indices.device)
    w = (gather_scores(p, indices) if scores is None else scores) * real  # [T, W], preference order
    # NaN exactly where the total is 0 (then every score is) or NaN: one op for where(total > 0, ..., 1).
    return (w[:, :k_num].sum(-1) / w.sum(-1)).nan_to_num(nan=1.0)


def ban_k(
    ratio: torch.Tensor,
    layer_sensitivity: float,
    r_min: float,
    r_max: float,
    k_base: int,
    k_min: int = K_MIN,
    lam: float = LAM,
    beta: float = BETA,
    clip: bool = True,
) -> torch.Tensor:
    """Returns K [T] (long): floor(K_min + (K_base - K_min) * lam * S), clamped to [K_min, K_base].

    S = beta * L' + (1 - beta) * T', T' = (R_max - R) / (R_max - R_min) clipped to [0, 1] (reading 5;
    clip=False leaves it unclipped). R_max == R_min gives T' = 0: the calibration set saw one ratio,
    so token sensitivity carries no information and only the layer term counts. Computed in float64.
    """
    check_ban_params(k_base=k_base, k_min=k_min, lam=lam, beta=beta)
    layer_sensitivity, r_min, r_max = _check_layer(layer_sensitivity, r_min, r_max)
    r = ratio.double()
    if r_max > r_min:
        t = (r_max - r) / (r_max - r_min)
        t = t.clamp(0.0, 1.0) if clip else t
    else:
        t = torch.zeros_like(r)
    s = beta * layer_sensitivity + (1.0 - beta) * t
    k = torch.floor(k_min + (k_base - k_min) * lam * s)
    return k.clamp(k_min, k_base).long()


def ban(
    logits: torch.Tensor,
    spec: RouterSpec,
    layer_sensitivity: float,
    r_min: float,
    r_max: float,
    *,
    k_min: int = K_MIN,
    lam: float = LAM,
    beta: float = BETA,
    clip: bool = True,
    ratio_k_num: int | None = None,
    reweight: str = "model",
) -> Routing:
    """Returns the Ban routing: each token keeps its K_i most preferred of the model's top-K_base.

    K_base is spec.top_k; R's numerator is the top-k_min (reading 2) unless ratio_k_num says
    otherwise (3 for the paper's literal top-3). Weights follow the model's rule over the kept
    experts (reading 9); reweight="keep" keeps the top-K_base weights as they were (they then sum
    to less than before). `Routing.k` holds K_i; the width stays K_base. `ban_rule` with the same
    arguments is this function with its checks and per-layer constants taken once.
    """
    return ban_rule(spec, layer_sensitivity, r_min, r_max, k_min=k_min, lam=lam, beta=beta, clip=clip,
                    ratio_k_num=ratio_k_num, reweight=reweight)(logits)


def ban_rule(
    spec: RouterSpec,
    layer_sensitivity: float,
    r_min: float,
    r_max: float,
    *,
    k_min: int = K_MIN,
    lam: float = LAM,
    beta: float = BETA,
    clip: bool = True,
    ratio_k_num: int | None = None,
    reweight: str = "model",
) -> "BanRule":
    """Returns one layer's Ban (`ban` with these arguments) as a function of the logits, its knobs checked
    here, once: what a runtime calls per layer and step. Raises ValueError (one line) for a bad knob."""
    if reweight not in REWEIGHTS:
        raise ValueError(f"reweight must be one of {REWEIGHTS}, got {reweight!r}")
    k_base = spec.top_k
    check_ban_params(k_base=k_base, k_min=k_min, lam=lam, beta=beta)
    k_num = k_min if ratio_k_num is None else ratio_k_num
    if not isinstance(k_num, int) or not 1 <= k_num <= k_base:
        raise ValueError(f"ratio_k_num must be an integer in [1, k_base={k_base}], got {k_num!r}")
    layer = (*_check_layer(layer_sensitivity, r_min, r_max), k_base, k_min, float(lam), float(beta), bool(clip))
    return BanRule(spec, k_num, reweight, layer, _slot_bounds(*layer))


@dataclass(frozen=True, eq=False)
class BanRule:
    """One layer's Ban, built by `ban_rule`: call it on logits [T, E] for the Routing `ban` returns."""

    spec: RouterSpec
    k_num: int  # R's numerator: the top-k_num
    reweight: str
    layer: tuple  # ban_k's arguments after the ratio: (L', R_min, R_max, K_base, K_min, lam, beta, clip)
    # float32 [K_base]: slot s is kept for a token whose R <= slot_bounds[s] (+inf: always; NaN: never), see k_steps
    slot_bounds: torch.Tensor

    def __call__(self, logits: torch.Tensor) -> Routing:
        p, indices, keep, kept = self.keep(logits)
        if self.reweight == "model":
            return kept
        # The kept experts are a prefix of the base slots, so the old weights line up slot by slot.
        base = route_probs(p, self.spec, self.spec.top_k, logits.dtype)
        return Routing(kept.indices, base.weights.masked_fill(kept.indices == self.spec.num_experts, 0.0), kept.k)

    def keep(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Routing]:
        """Returns (probs [T, E], the model's top-K_base experts [T, K_base], which of those slots Ban keeps
        (bool [T, K_base], each token's first K_i), the kept Routing): Ban's keep-set, shared with Ban&Pick."""
        spec = self.spec
        p = probs(logits, spec)
        indices = top_indices(p, spec, spec.top_k)  # [T, K_base], preference order
        scores = gather_scores(p, indices)  # read once, for R and for the weights
        keep = self.slots_kept(ratio_of(p, indices, self.k_num, scores))
        return p, indices, keep, keep_slots(p, spec, keep, indices, logits.dtype, scores)

    def slots_kept(self, ratio: torch.Tensor) -> torch.Tensor:
        """Returns bool [T, K_base]: slot s < ban_k(ratio, *self.layer) (one comparison for a float32 R on the CPU)."""
        if ratio.dtype != torch.float32 or ratio.device.type != "cpu":
            k = ban_k(ratio, *self.layer)
            return slot_numbers(self.spec.top_k, ratio.device) < k.unsqueeze(-1)
        return ratio.unsqueeze(-1) <= self.slot_bounds

    def k_of(self, ratio: torch.Tensor) -> torch.Tensor:
        """Returns `ban_k(ratio, *self.layer)` [T] (long)."""
        return self.slots_kept(ratio).sum(-1)


def _slot_bounds(*layer) -> torch.Tensor:
    # Slot s (0-based) is kept iff K > s iff R <= the bound of level s + 1; below K(+max) always, at K(-max) and
    # above never (NaN compares false).
    k_top, bounds = k_steps(*layer)
    k_base = layer[3]
    k_bottom = k_top - len(bounds)
    levels = [math.inf] * k_bottom + list(reversed(bounds)) + [math.nan] * (k_base - k_top)
    return torch.tensor(levels, dtype=torch.float32)


@functools.lru_cache(maxsize=4096)
def k_steps(layer_sensitivity: float, r_min: float, r_max: float, k_base: int, k_min: int, lam: float, beta: float,
            clip: bool) -> tuple[int, tuple[float, ...]]:
    """Returns (K_top, bounds): ban_k of a layer as a step function of R, for every finite float32 R
    ban_k(R) = K_top - (number of bounds < R), the bounds ascending float32 values.

    Exact by construction: ban_k is non-increasing in R (each of its float64 operations is monotone, lam >= 0,
    0 <= beta <= 1, R_max >= R_min), and the bound of each K above ban_k(+max) is the largest float32 R at which
    ban_k still reaches it, found by a search over the float32 numbers in order (255 probes a round, about 4
    rounds), evaluating ban_k itself.
    """
    def k_at(keys: torch.Tensor) -> torch.Tensor:
        return ban_k(_float32_of(keys).flatten(), layer_sensitivity, r_min, r_max, k_base, k_min, lam, beta,
                     clip).view(keys.shape)

    ends = _order_key(torch.tensor([-_F32_MAX, _F32_MAX], dtype=torch.float32))
    k_top, k_bottom = k_at(ends).tolist()
    levels = torch.arange(k_bottom + 1, k_top + 1)  # each K that some R reaches and the largest R does not
    lo, hi = ends[0].expand_as(levels).clone(), ends[1].expand_as(levels).clone()  # K(lo) >= level > K(hi)
    steps = torch.arange(1, _PROBES + 1)
    while bool((hi - lo > 1).any()):
        # Probes in [lo, hi), non-decreasing (lo + 1 among them while hi - lo >= 2): K reaches the level on a prefix.
        probes = lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * steps // (_PROBES + 1)  # [levels, probes]
        reached = (k_at(probes) >= levels.unsqueeze(-1)).sum(-1)  # how many probes reach it
        last = probes.gather(1, (reached - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
        first_not = probes.gather(1, reached.clamp(max=_PROBES - 1).unsqueeze(-1)).squeeze(-1)
        lo, hi = torch.where(reached > 0, last, lo), torch.where(reached < _PROBES, first_not, hi)
    return k_top, tuple(_float32_of(lo).flip(0).tolist())


_PROBES = 255


_F32_MAX = torch.finfo(torch.float32).max


def _order_key(x: torch.Tensor) -> torch.Tensor:
    # float32 -> int64 with the floats' order (-0.0 just below +0.0), one step per representable number.
    bits = x.view(torch.int32).long()
    return torch.where(bits >= 0, bits, -(bits + 2**31) - 1)


def _float32_of(keys: torch.Tensor) -> torch.Tensor:
    return torch.where(keys >= 0, keys, -(keys + 1) - 2**31).int().view(torch.float32)


def check_ban_params(*, k_base: int, k_min: int, lam: float, beta: float) -> None:
    """Raises ValueError (one line, naming the value) unless 1 <= k_min <= k_base, lam >= 0, 0 <= beta <= 1."""
    if not isinstance(k_base, int) or k_base < 1:
        raise ValueError(f"k_base must be an integer >= 1, got {k_base!r}")
    if not isinstance(k_min, int) or isinstance(k_min, bool) or not 1 <= k_min <= k_base:
        raise ValueError(f"k_min must be an integer in [1, k_base={k_base}], got {k_min!r}")
    if not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam (lambda) must be a finite number >= 0, got {lam!r}")
    if not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")


def _check_layer(layer_sensitivity: float, r_min: float, r_max: float) -> tuple[float, float, float]:
    # Returns (L', R_min, R_max) as floats, or raises ValueError (one line) naming the bad one.
    layer_sensitivity = float(layer_sensitivity)
    if not 0.0 <= layer_sensitivity <= 1.0:
        raise ValueError(f"layer_sensitivity (L') must be in [0, 1], got {layer_sensitivity!r}")
    r_min, r_max = float(r_min), float(r_max)
    if not (math.isfinite(r_min) and math.isfinite(r_max) and r_min <= r_max):
        raise ValueError(f"r_min and r_max must be finite with r_min <= r_max, got {r_min!r}, {r_max!r}")
    return layer_sensitivity, r_min, r_max
