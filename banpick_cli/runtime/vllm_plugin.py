"""vLLM plugin: `vllm.general_plugins` entry point `banpick = banpick_cli.runtime.vllm_plugin:register`.

With BANPICK_PROFILE set, every vLLM process that loads the model (each worker, TP/DP rank) checks
the profile against the loaded routers after weights are loaded, and reroutes each MoE layer the
plan changes by shadowing that layer router's `_compute_routing` (vLLM's routers are objects since
the MoE router refactor, PR #30623; see docs/runtimes.md for the source lines). Without
BANPICK_PROFILE the plugin does nothing. Targets vLLM >=0.26,<0.34 (SUPPORTED).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from banpick_cli.runtime.engine import (
    LAYER_RE,
    EngineRouter,
    EngineUnsupported,
    check_version,
    gate_modules,
    read_env,
)

logger = logging.getLogger("banpick")
# tests/engines/ ran on 0.26.0 and 0.33.0; the seams in between were read in each release's wheel
# (docs/runtimes.md, "vLLM versions").
SUPPORTED = ((0, 26), (0, 34))
_MARK = "_banpick_wrapped"
_armed = False


def register() -> None:
    """The entry point vLLM calls in every process; idempotent, and inert without BANPICK_PROFILE."""
    global _armed
    settings = read_env()
    if settings is None or _armed:
        return
    import vllm

    check_version("vLLM", getattr(vllm, "__version__", ""), SUPPORTED)
    for cls in _loader_classes():
        if "load_model" in cls.__dict__ and not getattr(cls.__dict__["load_model"], _MARK, False):
            cls.load_model = _after_load(cls.__dict__["load_model"])
    _armed = True
    logger.info("banpick: vLLM plugin armed (profile %s, method %s, domain %s)", settings.profile,
                settings.method or "from bundle", settings.domain or "from bundle")


def install(model: torch.nn.Module, *, engine: str = "vLLM", enforce_eager: bool | None = None) -> EngineRouter | None:
    """Checks the profile against `model`'s routers and reroutes the layers the plan changes."""
    settings = read_env()
    if settings is None:
        return None
    if getattr(model, "_banpick_router", None) is not None:  # a loader subclass calling super().load_model
        return model._banpick_router
    runners = _moe_runners(model)
    gates = gate_modules(model.named_modules())
    if not runners and not gates:  # a dense model in the same process (e.g. a speculative draft): not ours
        logger.info("banpick: %s: skipping %s, it has no MoE layers", engine, type(model).__name__)
        return None
    if not runners:
        raise EngineUnsupported(f"{engine}: no MoE layer with a router object found (module with `.router` and "
                                "`.layer_name`): this vLLM version or model is not supported")
    for index, runner in runners.items():
        quant, monolithic = _kernel_kind(runner)
        if monolithic is None:
            raise EngineUnsupported(f"{engine} layer {index}: cannot tell whether its MoE kernel ({type(quant).__name__}) "
                                    "calls the router (no quant_method.is_monolithic): unsupported vLLM version or backend")
        if monolithic:
            raise EngineUnsupported(f"{engine} layer {index}: a monolithic MoE kernel ({type(quant).__name__}) routes "
                                    "inside the kernel and never calls the router; serve with a modular backend "
                                    "(e.g. --moe-backend triton)")
    slots = {int(r.router.top_k) for r in runners.values()}
    if len(slots) != 1:
        raise EngineUnsupported(f"{engine}: MoE layers disagree on top_k ({sorted(slots)})")
    router = EngineRouter(settings, gates, engine=engine, slots=slots.pop())
    unreachable = sorted(set(router.position) - set(runners))
    if unreachable:  # a layer whose router we cannot shadow would silently keep its own routing
        raise EngineUnsupported(f"{engine}: MoE layers {unreachable[:8]} have no router object to reroute (module with "
                                "`.router` and `.layer_name`): this vLLM version or model is not supported")
    if enforce_eager is False and not router.capture_safe:
        raise EngineUnsupported(f"Pick {router.plan.params.get('strategy')} cannot run inside CUDA graphs: add --enforce-eager")
    for index, runner in runners.items():
        if router.changes(index):
            _shadow(runner.router, router, index)
    model._banpick_router = router
    logger.info(router.log_line())
    return router


def _shadow(engine_router: Any, router: EngineRouter, index: int) -> None:
    # An instance attribute shadows BaseRouter._compute_routing for this layer only; select_experts
    # still does EPLB mapping, capture and the indices dtype around it.
    original = engine_router._compute_routing
    if getattr(original, _MARK, False):
        original = original.__wrapped__

    @functools.wraps(original)
    def compute_routing(hidden_states, router_logits, indices_type=None, *args, **kwargs):
        capturing = router_logits.is_cuda and torch.cuda.is_current_stream_capturing()
        check = router.needs_check(index) and not capturing
        stock = original(hidden_states, router_logits, indices_type, *args, **kwargs) if check else None
        return router.route(index, router_logits, indices_type, stock)

    setattr(compute_routing, _MARK, True)
    engine_router._compute_routing = compute_routing


def _after_load(load_model):
    @functools.wraps(load_model)
    def wrapped(self, vllm_config, model_config, *args, **kwargs):
        model = load_model(self, vllm_config, model_config, *args, **kwargs)
        install(model, engine=f"vLLM {_version()}", enforce_eager=getattr(model_config, "enforce_eager", None))
        return model

    setattr(wrapped, _MARK, True)
    return wrapped


def _kernel_kind(runner: Any) -> tuple[Any, bool | None]:
    """Returns (quant method, whether its kernel is monolithic), or (.., None) when vLLM does not say.

    The quant method sits on `runner.routed_experts` since the MoERunner split (0.26+) and on the
    FusedMoE module itself before it. `is_monolithic` is a property that asks the chosen experts
    kernel class; it raises AttributeError when no kernel was chosen, which must not read as "no".
    """
    for owner in (getattr(runner, "routed_experts", None), runner):
        quant = getattr(owner, "quant_method", None) if owner is not None else None
        if quant is None:
            continue
        try:
            return quant, bool(quant.is_monolithic)
        except AttributeError:
            return quant, None
    return None, None


def _moe_runners(model: torch.nn.Module) -> dict[int, Any]:
    found = {}
    for _, module in model.named_modules():
        engine_router, name = getattr(module, "router", None), getattr(module, "layer_name", None)
        if engine_router is None or not isinstance(name, str) or not hasattr(engine_router, "_compute_routing"):
            continue
        match = LAYER_RE.search(name)
        if match:
            found[int(match.group(1))] = module
    return found


def _loader_classes() -> list[type]:
    import vllm.model_executor.model_loader  # noqa: F401  (imports every loader)
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    seen, todo = [], [BaseModelLoader]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    return seen


def _version() -> str:
    try:
        import vllm

        return vllm.__version__
    except Exception:  # pragma: no cover - only for the log line
        return "?"
