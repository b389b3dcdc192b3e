"""Plain data views of a profile for `inspect` and summaries (numbers here, rendering in render.py)."""

from __future__ import annotations

from dataclasses import dataclass

from banpick_cli.profile.format import RoutingProfile
from banpick_cli.profile.stats import usage_frequency, usage_ratio


@dataclass(frozen=True)
class LayerUsage:
    """One row of the usage table: a layer's top experts with their frequency and ratio to the mean."""

    layer_index: int
    tokens: int
    top: list[tuple[int, float, float]]  # (expert, frequency, ratio to layer mean)
    candidates: list[int]


def domain_usage(profile: RoutingProfile, domain: str, top: int = 5) -> list[LayerUsage]:
    """Returns, per MoE layer, the `top` most used experts of a domain and its candidates."""
    counts = profile.domain(domain).expert_counts
    tokens = profile.domain(domain).token_counts
    cands = profile.domain(domain).candidates
    freq, ratio = usage_frequency(counts, tokens), usage_ratio(counts, tokens)
    rows = []
    for pos, layer_index in enumerate(profile.model.moe_layers):
        order = counts[pos].argsort(descending=True, stable=True)[:top].tolist()
        rows.append(
            LayerUsage(
                layer_index,
                int(tokens[pos]),
                [(e, float(freq[pos, e]), float(ratio[pos, e])) for e in order],
                cands[pos].nonzero().flatten().tolist(),
            )
        )
    return rows


def profile_summary(profile: RoutingProfile) -> dict:
    """Returns a JSON-ready summary of a profile: identity, domains, stages present."""
    domains = {}
    for name in profile.domains():
        counts = profile.domain(name).expert_counts
        tokens = profile.domain(name).token_counts
        ratio = usage_ratio(counts, tokens)
        domains[name] = {
            "tokens": int(tokens[0]) if len(tokens) else 0,
            "candidates": int(profile.domain(name).candidates.sum()),
            "max_over_mean_per_layer": [round(float(r), 3) for r in ratio.max(dim=-1).values],
            "stages": sorted(profile.domain(name).present()),
        }
    return {
        "model": profile.model.to_dict(),
        "fingerprint": profile.fingerprint,
        "created_utc": profile.created_utc,
        "banpick_version": profile.banpick_version,
        "domains": domains,
        "tensors": sorted(profile.tensors),
        "provenance": profile.provenance,
    }
