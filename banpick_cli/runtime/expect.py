"""Expected experts per token (Avg-TopK) of a plan, per layer, from the profile alone: what a runtime
should see when the rule engages, for monitoring a deployment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from banpick_cli.profile.format import RoutingProfile
from banpick_cli.routing import ban_k as core_ban_k

from banpick_cli.runtime.methods import get_method, resolve
from banpick_cli.runtime.plan import RoutingPlan


@dataclass(frozen=True)
class ExpectedK:
    """Experts per token per MoE layer: `low` == `high` where the profile determines it, else bounds."""

    low: list[float]
    high: list[float]
    basis: str  # how it was computed, one phrase

    @property
    def overall(self) -> tuple[float, float]:
        """Returns (low, high) averaged over layers (every layer sees every token)."""
        n = len(self.low)
        return sum(self.low) / n, sum(self.high) / n

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.overall
        return {"per_layer_low": [round(x, 4) for x in self.low], "per_layer_high": [round(x, 4) for x in self.high],
                "overall_low": round(lo, 4), "overall_high": round(hi, 4), "basis": self.basis}

    def summary(self) -> str:
        lo, hi = self.overall
        return f"{lo:.2f}" if abs(hi - lo) < 5e-3 else f"{lo:.2f}-{hi:.2f}"


def expected_k(plan: RoutingPlan, profile: RoutingProfile | None) -> ExpectedK:
    """Returns the plan's expected experts per token per layer, by its method record's `expect` rule."""
    return resolve(get_method(plan.method).expect)(plan, profile)


# --- the rules a Method record names as its `expect` ----------------------------------------------


def model_k(plan: RoutingPlan, profile: RoutingProfile | None) -> ExpectedK:
    """The model's own top-k on every layer (baseline; RICE, which changes weights, not the selection)."""
    k = [float(plan.k_base)] * len(plan.specs)
    return ExpectedK(k, list(k), "the model's own top-k" if not plan.rules else "selection unchanged")


def ban_k(plan: RoutingPlan, profile: RoutingProfile | None) -> ExpectedK:
    """Ban: the mean of the core's K over the calibration ratio histogram `ban/ratio_hist` (bin centres),
    else its range between R_max and R_min."""
    return ExpectedK(*_ban(plan, profile))


def banpick_k(plan: RoutingPlan, profile: RoutingProfile | None) -> ExpectedK:
    """Ban&Pick: Ban's K, plus at most one per key expert."""
    low, high, basis = _ban(plan, profile)
    n_key = plan.key_experts.sum(-1).tolist()
    return ExpectedK(low, [h + n for h, n in zip(high, n_key)], basis + "; Pick C adds at most one expert per key expert")


def pick_k(plan: RoutingPlan, profile: RoutingProfile | None) -> ExpectedK:
    """Pick A: K + the share of tokens whose router misses each key expert (the domain's usage counts);
    C adds at most that; B, D, E keep K."""
    k = [float(plan.k_base)] * len(plan.specs)
    return _pick(plan, profile, k, list(k))


def width_k(plan: RoutingPlan, profile: RoutingProfile | None) -> ExpectedK:
    """A fixed count per layer (Fixed-K): each changed layer's width, K_base elsewhere."""
    low = [float(plan.rules[i].width) if i in plan.rules else float(plan.k_base) for i in range(len(plan.specs))]
    return ExpectedK(low, list(low), "k per layer")


def up_to_width_k(plan: RoutingPlan, profile: RoutingProfile | None) -> ExpectedK:
    """A per-token count between 1 and the rule's width (Dynamic)."""
    return _ranged(plan, lambda rule: 1.0, "range 1..width")


def des_k(plan: RoutingPlan, profile: RoutingProfile | None) -> ExpectedK:
    """DES and ODP: k_lo..k_hi per token."""
    return _ranged(plan, lambda rule: float(plan.params.get("k_lo") or (rule.width + 1) // 2), "range k_lo..k_hi")


def _ranged(plan: RoutingPlan, low_of, basis: str) -> ExpectedK:
    low, high = [float(plan.k_base)] * len(plan.specs), [float(plan.k_base)] * len(plan.specs)
    for position, rule in plan.rules.items():
        low[position], high[position] = low_of(rule), float(rule.width)
    return ExpectedK(low, high, basis)


def max_experts(plan: RoutingPlan) -> int:
    """Returns the most experts any token can run under the plan: the slots an engine needs.

    Tighter than the core's promised width: Ban&Pick keeps at most Ban's largest K (R at R_min,
    T' clipped to 1) and adds at most the layer's key experts, so at lam = 0.7 (K 3..6 of 8) a
    layer with two key experts still fits in 8 slots.
    """
    most = plan.k_base
    params = plan.ban_params or {}
    kw = {k: params[k] for k in ("k_min", "lam", "beta", "clip") if k in params}
    for position, rule in plan.rules.items():
        n = rule.width
        if plan.ban_params is not None and params.get("clip", True):
            sens, r_min, r_max = params["per_layer"][position]
            k_max = int(core_ban_k(torch.tensor([r_min], dtype=torch.float64), sens, r_min, r_max, plan.k_base, **kw)[0])
            n_key = int(rule.key_experts.sum()) if rule.key_experts is not None else 0
            n = min(n, k_max + n_key)
        most = max(most, n)
    return most


def _ban(plan: RoutingPlan, profile: RoutingProfile | None) -> tuple[list[float], list[float], str]:
    params = plan.ban_params or {}
    kw = {k: params[k] for k in ("k_min", "lam", "beta", "clip") if k in params}
    k_base = plan.k_base
    hist = profile.ban.find("ratio_hist") if profile is not None else None
    low, high = [], []
    for position, (sens, r_min, r_max) in enumerate(params["per_layer"]):
        if position not in plan.rules:  # K_min == K_base: nothing pruned
            low.append(float(k_base))
            high.append(float(k_base))
            continue
        if hist is not None and int(hist[position].sum()) > 0:
            counts = hist[position].double()
            centres = (torch.arange(counts.shape[0], dtype=torch.float64) + 0.5) / counts.shape[0]
            per_bin = core_ban_k(centres, sens, r_min, r_max, k_base, **kw).double()
            value = float((counts * per_bin).sum() / counts.sum())
            low.append(value)
            high.append(value)
        else:  # K falls as R rises: R = R_max gives the fewest experts, R = R_min the most
            ends = core_ban_k(torch.tensor([r_max, r_min], dtype=torch.float64), sens, r_min, r_max, k_base, **kw)
            low.append(float(ends[0]))
            high.append(float(ends[1]))
    basis = "Ban's K over the calibration ratio histogram (bin centres)" if hist is not None else \
        "Ban's K at R_max and R_min (no ratio histogram in the profile)"
    return low, high, basis


def _pick(plan: RoutingPlan, profile: RoutingProfile | None, low: list[float], high: list[float]) -> ExpectedK:
    strategy = plan.params.get("strategy", "C")
    k = float(plan.params.get("k") or plan.k_base)
    usage = profile.domain(plan.domain) if profile is not None else None
    has_usage = usage is not None and usage.has("expert_counts") and usage.has("token_counts")
    for position, rule in plan.rules.items():
        key = rule.key_experts
        if strategy in "BDE":
            low[position] = high[position] = k
            continue
        if has_usage:
            freq = usage.expert_counts[position].double() / max(int(usage.token_counts[position]), 1)
            missing = float((1.0 - freq.clamp(max=1.0))[key].sum())  # key experts the router leaves out
        else:
            missing = float(key.sum())
        high[position] = k + missing
        low[position] = k + missing if strategy == "A" and has_usage else k
    basis = f"Pick {strategy}: " + ("K + key experts the router misses (calibration usage)" if strategy in "AC" and has_usage
                                   else "K plus at most each key expert" if strategy in "AC" else "replacement keeps K")
    return ExpectedK(low, high, basis)
