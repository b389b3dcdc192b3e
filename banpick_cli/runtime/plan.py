"""The routing plan: what each MoE layer needs to route by a method, built from a profile.

One plan serves every runtime (the HF context manager and the engine plugins): per changed layer, a
function from router logits [T, E] to a `Routing`, closed over that layer's tensors and the
method's hyperparameters, all calling the routing core. Layers the method leaves alone get no rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from banpick_cli.errors import BadSetting, ProfileError
from banpick_cli.profile.format import RoutingProfile
from banpick_cli.routing import BETA, K_MIN, LAM, RouterSpec, Routing, ban_pick_rule, ban_rule, check_ban_params, pick, rice
from banpick_cli.runtime.methods import Method, allowed_params, get_method, resolve

AUTO = "auto"  # a domain chosen per request (runtime/auto.py)
RATIO_SCOPES = ("layer", "pooled")  # reading 4: R_min/R_max per layer, or over all layers


@dataclass(frozen=True)
class LayerRule:
    """How one MoE layer routes: `route(logits [T, E]) -> Routing`, at most `width` slots per token."""

    position: int
    route: Callable[[torch.Tensor], Routing]
    width: int
    key_experts: torch.Tensor | None = None  # bool [E]: the experts Pick reinforces here
    # With the batch-aware step: the same rule without it, for forwards that are not decode steps.
    plain: Callable[[torch.Tensor], Routing] | None = None

    def routing(self, logits: torch.Tensor, *, decode: bool = True) -> Routing:
        """Returns the rule's routing of `logits`; off a decode step, without the batch-aware step."""
        return self.route(logits) if decode or self.plain is None else self.plain(logits)


@dataclass(frozen=True)
class RoutingPlan:
    """Per-layer routing rules for one method (and domain) on one model; layers not in `rules` keep
    the model's own routing."""

    method: str
    domain: str | None
    params: dict[str, Any]  # the hyperparameters in effect, JSON-friendly (tensors summarised)
    specs: tuple[RouterSpec, ...]  # one per MoE layer: the model's own rule
    rules: dict[int, LayerRule] = field(default_factory=dict)
    key_experts: torch.Tensor | None = None  # bool [M, E] when the method reads a domain's key experts
    ban_params: dict[str, Any] | None = None  # what Expected-K needs for ban/banpick
    # False when a rule builds state on the host per call (Pick C/D's range limit): no CUDA graph capture.
    graph_safe: bool = True
    # The batch-aware step after every layer's rule (routing.batch_share's keywords, and where its bound came
    # from), or None: each token routes alone. See `batch_aware_plan`.
    batch: dict[str, Any] | None = None

    @property
    def num_experts(self) -> int:
        return self.specs[0].num_experts

    @property
    def k_base(self) -> int:
        return self.specs[0].top_k

    @property
    def width(self) -> int:
        """Returns the most slots any layer's routing has per token (K_base when nothing widens it)."""
        return max([self.k_base, *(rule.width for rule in self.rules.values())])

    def route(self, position: int, logits: torch.Tensor, *, decode: bool = True) -> Routing:
        """Returns layer `position`'s routing of `logits` [T, E] under this plan; `decode=False` (a forward
        with a prefill in it) leaves out the batch-aware step (`batch_aware_plan`)."""
        rule = self.rules.get(position)
        if rule is not None:
            return rule.routing(logits, decode=decode)
        from banpick_cli.routing import route

        return route(logits, self.specs[position])

    def describe(self) -> dict[str, Any]:
        """Returns a JSON-friendly summary: method, domain, hyperparameters, changed layers, width."""
        out: dict[str, Any] = {
            "method": self.method,
            "domain": self.domain,
            "params": self.params,
            "changed_layers": sorted(self.rules),
            "width": self.width,
        }
        if self.key_experts is not None:
            out["key_experts_per_layer"] = self.key_experts.sum(-1).tolist()
        if self.batch is not None:
            out["batch_aware"] = self.batch
        return out



def build_plan(
    profile: RoutingProfile | None,
    specs: list[RouterSpec],
    method: str = "baseline",
    domain: str | None = None,
    *,
    batch_aware: bool | dict[str, Any] = False,
    **overrides: Any,
) -> RoutingPlan:
    """Returns the routing plan of `method` on the model whose routers `specs` describe.

    Hyperparameters come from the routing core's defaults, then the profile's settings
    (`settings["ban"]`, `settings["pick/<domain>"]`), then `overrides`. Raises ProfileError naming
    the stage to run when the profile lacks a tensor the method needs, BadSetting for an unknown
    method, hyperparameter or value. `domain="auto"` is not a plan: see `build_auto`. `batch_aware`
    (True, or batch_share's keywords such as {"candidates": 12}) adds the batch-aware step after the
    method's rule on every layer: see `batch_aware_plan`.
    """
    plan = _build(profile, specs, method, domain, overrides)
    return batch_aware_plan(plan, profile, batch_aware) if batch_aware else plan


def batch_aware_plan(plan: RoutingPlan, profile: RoutingProfile | None, given: bool | dict[str, Any]) -> RoutingPlan:
    """Returns `plan` with the routing core's batch-aware step (`routing.batch_share`) after every layer's rule.

    The candidate bound: `given["candidates"]`, else the one layer-sensitivity calibrated into the profile
    (`profile.batch`), else the router's top-2k (Pick C's range; the plan's `batch["source"]` says which).
    A token's experts then depend on the rest of its forward batch (docs/routing.md). The step runs on
    decode steps only: a runtime passes `decode=False` for a forward with a prefill in it, where a prompt's
    positions would otherwise share experts with each other (on the demo that cost 6 points of accuracy,
    docs/results.md), and decode is where the weight reads it saves are the cost.
    """
    from banpick_cli.routing import ANCHOR, batch_share, default_candidates, route

    args = dict(given) if isinstance(given, dict) else {}
    unknown = sorted(set(args) - {"candidates", "anchor"})
    if unknown:
        raise BadSetting(f"batch_aware takes candidates and anchor, not {', '.join(unknown)}")
    calibrated = profile.batch.settings if profile is not None else {}
    if "candidates" in args:
        source = "given"
    elif calibrated.get("candidates") is not None:  # the calibrated bound, with the anchor it was calibrated at
        args["candidates"], source = int(calibrated["candidates"]), "calibrated by layer-sensitivity"
        args.setdefault("anchor", int(calibrated.get("anchor", ANCHOR)))
    else:
        args["candidates"], source = default_candidates(plan.specs[0]), "router top-2k (the profile has no calibration)"
    args.setdefault("anchor", ANCHOR)
    rules = {}
    for position, spec in enumerate(plan.specs):
        inner = plan.rules.get(position)
        own = inner.route if inner is not None else (lambda x, s=spec: route(x, s))
        shared = _rule(position, spec, lambda x, s=spec, f=own: batch_share(x, s, f(x), **args),
                       inner.key_experts if inner is not None else None)
        rules[position] = replace(shared, plain=own)
    return replace(plan, rules=rules, batch={**args, "source": source, "steps": "decode"})


def _build(profile, specs, method, domain, overrides) -> RoutingPlan:
    record = get_method(method)
    if domain == AUTO:
        raise BadSetting("domain 'auto' chooses a plan per request: call runtime.auto.build_auto")
    _check_overrides(method, overrides)
    if record.rules is None:
        return RoutingPlan(method, None, {}, tuple(specs))
    if profile is None and record.needs_profile:
        raise ProfileError(f"method '{method}' needs a routing profile")
    if profile is not None:
        _check_shape(profile, specs)
    if record.takes_domain and not domain:
        listed = profile.key_domains()
        raise BadSetting(f"method '{method}' needs a domain (--domain); the profile has key experts for: "
                         f"{', '.join(listed) or 'none'}")
    builder = resolve(record.rules)
    return builder(profile, list(specs), record, domain if record.takes_domain else None, dict(overrides))


def key_experts(profile: RoutingProfile, domain: str) -> torch.Tensor:
    """Returns the domain's key experts (bool [M, E]) or raises naming the stage that writes them."""
    return profile.domain(domain).key_experts


# --- builders: a Method record names one of these (or its own) as its `rules` -----------------


def pick_rules(profile, specs, record: Method, domain, overrides) -> RoutingPlan:
    method = record.name
    key = key_experts(profile, domain)
    params = {**record.defaults(), **_recorded(profile.domain(domain).recorded_pick(), record), **overrides}
    rules = {}
    for position, spec in enumerate(specs):
        layer_key = key[position]
        if not bool(layer_key.any()):  # reading 18: Pick acts only where a layer has key experts
            continue
        rules[position] = _rule(position, spec, lambda x, s=spec, k=layer_key: pick(x, s, k, **params), layer_key)
    # Pick C and D build their range limit on the host from each call's logits.
    return RoutingPlan(method, domain, _public(params), tuple(specs), rules, key_experts=key,
                       graph_safe=params.get("strategy") not in ("C", "D"))


def ban_rules(profile, specs, record: Method, domain, overrides) -> RoutingPlan:
    method = record.name
    params, per_layer = _ban_setup(profile, record, overrides)
    rules = {
        position: _rule(position, spec, _checked(lambda: ban_rule(spec, *args, **params)))
        for position, (spec, args) in enumerate(zip(specs, per_layer))
        # K_min == K_base prunes nothing, and the weights are then the model's own: leave the layer be.
        if params.get("k_min", 0) < spec.top_k or params.get("reweight", "model") != "model"
    }
    return RoutingPlan(method, None, _public(params) | _ratio_note(overrides, profile), tuple(specs), rules,
                       ban_params=_ban_record(params, per_layer))


def banpick_rules(profile, specs, record: Method, domain, overrides) -> RoutingPlan:
    method = record.name
    key = key_experts(profile, domain)
    pick_settings = {k: v for k, v in _recorded(profile.domain(domain).recorded_pick(), record).items() if k == "range_factor"}
    params, per_layer = _ban_setup(profile, record, {**pick_settings, **overrides})
    rules = {
        position: _rule(position, spec, _checked(lambda: ban_pick_rule(spec, key[position], *args, **params)),
                        key[position])
        for position, (spec, args) in enumerate(zip(specs, per_layer))
    }
    return RoutingPlan(method, domain, _public(params) | _ratio_note(overrides, profile), tuple(specs), rules,
                       key_experts=key, ban_params=_ban_record(params, per_layer))


def per_layer_rules(profile, specs, record: Method, domain, overrides) -> RoutingPlan:
    method = record.name
    params = {**record.defaults(), **overrides}
    _require(record, params)
    fn = record.function
    rules = {}
    for position, spec in enumerate(specs):
        layer_params = dict(params)
        if record.knob is not None and record.knob.search == "layer_mix":
            knob = record.knob.name  # Fixed-K's k: one integer, or one per MoE layer
            layer_params[knob] = _per_layer_k(params[knob], position, len(specs))
            if layer_params[knob] == spec.top_k:  # the model's own top-k: leave the layer be
                continue
        if "thresholds" in params:  # DES medians: [n] pooled, or [M, n] per layer (reading 22)
            layer_params["thresholds"] = _per_layer(params["thresholds"], position, len(specs), "thresholds")
        if "key_tokens" in record.required:  # ODP: its key tokens change with every batch
            layer_params["key_tokens"] = _provider(params["key_tokens"])
            rules[position] = _rule(
                position, spec, lambda x, s=spec, p=layer_params: fn(x, s, **{**p, "key_tokens": p["key_tokens"](x.shape[0])}),
                probe=lambda x, s=spec, p=layer_params: fn(x, s, **{**p, "key_tokens": torch.zeros(x.shape[0], dtype=torch.bool)}))
        else:
            rules[position] = _rule(position, spec, lambda x, s=spec, p=layer_params: fn(x, s, **p))
    return RoutingPlan(method, None, _public(params), tuple(specs), rules)


def rice_rules(profile, specs, record: Method, domain, overrides) -> RoutingPlan:
    method = record.name
    params = {**record.defaults(), **overrides}
    _require(record, params)
    cognitive = params["cognitive_experts"]
    rules = {}
    for position, spec in enumerate(specs):
        layer_cognitive = _per_layer(cognitive, position, len(specs), "cognitive_experts")
        if isinstance(layer_cognitive, torch.Tensor) and not bool(layer_cognitive.any()):
            continue
        p = {**params, "cognitive_experts": layer_cognitive}
        rules[position] = _rule(position, spec, lambda x, s=spec, p=p: rice(x, s, **p))
    return RoutingPlan(method, None, _public(params), tuple(specs), rules)


# --- helpers -----------------------------------------------------------------------------------


def _ban_setup(profile: RoutingProfile, record: Method, overrides: dict) -> tuple[dict, list[tuple[float, float, float]]]:
    profile.check_values([profile.ban.name_of(part) for part in ("layer_sensitivity", "ratio_min", "ratio_max")])
    sensitivity = profile.ban.layer_sensitivity
    r_min, r_max = profile.ban.ratio_min, profile.ban.ratio_max
    params = {**record.defaults(), **_recorded(profile.ban.settings, record), **overrides}
    # The routing core's own rule, against this model's K_base: K_min above it would leave every layer
    # untouched (the baseline, reported as Ban), and lambda inf/NaN would make K meaningless.
    try:
        check_ban_params(k_base=profile.model.k_base, k_min=params.get("k_min", K_MIN), lam=params.get("lam", LAM),
                         beta=params.get("beta", BETA))
    except ValueError as err:
        raise BadSetting(f"Ban setting: {err}") from None
    scope = params.pop("ratio_scope", "layer")
    if scope not in RATIO_SCOPES:
        raise BadSetting(f"ratio_scope must be one of {RATIO_SCOPES}, got {scope!r}")
    if scope == "pooled":  # one range over every layer's tokens: layer-sensitivity records it (reading 4)
        recorded = profile.ban.settings
        lo = recorded.get("ratio_min_global", float(r_min.min()))
        hi = recorded.get("ratio_max_global", float(r_max.max()))
        r_min, r_max = torch.full_like(r_min, float(lo)), torch.full_like(r_max, float(hi))
    # Python floats, read once here: the per-token code then never syncs with the device.
    per_layer = [(float(s), float(lo), float(hi)) for s, lo, hi in zip(sensitivity, r_min, r_max)]
    bad = [i for i, (s, lo, hi) in enumerate(per_layer) if not all(math.isfinite(v) for v in (s, lo, hi))]
    if bad:
        raise ProfileError(f"Ban's pooled R range (ratio_min_global, ratio_max_global) is not finite at MoE layer(s) "
                           f"{bad}: rerun `banpick layer-sensitivity`")
    return params, per_layer


def _ban_record(params: dict, per_layer: list) -> dict:
    keys = ("k_min", "lam", "beta", "clip")
    return {**{k: params[k] for k in keys if k in params}, "per_layer": per_layer}


def _ratio_note(overrides: dict, profile: RoutingProfile) -> dict:
    return {"ratio_scope": overrides.get("ratio_scope", profile.ban.settings.get("ratio_scope", "layer"))}


def _checked(build: Callable[[], Callable[[torch.Tensor], Routing]]) -> Callable[[torch.Tensor], Routing]:
    # A routing core rule built once per layer (its knobs checked and constants taken at the build), a bad
    # hyperparameter failing as one line naming it.
    try:
        return build()
    except ValueError as err:
        raise BadSetting(str(err)) from None


def _rule(position: int, spec: RouterSpec, fn: Callable[[torch.Tensor], Routing], key: torch.Tensor | None = None,
          *, probe: Callable[[torch.Tensor], Routing] | None = None) -> LayerRule:
    # Run the rule once on a dummy token: a bad hyperparameter fails here, as one line naming it,
    # not in the middle of a forward pass; and the width is the core's, not our guess.
    logits = torch.linspace(1.0, -1.0, spec.num_experts).unsqueeze(0)
    try:
        width = (probe or fn)(logits).width
    except ValueError as err:
        raise BadSetting(str(err)) from None
    return LayerRule(position, fn, width, key)



def _recorded(stored: dict[str, Any], record: Method) -> dict[str, Any]:
    """Returns the stage settings stored under `key` that `method` takes (layer-sensitivity records
    k_min, lambda, beta, ratio_k_num, ratio_scope; failure-probe strategy, range_factor)."""
    allowed = set(record.params())
    return {k: v for k, v in stored.items() if k in allowed}


def _check_overrides(method: str, overrides: dict) -> None:
    allowed = allowed_params(method)
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        accepts = ", ".join(allowed) or "no hyperparameters"
        raise BadSetting(f"method '{method}' has no hyperparameter {', '.join(map(repr, unknown))}; it accepts: {accepts}")


def _require(record: Method, params: dict) -> None:
    missing = [n for n in record.required if params.get(n) is None]
    if missing:
        raise BadSetting(f"method '{record.name}' needs {', '.join(missing)} (pass {missing[0]}=... to apply)")


def _per_layer(value: Any, position: int, layers: int, name: str) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() == 2:
        if value.shape[0] != layers:
            raise BadSetting(f"{name} has {value.shape[0]} rows; the model has {layers} MoE layers")
        return value[position]
    return value


def _per_layer_k(value: Any, position: int, layers: int) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != layers:
            raise BadSetting(f"k has {len(value)} values; the model has {layers} MoE layers (give one k, or one per layer)")
        return value[position]
    return value


def _provider(value: Any) -> Callable[[int], torch.Tensor]:
    # ODP's key tokens change with every batch: a callable returning bool [T], or a fixed tensor.
    if callable(value):
        return value
    return lambda tokens: value


def _public(params: dict[str, Any]) -> dict[str, Any]:
    def show(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return f"tensor{list(v.shape)}"
        if callable(v):
            return "callable"
        return v

    return {k: show(v) for k, v in params.items()}


def _check_shape(profile: RoutingProfile, specs: list[RouterSpec]) -> None:
    m = profile.model
    if len(specs) != len(m.moe_layers) or specs[0].num_experts != m.num_experts or specs[0].top_k != m.k_base:
        raise ProfileError(
            f"the profile describes {len(m.moe_layers)} MoE layers x {m.num_experts} experts, top-{m.k_base}; "
            f"this model has {len(specs)} x {specs[0].num_experts}, top-{specs[0].top_k}"
        )
