"""The routing methods: one record each, read by the plan, eval, export, the CLI and the engine plugins.

Adding a method is one record here (and, when it routes in a new way, a function in the routing core).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from banpick_cli.errors import BadSetting
from banpick_cli.routing import Routing, ban, ban_pick, des, dynamic, fixed_k, odp, pick, rice

# Arguments the plan fills itself (from the model or the profile), never a hyperparameter.
FROM_PROFILE = frozenset({"logits", "spec", "key_experts", "layer_sensitivity", "r_min", "r_max", "base"})


@dataclass(frozen=True)
class Method:
    """One routing method: its routing-core function and what it needs to run.

    `reads`: the profile data it routes with ("key_experts" of a domain, "ban" tensors); a method that
    reads none runs without a profile. `build`: how the plan is laid over layers (runtime/plan.py).
    `knob`: the hyperparameter that sets its expert budget (None: it prunes nothing by design).
    """

    name: str
    label: str  # as eval's table names it
    core: Callable[..., Routing] | None
    build: str  # "none" | "pick" | "ban" | "banpick" | "per_layer" | "rice"
    reads: tuple[str, ...] = ()
    engines: bool = False  # served by the vLLM and SGLang plugins
    knob: str | None = None
    required: tuple[str, ...] = ()  # hyperparameters no profile stage writes: the caller supplies them
    extra: tuple[str, ...] = ()  # plan-level hyperparameters beyond the core's keywords

    @property
    def takes_domain(self) -> bool:
        """Returns True when the method reads a domain's key experts (and so needs --domain or auto)."""
        return "key_experts" in self.reads

    @property
    def needs_profile(self) -> bool:
        return bool(self.reads)

    def params(self) -> tuple[str, ...]:
        """Returns the hyperparameter names the method accepts as overrides."""
        if self.core is None:
            return ()
        names = [n for n in inspect.signature(self.core).parameters if n not in FROM_PROFILE]
        return tuple(names) + self.extra

    def defaults(self) -> dict[str, Any]:
        """Returns the routing core's own defaults for the method's hyperparameters (one home: the core)."""
        if self.core is None:
            return {}
        return {n: p.default for n, p in inspect.signature(self.core).parameters.items()
                if n not in FROM_PROFILE and p.default is not inspect.Parameter.empty and n != "key_tokens"}


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("baseline", "baseline", None, "none", engines=True),
    Method("pick", "pick", pick, "pick", reads=("key_experts",), engines=True),
    Method("ban", "ban", ban, "ban", reads=("ban",), engines=True, knob="lam", extra=("ratio_scope",)),
    Method("banpick", "ban&pick", ban_pick, "banpick", reads=("key_experts", "ban"), engines=True, knob="lam",
           extra=("ratio_scope",)),
    # k: one integer, or one per MoE layer (a budget between two integers, runtime/budget.py).
    Method("fixed-k", "fixed-k", fixed_k, "per_layer", engines=True, knob="k", required=("k",)),
    Method("dynamic", "dynamic", dynamic, "per_layer", engines=True, knob="tau", required=("tau",)),
    Method("des", "des", des, "per_layer", knob="thresholds", required=("thresholds",)),
    Method("odp", "odp", odp, "per_layer", knob="thresholds", required=("thresholds", "key_tokens")),
    Method("rice", "rice", rice, "rice", required=("cognitive_experts", "factor")),
)}

METHODS = tuple(REGISTRY)
DOMAIN_METHODS = tuple(m.name for m in REGISTRY.values() if m.takes_domain)
ENGINE_METHODS = tuple(m.name for m in REGISTRY.values() if m.engines)
PROFILE_METHODS = tuple(m.name for m in REGISTRY.values() if m.needs_profile)


def get_method(name: str) -> Method:
    """Returns the method's record, or raises a one-line BadSetting listing the known ones."""
    if name not in REGISTRY:
        raise BadSetting(f"unknown method '{name}'; known: {', '.join(METHODS)}")
    return REGISTRY[name]


def allowed_params(method: str) -> tuple[str, ...]:
    """Returns the hyperparameter names `method` accepts as overrides."""
    return get_method(method).params()
