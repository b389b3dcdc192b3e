"""The routing methods: one record each, carrying everything any consumer asks of a method.

A record says how the method routes (its routing-core function and the plan builder that lays it over
layers), what it expects of Avg-TopK, which knob sets its expert budget and how a solver searches it,
which hyperparameters a caller must give, what profile data it reads, and whether the engines serve it.
The plan, the budget solver, eval's rows, export and the engine plugins ask the record, never the name.

Adding a method is one record (and, when it routes in a new way, one routing-core function). A record
may live in another package: an entry point in the group `banpick.methods` whose object is a `Method`
(or a callable returning one or several) is registered when this module is first imported.

Functions are named as "module:attribute" and imported on first use (as lm-evaluation-harness's registry
does), so this module, and `banpick --help` which lists the methods, import no torch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cached_property
from importlib import import_module
from typing import Any, Callable

from banpick_cli.errors import BadSetting

ENTRY_POINTS = "banpick.methods"
# Arguments the plan fills itself (from the model or the profile), never a hyperparameter.
FROM_PROFILE = frozenset({"logits", "spec", "key_experts", "layer_sensitivity", "r_min", "r_max", "base"})
SEARCHES = ("bisect", "layer_mix", "quantile")
PLAN = "banpick_cli.runtime.plan"
EXPECT = "banpick_cli.runtime.expect"


def resolve(ref: str) -> Any:
    """Returns the object a "module:attribute" reference names."""
    module, _, attr = ref.partition(":")
    return getattr(import_module(module), attr)


@dataclass(frozen=True)
class Knob:
    """The hyperparameter that sets a method's expert budget, and how a budget solver searches it.

    search: "bisect" (a float between `low` and `high`, Avg-TopK nondecreasing in it; high None: doubled
    from 1 until the target is reached), "layer_mix" (an integer per MoE layer, floor and ceil of the
    target over evenly spaced layers), "quantile" (per-layer thresholds at one quantile of the DES ratios
    on calibration logits). `flag`: eval's list flag that sweeps it (one row per value), if any.
    """

    name: str
    search: str
    low: float = 0.0
    high: float | None = None
    symbol: str = ""  # how a row's label spells it: "λ" -> ban(λ=0.5)
    flag: str | None = None

    def __post_init__(self) -> None:
        if self.search not in SEARCHES:
            raise ValueError(f"knob search must be one of {SEARCHES}, got {self.search!r}")

    def label(self, method_label: str, value: Any) -> str:
        """Returns a row label for the method at this knob value: "ban(λ=0.5)"."""
        shown = f"{value:g}" if isinstance(value, (int, float)) else str(value)
        return f"{method_label}({self.symbol or self.name}={shown})"


@dataclass(frozen=True)
class Method:
    """One routing method and everything the plan, the solver, eval, export and the engines ask of it.

    core: the routing-core function ("module:function"; None: the model's own routing).
    rules: the plan builder laying it over MoE layers ("module:function", signature of
        runtime.plan.per_layer_rules); None: no layer changes.
    expect: its expected experts per token from the profile ("module:function" of (plan, profile)).
    reads: the profile data it routes with ("key_experts" of a domain, "ban" tensors); none: no profile.
    engines: served by the vLLM and SGLang plugins. knob: its budget knob (None: prunes nothing by design).
    required: hyperparameters no profile stage writes, which the caller (or eval's calibration) supplies.
    extra: plan-level hyperparameters beyond the core's keywords. shown: given hyperparameters that join
    eval's row label ("pick(C)").
    """

    name: str
    label: str
    core: str | None
    rules: str | None
    expect: str
    reads: tuple[str, ...] = ()
    engines: bool = False
    knob: Knob | None = None
    required: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    shown: tuple[str, ...] = ()

    @property
    def takes_domain(self) -> bool:
        """Returns True when the method reads a domain's key experts (and so needs --domain or auto)."""
        return "key_experts" in self.reads

    @property
    def needs_profile(self) -> bool:
        return bool(self.reads)

    @property
    def prunes_by_token(self) -> bool:
        """Returns True when its expert count is Ban's per-token K (it reads the Ban tensors)."""
        return "ban" in self.reads

    @cached_property
    def function(self) -> Callable[..., Any] | None:
        """Returns the routing-core function, imported on first use."""
        return resolve(self.core) if self.core else None

    def params(self) -> tuple[str, ...]:
        """Returns the hyperparameter names the method accepts as overrides."""
        if self.function is None:
            return ()
        names = [n for n in inspect.signature(self.function).parameters if n not in FROM_PROFILE]
        return tuple(names) + self.extra

    def defaults(self) -> dict[str, Any]:
        """Returns the routing core's own defaults for the method's hyperparameters (one home: the core)."""
        if self.function is None:
            return {}
        return {n: p.default for n, p in inspect.signature(self.function).parameters.items()
                if n not in FROM_PROFILE and p.default is not inspect.Parameter.empty and n != "key_tokens"}

    def row_label(self, given: dict[str, Any]) -> str:
        """Returns eval's label for a row run with `given` hyperparameters: "pick" or "pick(C)"."""
        shown = [f"{given[n]:g}" if isinstance(given[n], float) else str(given[n]) for n in self.shown
                 if given.get(n) is not None]
        return f"{self.label}({', '.join(shown)})" if shown else self.label


_BAN = ("ban",)
LAM = Knob("lam", "bisect", 0.0, None, "λ", "--lambda")

REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Adds a method to the registry (refusing a second record of the same name) and returns it."""
    if not isinstance(method, Method):
        raise TypeError(f"a banpick method must be a runtime.methods.Method, got {type(method).__name__}")
    if method.name in REGISTRY and REGISTRY[method.name] != method:
        raise ValueError(f"method '{method.name}' is already registered")
    REGISTRY[method.name] = method
    return method


for _record in (
    Method("baseline", "baseline", None, None, f"{EXPECT}:model_k", engines=True),
    Method("pick", "pick", "banpick_cli.routing:pick", f"{PLAN}:pick_rules", f"{EXPECT}:pick_k",
           reads=("key_experts",), engines=True, shown=("strategy",)),
    Method("ban", "ban", "banpick_cli.routing:ban", f"{PLAN}:ban_rules", f"{EXPECT}:ban_k",
           reads=_BAN, engines=True, knob=LAM, extra=("ratio_scope",)),
    Method("banpick", "ban&pick", "banpick_cli.routing:ban_pick", f"{PLAN}:banpick_rules", f"{EXPECT}:banpick_k",
           reads=("key_experts", *_BAN), engines=True, knob=LAM, extra=("ratio_scope",)),
    # k: one integer, or one per MoE layer (a budget between two integers: the layer_mix search).
    Method("fixed-k", "fixed-k", "banpick_cli.routing:fixed_k", f"{PLAN}:per_layer_rules", f"{EXPECT}:width_k",
           engines=True, knob=Knob("k", "layer_mix", symbol="k", flag="--k"), required=("k",)),
    Method("dynamic", "dynamic", "banpick_cli.routing:dynamic", f"{PLAN}:per_layer_rules", f"{EXPECT}:up_to_width_k",
           engines=True, knob=Knob("tau", "bisect", 1e-4, 1.0, "τ", "--tau"), required=("tau",)),
    Method("des", "des", "banpick_cli.routing:des", f"{PLAN}:per_layer_rules", f"{EXPECT}:des_k",
           knob=Knob("thresholds", "quantile", symbol="q"), required=("thresholds",)),
    Method("odp", "odp", "banpick_cli.routing:odp", f"{PLAN}:per_layer_rules", f"{EXPECT}:des_k",
           knob=Knob("thresholds", "quantile", symbol="q"), required=("thresholds", "key_tokens")),
    Method("rice", "rice", "banpick_cli.routing:rice", f"{PLAN}:rice_rules", f"{EXPECT}:model_k",
           required=("cognitive_experts", "factor"), shown=("factor",)),
):
    register(_record)


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINTS):
        try:
            found = point.load()
            found = found() if callable(found) and not isinstance(found, Method) else found
            for method in found if isinstance(found, (list, tuple)) else (found,):
                register(method)
        except Exception as err:  # a broken plugin must not take banpick down: name it and go on
            import logging

            logging.getLogger("banpick").warning("banpick: method plugin %s (%s) not loaded: %s", point.name,
                                                 point.value, str(err).splitlines()[0] if str(err) else type(err).__name__)


_load_entry_points()


def names(where: Callable[[Method], bool] = lambda m: True) -> tuple[str, ...]:
    """Returns the registered method names, in registration order, of records for which `where` holds."""
    return tuple(name for name, record in REGISTRY.items() if where(record))


_VIEWS: dict[str, Callable[[Method], bool]] = {
    "METHODS": lambda m: True, "DOMAIN_METHODS": lambda m: m.takes_domain,
    "ENGINE_METHODS": lambda m: m.engines, "PROFILE_METHODS": lambda m: m.needs_profile,
}


def __getattr__(name: str) -> tuple[str, ...]:
    # METHODS, ENGINE_METHODS, ...: read at use, so a method registered later is in them.
    if name in _VIEWS:
        return names(_VIEWS[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_method(name: str) -> Method:
    """Returns the method's record, or raises a one-line BadSetting listing the known ones."""
    if name not in REGISTRY:
        raise BadSetting(f"unknown method '{name}'; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def allowed_params(method: str) -> tuple[str, ...]:
    """Returns the hyperparameter names `method` accepts as overrides."""
    return get_method(method).params()
