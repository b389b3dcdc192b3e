"""Ban (paper section 5, appendix C): per-token dynamic pruning from layer and token sensitivity."""

from __future__ import annotations

import math

import torch

from .spec import RouterSpec, Routing
from .topk import check_k, keep_prefix, probs, route_probs

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
    return ratio_of(p, route_probs(p, spec, k_base, torch.float32).indices, k_num)


def ratio_of(p: torch.Tensor, indices: torch.Tensor, k_num: int) -> torch.Tensor:
    """Returns R [T]: the scores p [T, E] of the first k_num slots of `indices` over those of all slots."""
    real = indices < p.shape[1]
    w = p.gather(1, indices.clamp(max=p.shape[1] - 1)) * real  # [T, W], preference order
    total = w.sum(-1)
    return torch.where(total > 0, w[:, :k_num].sum(-1) / total, torch.ones_like(total))


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
    layer_sensitivity = float(layer_sensitivity)
    if not 0.0 <= layer_sensitivity <= 1.0:
        raise ValueError(f"layer_sensitivity (L') must be in [0, 1], got {layer_sensitivity!r}")
    r_min, r_max = float(r_min), float(r_max)
    if not (math.isfinite(r_min) and math.isfinite(r_max) and r_min <= r_max):
        raise ValueError(f"r_min and r_max must be finite with r_min <= r_max, got {r_min!r}, {r_max!r}")
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
    to less than before). `Routing.k` holds K_i; the width stays K_base.
    """
    if reweight not in REWEIGHTS:
        raise ValueError(f"reweight must be one of {REWEIGHTS}, got {reweight!r}")
    p, base, k, kept = ban_keep(logits, spec, layer_sensitivity, r_min, r_max, k_min=k_min, lam=lam, beta=beta,
                                clip=clip, ratio_k_num=ratio_k_num)
    if reweight == "model":
        return kept
    # The kept experts are a prefix of the base slots, so the old weights line up slot by slot.
    return Routing(kept.indices, base.weights.masked_fill(kept.indices == spec.num_experts, 0.0), kept.k)


def ban_keep(logits: torch.Tensor, spec: RouterSpec, layer_sensitivity: float, r_min: float, r_max: float, *,
             k_min: int, lam: float, beta: float, clip: bool, ratio_k_num: int | None):
    """Returns (probs [T, E], the model's top-K_base Routing, K [T], the kept prefix Routing): Ban's keep-set,
    shared by Ban and Ban&Pick. Raises ValueError for a bad knob or ratio_k_num."""
    k_base = spec.top_k
    check_ban_params(k_base=k_base, k_min=k_min, lam=lam, beta=beta)
    k_num = k_min if ratio_k_num is None else ratio_k_num
    if not isinstance(k_num, int) or not 1 <= k_num <= k_base:
        raise ValueError(f"ratio_k_num must be an integer in [1, k_base={k_base}], got {k_num!r}")
    p = probs(logits, spec)
    base = route_probs(p, spec, k_base, logits.dtype)  # [T, K_base], preference order
    k = ban_k(ratio_of(p, base.indices, k_num), layer_sensitivity, r_min, r_max, k_base, k_min=k_min, lam=lam,
              beta=beta, clip=clip)
    return p, base, k, keep_prefix(p, spec, k, base.indices, logits.dtype)


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
