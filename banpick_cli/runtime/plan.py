"""The routing plan: what each MoE layer needs to route by a method, built from a profile.

One plan serves every runtime (the HF context manager and the engine plugins): per changed layer, a
function from router logits [T, E] to a `Routing`, closed over that layer's tensors and the
method's hyperparameters, all calling the routing core. Layers the method leaves alone get no rule.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from banpick_cli.errors import BadSetting, ProfileError
from banpick_cli.profile.format import RoutingProfile
from banpick_cli.routing import RouterSpec, Routing, ban, ban_pick, des, dynamic, odp, pick, rice

METHODS = ("baseline", "pick", "ban", "banpick", "dynamic", "des", "odp", "rice")
# Methods that read a domain's key experts; "auto" picks the domain per request (runtime/auto.py).
DOMAIN_METHODS = ("pick", "banpick")
AUTO = "auto"
RATIO_SCOPES = ("layer", "pooled")  # reading 4: R_min/R_max per layer, or over all layers

_CORE: dict[str, Callable[..., Routing]] = {
    "pick": pick, "ban": ban, "banpick": ban_pick, "dynamic": dynamic, "des": des, "odp": odp, "rice": rice,
}
# Arguments the plan fills itself from the profile, never a hyperparameter.
_FROM_PROFILE = {"logits", "spec", "key_experts", "layer_sensitivity", "r_min", "r_max", "base"}
# Hyperparameters a method cannot run without (no profile stage writes them yet: eval supplies them).
_REQUIRED = {"dynamic": ("tau",), "des": ("thresholds",), "odp": ("thresholds", "key_tokens"),
             "rice": ("cognitive_experts", "factor")}
_EXTRA = {"ban": ("ratio_scope",), "banpick": ("ratio_scope",)}


@dataclass(frozen=True)
class LayerRule:
    """How one MoE layer routes: `route(logits [T, E]) -> Routing`, at most `width` slots per token."""

    position: int
    route: Callable[[torch.Tensor], Routing]
    width: int
    key_experts: torch.Tensor | None = None  # bool [E]: the experts Pick reinforces here


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

    def route(self, position: int, logits: torch.Tensor) -> Routing:
        """Returns layer `position`'s routing of `logits` [T, E] under this plan."""
        rule = self.rules.get(position)
        if rule is not None:
            return rule.route(logits)
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
        return out


def specs_from_identity(profile: RoutingProfile, correction_bias: list[torch.Tensor | None] | None = None) -> list[RouterSpec]:
    """Returns one RouterSpec per MoE layer from the profile's model description.

    For engines, which have no transformers adapter: DeepSeek-V3's correction bias is per layer
    and lives in the engine's router, so the caller passes it.
    """
    m = profile.model
    biases = correction_bias or [None] * len(m.moe_layers)
    return [
        RouterSpec(m.num_experts, m.k_base, m.scoring, m.renormalize, m.routed_scaling_factor, m.topk_method,
                   m.n_group, m.topk_group, bias)
        for bias in biases
    ]


def build_plan(
    profile: RoutingProfile | None,
    specs: list[RouterSpec],
    method: str = "baseline",
    domain: str | None = None,
    **overrides: Any,
) -> RoutingPlan:
    """Returns the routing plan of `method` on the model whose routers `specs` describe.

    Hyperparameters come from the routing core's defaults, then the profile's settings
    (`settings["ban"]`, `settings["pick/<domain>"]`), then `overrides`. Raises ProfileError naming
    the stage to run when the profile lacks a tensor the method needs, BadSetting for an unknown
    method, hyperparameter or value. `domain="auto"` is not a plan: see `build_auto`.
    """
    if method not in METHODS:
        raise BadSetting(f"unknown method '{method}'; known: {', '.join(METHODS)}")
    if domain == AUTO:
        raise BadSetting("domain 'auto' chooses a plan per request: call runtime.auto.build_auto")
    _check_overrides(method, overrides)
    if method == "baseline":
        return RoutingPlan("baseline", None, {}, tuple(specs))
    if profile is None and method in ("pick", "ban", "banpick"):
        raise ProfileError(f"method '{method}' needs a routing profile")
    if profile is not None:
        _check_shape(profile, specs)
    if method in DOMAIN_METHODS and not domain:
        listed = _key_domains(profile)
        raise BadSetting(f"method '{method}' needs a domain (--domain); the profile has key experts for: "
                         f"{', '.join(listed) or 'none'}")
    builder = {"pick": _pick, "ban": _ban, "banpick": _banpick, "rice": _rice}.get(method, _des_like)
    return builder(profile, list(specs), method, domain if method in DOMAIN_METHODS else None, dict(overrides))


def allowed_params(method: str) -> tuple[str, ...]:
    """Returns the hyperparameter names `method` accepts as overrides."""
    if method == "baseline":
        return ()
    names = [n for n in inspect.signature(_CORE[method]).parameters if n not in _FROM_PROFILE]
    return tuple(names) + _EXTRA.get(method, ())


def key_experts(profile: RoutingProfile, domain: str) -> torch.Tensor:
    """Returns the domain's key experts (bool [M, E]) or raises naming the stage that writes them."""
    return profile.get(f"domain/{domain}/key_experts")


# --- builders ----------------------------------------------------------------------------------


def _pick(profile, specs, method, domain, overrides) -> RoutingPlan:
    key = key_experts(profile, domain)
    params = {**_defaults("pick"), **_settings(profile, f"pick/{domain}", "pick"), **overrides}
    rules = {}
    for position, spec in enumerate(specs):
        layer_key = key[position]
        if not bool(layer_key.any()):  # reading 18: Pick acts only where a layer has key experts
            continue
        rules[position] = _rule(position, spec, lambda x, s=spec, k=layer_key: pick(x, s, k, **params), layer_key)
    return RoutingPlan(method, domain, _public(params), tuple(specs), rules, key_experts=key)


def _ban(profile, specs, method, domain, overrides) -> RoutingPlan:
    params, per_layer = _ban_setup(profile, "ban", overrides)
    rules = {
        position: _rule(position, spec, lambda x, s=spec, a=args: ban(x, s, *a, **params))
        for position, (spec, args) in enumerate(zip(specs, per_layer))
        # K_min == K_base prunes nothing, and the weights are then the model's own: leave the layer be.
        if params.get("k_min", 0) < spec.top_k or params.get("reweight", "model") != "model"
    }
    return RoutingPlan(method, None, _public(params) | _ratio_note(overrides, profile), tuple(specs), rules,
                       ban_params=_ban_record(params, per_layer))


def _banpick(profile, specs, method, domain, overrides) -> RoutingPlan:
    key = key_experts(profile, domain)
    pick_settings = {k: v for k, v in _settings(profile, f"pick/{domain}", "banpick").items() if k == "range_factor"}
    params, per_layer = _ban_setup(profile, "banpick", {**pick_settings, **overrides})
    rules = {
        position: _rule(position, spec, lambda x, s=spec, k=key[position], a=args: ban_pick(x, s, k, *a, **params),
                        key[position])
        for position, (spec, args) in enumerate(zip(specs, per_layer))
    }
    return RoutingPlan(method, domain, _public(params) | _ratio_note(overrides, profile), tuple(specs), rules,
                       key_experts=key, ban_params=_ban_record(params, per_layer))


def _des_like(profile, specs, method, domain, overrides) -> RoutingPlan:
    params = {**_defaults(method), **overrides}
    _require(method, params)
    fn = _CORE[method]
    rules = {}
    for position, spec in enumerate(specs):
        layer_params = dict(params)
        if "thresholds" in params:  # DES medians: [n] pooled, or [M, n] per layer (reading 22)
            layer_params["thresholds"] = _per_layer(params["thresholds"], position, len(specs), "thresholds")
        if method == "odp":
            layer_params["key_tokens"] = _provider(params["key_tokens"])
            rules[position] = _rule(
                position, spec, lambda x, s=spec, p=layer_params: fn(x, s, **{**p, "key_tokens": p["key_tokens"](x.shape[0])}),
                probe=lambda x, s=spec, p=layer_params: fn(x, s, **{**p, "key_tokens": torch.zeros(x.shape[0], dtype=torch.bool)}))
        else:
            rules[position] = _rule(position, spec, lambda x, s=spec, p=layer_params: fn(x, s, **p))
    return RoutingPlan(method, None, _public(params), tuple(specs), rules)


def _rice(profile, specs, method, domain, overrides) -> RoutingPlan:
    params = {**_defaults("rice"), **overrides}
    _require("rice", params)
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


def _ban_setup(profile: RoutingProfile, method: str, overrides: dict) -> tuple[dict, list[tuple[float, float, float]]]:
    sensitivity = profile.get("ban/layer_sensitivity")
    r_min, r_max = profile.get("ban/ratio_min"), profile.get("ban/ratio_max")
    params = {**_defaults(method), **_settings(profile, "ban", method), **overrides}
    scope = params.pop("ratio_scope", "layer")
    if scope not in RATIO_SCOPES:
        raise BadSetting(f"ratio_scope must be one of {RATIO_SCOPES}, got {scope!r}")
    if scope == "pooled":  # one range over every layer's tokens: layer-sensitivity records it (reading 4)
        recorded = profile.settings.get("ban", {})
        lo = recorded.get("ratio_min_global", float(r_min.min()))
        hi = recorded.get("ratio_max_global", float(r_max.max()))
        r_min, r_max = torch.full_like(r_min, float(lo)), torch.full_like(r_max, float(hi))
    # Python floats, read once here: the per-token code then never syncs with the device.
    per_layer = [(float(s), float(lo), float(hi)) for s, lo, hi in zip(sensitivity, r_min, r_max)]
    bad = [i for i, (s, lo, hi) in enumerate(per_layer) if not all(math.isfinite(v) for v in (s, lo, hi))]
    if bad:
        raise ProfileError(f"ban tensors hold NaN/inf at MoE layer(s) {bad}: rerun `banpick layer-sensitivity`")
    return params, per_layer


def _ban_record(params: dict, per_layer: list) -> dict:
    keys = ("k_min", "lam", "beta", "clip")
    return {**{k: params[k] for k in keys if k in params}, "per_layer": per_layer}


def _ratio_note(overrides: dict, profile: RoutingProfile) -> dict:
    return {"ratio_scope": overrides.get("ratio_scope", profile.settings.get("ban", {}).get("ratio_scope", "layer"))}


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


def _defaults(method: str) -> dict[str, Any]:
    """Returns the routing core's own defaults for a method's hyperparameters (one home: the core)."""
    params = inspect.signature(_CORE[method]).parameters
    return {n: p.default for n, p in params.items()
            if n not in _FROM_PROFILE and p.default is not inspect.Parameter.empty and n != "key_tokens"}


# Names a stage records under another spelling than the routing core's keyword.
_SETTING_ALIASES = {"lambda": "lam"}


def _settings(profile: RoutingProfile, key: str, method: str) -> dict[str, Any]:
    """Returns the stage settings stored under `key` that `method` takes (layer-sensitivity records
    k_min, lambda, beta, ratio_k_num, ratio_scope; failure-probe strategy, range_factor)."""
    allowed = set(allowed_params(method))
    recorded = {_SETTING_ALIASES.get(k, k): v for k, v in profile.settings.get(key, {}).items()}
    return {k: v for k, v in recorded.items() if k in allowed}


def _check_overrides(method: str, overrides: dict) -> None:
    allowed = allowed_params(method)
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        accepts = ", ".join(allowed) or "no hyperparameters"
        raise BadSetting(f"method '{method}' has no hyperparameter {', '.join(map(repr, unknown))}; it accepts: {accepts}")


def _require(method: str, params: dict) -> None:
    missing = [n for n in _REQUIRED.get(method, ()) if params.get(n) is None]
    if missing:
        raise BadSetting(f"method '{method}' needs {', '.join(missing)} (pass {missing[0]}=... to apply)")


def _per_layer(value: Any, position: int, layers: int, name: str) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() == 2:
        if value.shape[0] != layers:
            raise BadSetting(f"{name} has {value.shape[0]} rows; the model has {layers} MoE layers")
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


def _key_domains(profile: RoutingProfile) -> list[str]:
    return sorted({name.split("/")[1] for name in profile.tensors if name.endswith("/key_experts")})
