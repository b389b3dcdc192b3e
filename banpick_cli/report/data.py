"""The numbers behind the report's figures, computed from a profile (no plotting here)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from banpick_cli.profile.format import RoutingProfile
from banpick_cli.profile.stats import usage_frequency
from banpick_cli.routing import BETA, K_MIN, LAM, ban_k

# Paper defaults (section 6.1), used when a profile stores no `ban` settings.


def frequency(profile: RoutingProfile, domain: str) -> torch.Tensor:
    """Returns the share of tokens that selected each expert. # [moe_layers, experts] float64"""
    return usage_frequency(profile.domain(domain).expert_counts, profile.domain(domain).token_counts)


def specialised_layers(profile: RoutingProfile, count: int = 3) -> list[int]:
    """Returns the positions (rows) of the `count` layers whose usage differs most between domains.

    The spread of a layer is its largest gap, over experts, between the domain that uses an expert most
    and the one that uses it least; with one domain it is the layer's top frequency over its mean.
    """
    domains = profile.domains()
    freqs = torch.stack([frequency(profile, d) for d in domains])  # [domains, M, E]
    if len(domains) > 1:
        spread = (freqs.max(0).values - freqs.min(0).values).max(-1).values
    else:
        spread = freqs[0].max(-1).values / freqs[0].mean(-1).clamp(min=1e-12)
    order = spread.argsort(descending=True, stable=True)[: min(count, len(spread))]
    return sorted(order.tolist())


@dataclass(frozen=True)
class Overlap:
    """Candidates shared across domains, per layer, and their Jaccard similarity per pair of domains."""

    domains: list[str]
    shared_by_all: list[int]  # per layer
    shared_by_some: list[int]  # in at least two domains but not all
    unique: dict[str, list[int]]  # per domain, per layer
    jaccard: list[list[float]]  # [domains][domains], over all layers' candidates together


def candidate_overlap(profile: RoutingProfile) -> Overlap:
    """Returns how the domains' candidate experts overlap (needs at least two domains)."""
    domains = profile.domains()
    masks = torch.stack([profile.domain(d).candidates for d in domains])  # [D, M, E] bool
    hits = masks.sum(0)  # [M, E]: in how many domains an expert is a candidate
    everywhere = (hits == len(domains)).sum(-1)
    some = ((hits >= 2) & (hits < len(domains))).sum(-1)
    unique = {d: (masks[i] & (hits == 1)).sum(-1).tolist() for i, d in enumerate(domains)}
    jaccard = []
    for a in range(len(domains)):
        row = []
        for b in range(len(domains)):
            union = (masks[a] | masks[b]).sum().item()
            row.append((masks[a] & masks[b]).sum().item() / union if union else float("nan"))
        jaccard.append(row)
    return Overlap(domains, everywhere.tolist(), some.tolist(), unique, jaccard)


@dataclass(frozen=True)
class ScannedExpert:
    """One candidate with a stage result: where it is, and its value."""

    position: int
    layer_index: int
    expert: int
    value: float
    key: bool


def scanned(profile: RoutingProfile, domain: str, part: str) -> list[ScannedExpert]:
    """Returns every expert with a finite value in `domain/<d>/<part>` (kl, accuracy_gain), in layer order."""
    view = profile.domain(domain)
    values = view.get(part)
    keys = view.find("key_experts")
    keys = torch.zeros_like(values, dtype=torch.bool) if keys is None else keys
    found = torch.isfinite(values).nonzero().tolist()
    layers = profile.model.moe_layers
    return [ScannedExpert(p, layers[p], e, float(values[p, e]), bool(keys[p, e])) for p, e in found]


def ban_settings(profile: RoutingProfile) -> tuple[dict, bool]:
    """Returns Ban's knobs as layer-sensitivity stored them (k_min, lam, beta, ratio_k_num, ratio_scope), and
    whether they came from the profile (False: the paper's defaults)."""
    stored = profile.ban.settings
    knobs = {"k_min": K_MIN, "lam": LAM, "beta": BETA, "ratio_k_num": None, "ratio_scope": "layer"}
    for key, value in stored.items():
        if key in knobs:
            knobs[key] = value
    knobs["ratio_k_num"] = knobs["ratio_k_num"] or knobs["k_min"]
    return knobs, bool(stored)


@dataclass(frozen=True)
class BanK:
    """Ban's K per layer at the stored settings, from the token-ratio histogram's bin centres."""

    k_values: list[int]  # K_min..K_base
    share: list[list[float]]  # [M][len(k_values)]: share of the layer's tokens that keep K experts
    mean_k: list[float]  # per layer
    overall_mean_k: float  # over every token of every layer
    settings: dict  # k_min, lam, beta, ratio_k_num, ratio_scope actually used
    from_profile: bool  # False: the profile stores no `ban` settings; paper defaults were used


def ban_k_distribution(profile: RoutingProfile) -> BanK:
    """Returns the distribution of Ban's K per layer implied by the stored histograms and settings.

    Each histogram bin stands for its tokens at the bin's centre R, so K is exact up to the bin width.
    The R range is per layer, or pooled over layers when layer-sensitivity stored ratio_scope "pooled"
    (as the runtime reads it).
    """
    hist = profile.ban.ratio_hist  # [M, bins]
    sens = profile.ban.layer_sensitivity
    r_min, r_max = profile.ban.ratio_min.double(), profile.ban.ratio_max.double()
    knobs, stored = ban_settings(profile)
    if knobs["ratio_scope"] == "pooled":
        recorded = profile.ban.settings
        r_min = torch.full_like(r_min, float(recorded.get("ratio_min_global", r_min.min())))
        r_max = torch.full_like(r_max, float(recorded.get("ratio_max_global", r_max.max())))
    k_base = profile.model.k_base
    k_min = int(knobs["k_min"])
    k_values = list(range(k_min, k_base + 1))
    bins = hist.shape[1]
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    share, means = [], []
    total_tokens, total_k = 0.0, 0.0
    for pos in range(hist.shape[0]):
        weights = hist[pos].double()
        n = float(weights.sum())
        if not n or not all(torch.isfinite(v) for v in (sens[pos], r_min[pos], r_max[pos])):
            share.append([0.0] * len(k_values))
            means.append(float("nan"))
            continue
        k = ban_k(centres, float(sens[pos].clamp(0, 1)), float(r_min[pos]), float(r_max[pos]), k_base,
                  k_min=k_min, lam=float(knobs["lam"]), beta=float(knobs["beta"]))
        share.append([float(weights[k == value].sum()) / n for value in k_values])
        means.append(float((weights * k.double()).sum()) / n)
        total_tokens += n
        total_k += float((weights * k.double()).sum())
    overall = total_k / total_tokens if total_tokens else float("nan")
    return BanK(k_values, share, means, overall, knobs, stored)
