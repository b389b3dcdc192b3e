"""Matched budgets: the knob setting of a method whose expected experts per token (Avg-TopK) is a target.

Methods are compared fairly only at the same expert budget. `solve_budget` sets each budgeted method's
knob (its record's `Method.knob`) so that its Avg-TopK on calibration tokens is the target, within a
tolerance, and refuses (naming the nearest reachable value) when it cannot. The knob says how to search:

    layer_mix   an integer per MoE layer (Fixed-K's k): an integer target is that k everywhere; a
                fractional one mixes floor and ceil over evenly spaced layers (resolution 1 / layers)
    bisect      a float (Ban's and Ban&Pick's lambda from 0, doubled up to the target; Dynamic's tau
                in (0, 1]), by bisection; Avg-TopK rises with it
    quantile    per-layer thresholds (DES, ODP): the q-quantile of the DES ratios r(j)/r(j+1) on the
                calibration logits (q = 0.5 is DES's own median), q by bisection; reach k_lo..k_hi.
                ODP's key tokens add to this.

Expected Avg-TopK is measured by running the plan's own rules (the routing core) on router logits of
calibration text (`CalibrationLogits`, from `collect_router_logits`), never on the tasks being scored;
the runtime then counts what each row actually ran, which is what a report should show beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from banpick_cli.errors import BadSetting
from banpick_cli.routing import RouterSpec, des_bounds, des_ratios, probs
from banpick_cli.runtime.methods import Method, get_method
from banpick_cli.runtime.plan import RoutingPlan, build_plan

TOLERANCE = 0.2  # experts per token: how far a solved row may land from the target
_STEPS = 40  # bisection steps: far below any step of a piecewise-constant Avg-TopK


@dataclass(frozen=True)
class CalibrationLogits:
    """Router logits of calibration tokens: one float32 tensor [N, E] per MoE layer (real tokens only)."""

    logits: tuple[torch.Tensor, ...]
    source: str = ""  # what text they came from, one phrase

    @property
    def tokens(self) -> int:
        return int(self.logits[0].shape[0]) if self.logits else 0


@dataclass(frozen=True)
class Budget:
    """A method's knob set for a target Avg-TopK: `overrides` go to `build_plan` / `runtime.apply`."""

    method: str
    target: float
    overrides: dict[str, Any]
    expected: float  # Avg-TopK of the plan on the calibration tokens
    label: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        shown = {k: (v.tolist() if isinstance(v, torch.Tensor) and v.numel() <= 16 else
                     f"tensor{list(v.shape)}" if isinstance(v, torch.Tensor) else v) for k, v in self.overrides.items()}
        return {"method": self.method, "target": self.target, "overrides": shown,
                "expected_avg_topk": round(self.expected, 4), "label": self.label, "notes": list(self.notes)}


def plan_avg_topk(plan: RoutingPlan, sample: CalibrationLogits) -> float:
    """Returns the plan's experts per token on the sample, averaged over MoE layers (every layer sees every token).

    Layers the plan leaves alone run K_base. ODP's key tokens are none here (it protects a few prompt
    tokens per sequence on top of DES).
    """
    if len(sample.logits) != len(plan.specs):
        raise BadSetting(f"calibration logits cover {len(sample.logits)} MoE layers; the model has {len(plan.specs)}")
    total = 0.0
    for position, logits in enumerate(sample.logits):
        rule = plan.rules.get(position)
        if rule is None or logits.shape[0] == 0:
            total += plan.specs[position].top_k
            continue
        total += float(rule.route(logits).k.double().mean())
    return total / len(plan.specs)


def check_target(target: Any, k_base: int) -> None:
    """Raises unless `target` is an Avg-TopK a model of `k_base` experts per token can run: in [1, K_base]."""
    if not (isinstance(target, (int, float)) and math.isfinite(target) and 1 <= target <= k_base):
        raise BadSetting(f"--target-avg-topk must be in [1, K_base={k_base}], got {target!r}")


def solve_budget(
    method: str,
    target: float,
    specs: Sequence[RouterSpec],
    sample: CalibrationLogits | None,
    profile: Any = None,
    *,
    domain: str | None = None,
    overrides: dict[str, Any] | None = None,
    tolerance: float = TOLERANCE,
) -> Budget:
    """Returns the knob setting of `method` whose Avg-TopK on `sample` is within `tolerance` of `target`.

    `overrides`: the method's other hyperparameters (k_min, range_factor, ...), kept as given. Raises
    BadSetting (one line, with the nearest value the method reaches) when no setting lands within the
    tolerance, or when the method has no budget knob (pick, rice, baseline).
    """
    record = get_method(method)
    specs = list(specs)
    k_base = specs[0].top_k
    check_target(target, k_base)
    if record.knob is None:
        raise BadSetting(f"method '{method}' has no expert budget to set (it prunes nothing by design)")
    knob = record.knob
    base = {k: v for k, v in (overrides or {}).items() if k != knob.name}
    if knob.search == "layer_mix":
        return _layer_mix(record, target, specs, tolerance)
    if sample is None or sample.tokens == 0:
        raise BadSetting(f"matching {method}'s budget needs calibration tokens (router logits of calibration text)")
    # Methods that protect key tokens per batch (ODP) protect none here: the budget is the rule's own.
    extra = {"key_tokens": lambda n: torch.zeros(n, dtype=torch.bool)} if "key_tokens" in record.required else {}

    def avg(setting: dict[str, Any]) -> float:
        plan = build_plan(profile, specs, method, domain, **base, **setting, **extra)
        return plan_avg_topk(plan, sample)

    if knob.search == "bisect":
        at = lambda x: avg({knob.name: x})  # noqa: E731
        hi = knob.high if knob.high is not None else _upper(at, target, 1.0, 64.0)
        value, got = _bisect(at, knob.low, hi, target, decimals=4)
        setting = {knob.name: value}
    else:  # quantile
        k_lo, k_hi = base.get("k_lo"), base.get("k_hi")
        if k_lo is None or k_hi is None:
            k_lo, k_hi = des_bounds(k_base)
        ratios = [des_ratios(probs(x, s), k_lo, k_hi).double() for x, s in zip(sample.logits, specs)]

        def thresholds(q: float) -> torch.Tensor:  # [M, k_hi - k_lo]; q = 0.5 is DES's median
            return torch.stack([torch.quantile(r, q, dim=0) for r in ratios]).float()

        value, got = _bisect(lambda q: avg({knob.name: thresholds(q)}), 0.0, 1.0, target, decimals=4)
        setting = {knob.name: thresholds(value)}
    label = knob.label(record.label, value)
    if abs(got - target) > tolerance:
        raise BadSetting(f"{method} cannot reach Avg-TopK {target:g} within {tolerance:g} on the calibration tokens: "
                         f"the nearest is {got:.2f} ({knob.name}={value:g})")
    return Budget(method, float(target), setting, got, label)


def collect_router_logits(
    loaded: Any, texts: Sequence[str], *, seq_len: int = 256, batch_size: int = 8, max_tokens: int = 8192,
    seed: int = 0,
) -> CalibrationLogits:
    """Returns router logits [N, E] per MoE layer on the texts' real tokens (at most max_tokens, a seeded subsample)."""
    from banpick_cli.models.base import RoutingHooks
    from banpick_cli.passes.batches import batches

    kept: list[list[torch.Tensor]] = [[] for _ in loaded.layers]
    mask: dict[str, torch.Tensor | None] = {"real": None}

    def observe(position: int, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> None:
        real = mask["real"]
        x = logits.float()
        if real is not None and real.shape[0] == x.shape[0]:
            x = x[real.to(x.device)]
        kept[position].append(x.cpu())

    decoder = loaded.adapter.decoder(loaded.model)
    with torch.inference_mode(), RoutingHooks(loaded.layers, loaded.routing.num_experts, observers=[observe]):
        for batch in batches(loaded.tokenizer, list(texts), seq_len=seq_len, batch_size=batch_size, device=loaded.device):
            mask["real"] = batch.attention_mask.reshape(-1).bool()
            decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits = [torch.cat(rows) if rows else torch.zeros(0, loaded.routing.num_experts) for rows in kept]
    n = logits[0].shape[0]
    if n > max_tokens:  # the same tokens in every layer
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_tokens].sort().values
        logits = [x[keep] for x in logits]
    return CalibrationLogits(tuple(logits), f"{len(texts)} calibration texts, {min(n, max_tokens)} tokens")


def balanced(parts: Sequence[CalibrationLogits], seed: int = 0) -> CalibrationLogits:
    """Returns the parts (e.g. one per domain) with the same number of tokens each: a seeded subsample of
    every part down to the smallest, so a domain with longer calibration texts does not set the budget."""
    parts = [p for p in parts if p.tokens]
    if not parts:
        raise BadSetting("matching a budget needs calibration tokens; the calibration text gave none")
    n = min(p.tokens for p in parts)
    layers = []
    for position in range(len(parts[0].logits)):
        rows = []
        for p in parts:
            keep = torch.randperm(p.tokens, generator=torch.Generator().manual_seed(seed))[:n].sort().values
            rows.append(p.logits[position][keep])
        layers.append(torch.cat(rows))
    return CalibrationLogits(tuple(layers), f"{len(parts)} parts of {n} tokens each ({'; '.join(p.source for p in parts)})")


# --- helpers -----------------------------------------------------------------------------------


def _layer_mix(record: Method, target: float, specs: list[RouterSpec], tolerance: float) -> Budget:
    label, name = record.label, record.knob.name
    layers = len(specs)
    low = math.floor(target)
    n_high = round((target - low) * layers)  # layers that run low + 1
    if n_high == layers:
        low, n_high = low + 1, 0
    high_at = {round((i + 0.5) * layers / n_high - 0.5) for i in range(n_high)} if n_high else set()
    k = [low + 1 if position in high_at else low for position in range(layers)]
    got = sum(k) / layers
    if abs(got - target) > tolerance:
        raise BadSetting(f"{label} cannot reach Avg-TopK {target:g} within {tolerance:g} over {layers} MoE layers "
                         f"(one {name} per layer): the nearest is {got:.2f}")
    if len(set(k)) == 1:
        return Budget(record.name, float(target), {name: k[0]}, float(k[0]), f"{label}({name}={k[0]})")
    return Budget(record.name, float(target), {name: k}, got, f"{label}({name}={got:g}: {low}/{low + 1})",
                  (f"{label}: {name}={low + 1} on MoE layers {sorted(high_at)}, {name}={low} elsewhere",))


def _upper(avg_of: Callable[[float], float], target: float, start: float, cap: float) -> float:
    """Returns a knob value at which avg_of reaches the target (doubling from start), or cap."""
    value = start
    while value < cap and avg_of(value) < target:
        value *= 2
    return min(value, cap)


def _bisect(avg_of: Callable[[float], float], lo: float, hi: float, target: float, *, decimals: int) -> tuple[float, float]:
    """Returns (knob, its Avg-TopK) nearest the target for a nondecreasing avg_of on [lo, hi], knob rounded."""
    seen: dict[float, float] = {}

    def at(x: float) -> float:
        x = round(x, decimals)
        if x not in seen:
            seen[x] = avg_of(x)
        return seen[x]

    a_lo, a_hi = at(lo), at(hi)
    if a_lo < target < a_hi:
        for _ in range(_STEPS):
            mid = (lo + hi) / 2
            if round(mid, decimals) in (round(lo, decimals), round(hi, decimals)):
                break
            if at(mid) < target:
                lo = mid
            else:
                hi = mid
    best = min(seen, key=lambda x: (abs(seen[x] - target), x))
    return best, seen[best]
