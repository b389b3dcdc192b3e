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


@dataclass(frozen=True)
class Finding:
    """One row of `inspect`'s "what each stage found": the stage and what it left in the profile."""

    stage: str
    found: str


def domain_findings(profile: RoutingProfile, domain: str) -> list[Finding]:
    """Returns which stage found what in a domain: profile's candidates, kl-scan's high-KL candidates,
    failure-probe's key experts, and the key experts Pick reads now (with the stage that chose them)."""
    from banpick_cli.stages.kl_scan import KeyExpertRule

    view = profile.domain(domain)
    layers = profile.model.moe_layers

    def names(mask) -> str:
        return ", ".join(f"L{layers[m]}E{e}" for m, e in mask.nonzero().tolist()) or "none"

    cands, rule = view.candidates, view.candidate_rule()
    arms = [f"usage >= {rule.min_ratio:g}x the layer mean"] + ([f"the {rule.top_n} most used"] if rule.top_n else [])
    found = [Finding("profile", f"{int(cands.sum())} candidates in {int(cands.any(-1).sum())} of {len(layers)} layers "
                                f"({' or '.join(arms)})")]
    kl = view.find("kl")
    if kl is None:
        found.append(Finding("kl-scan", "not run"))
    else:
        knobs = profile.recorded("kl-scan", domain).get("settings", {})
        high = KeyExpertRule(knobs.get("key_factor", 2.0), knobs.get("key_top", 2), knobs.get("key_min_kl", 0.0)).choose(kl)
        found.append(Finding("kl-scan", f"KL of {int((~kl.isnan()).sum())} candidates; high-KL candidates: {names(high)}"))
    probe = profile.recorded("failure-probe", domain)
    source, key = view.key_source(), view.find("key_experts")
    if not probe:
        found.append(Finding("failure-probe", "not run"))
    else:
        chosen = names(key) if key is not None and source == "failure-probe" else "(replaced by a later kl-scan)"
        found.append(Finding("failure-probe", f"{probe.get('candidates_probed', '?')} candidates probed on "
                                              f"{probe.get('failures', '?')} failures of {probe.get('samples', '?')} "
                                              f"tasks; key experts: {chosen}"))
    if key is None or not bool(key.any()):
        found.append(Finding("Pick reads", "no key experts: pick and ban&pick's Pick leave this domain's routing as is"))
    else:
        origin = "kl-scan's high-KL candidates, until failure-probe runs" if source == "kl-scan" else source or "?"
        found.append(Finding("Pick reads", f"key experts {names(key)} ({origin})"))
    return found
