"""SGLang plugin: `sglang.srt.plugins` entry point `banpick = banpick_cli.runtime.sglang_plugin:register`.

With BANPICK_PROFILE set, registers two hooks with SGLang's HookRegistry (python/sglang/srt/plugins):
AFTER `ModelRunner.load_model` (the path the server loads through: ModelRunner.load_model ->
loader.load_model, SGLang 0.5.15-0.5.23) checks the profile against `runner.model`'s routers and
builds the plan; BEFORE `sglang.srt.layers.moe.topk._post_process_topk_ids` replaces the routed columns of
(topk_ids, topk_weights) for the layers the plan changes. That function runs after every native
selection path (plain, grouped, biased, fused kernels) and before routed-expert capture, EPLB
mapping and the expert-distribution recorder, so those see the rerouted experts. Fused shared-
expert columns are left as they are. See docs/runtimes.md for the source lines.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import torch

from banpick_cli.runtime.engine import LAYER_RE, EngineRouter, EngineUnsupported, gate_modules, read_env

logger = logging.getLogger("banpick")
TOPK_TARGET = "sglang.srt.layers.moe.topk._post_process_topk_ids"
LOAD_TARGET = "sglang.srt.model_executor.model_runner.ModelRunner.load_model"
TOPK_PARAMS = ("topk_ids", "topk_weights", "topk_config", "router_logits", "layer_id")
_state: dict[str, Any] = {"router": None, "armed": False, "problem": None}


def register() -> None:
    """The entry point SGLang calls in every process; idempotent, and inert without BANPICK_PROFILE."""
    settings = read_env()
    if settings is None or _state["armed"]:
        return
    try:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    except ImportError as err:
        # SGLang's plugin loader logs and swallows exceptions from plugins; a routing the user asked
        # for must not silently be absent, so stop the process instead.
        raise SystemExit(f"banpick: this SGLang has no plugin hook registry ({err}); it is not supported") from None
    problem = check_load_path()
    if problem:  # SGLang would load the model without us: stop here, in one line
        raise SystemExit(f"banpick: {problem}: this SGLang is not supported (tested: 0.5.23)")
    _state["problem"] = check_signature()
    HookRegistry.register(LOAD_TARGET, after_load_model, HookType.AFTER)
    HookRegistry.register(TOPK_TARGET, before_post_process, HookType.BEFORE)
    _state["armed"] = True
    logger.info("banpick: SGLang plugin armed (profile %s)", settings.profile)


def check_load_path() -> str | None:
    """Returns why the server's model load would not reach our hook, or None.

    The server builds its model in `ModelRunner.load_model`, which stores it as `self.model`; the
    AFTER hook reads it there.
    """
    load, why = _sglang_attr("sglang.srt.model_executor.model_runner", "ModelRunner.load_model", LOAD_TARGET)
    if why:
        return why
    try:
        source = inspect.getsource(load)
    except (OSError, TypeError):
        return f"{LOAD_TARGET} has no readable source"
    if "self.model = " not in source:
        return f"{LOAD_TARGET} no longer sets self.model"
    return None


def _sglang_attr(module: str, attribute: str, target: str) -> tuple[Any, str | None]:
    """Returns (the object at module.attribute, None), or (None, why it is not there in this SGLang)."""
    import importlib

    try:
        value: Any = importlib.import_module(module)
    except ImportError as err:
        return None, f"cannot import {module} ({err})"
    for part in attribute.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None, f"{target} does not exist in this SGLang"
    return value, None


def shared_slots(config: Any) -> int:
    """Returns the fused shared-expert columns after the routed ones in a TopK's output.

    SGLang 0.5.23 calls them `num_shared_topk_slots`; older versions `num_fused_shared_experts`.
    """
    for name in ("num_shared_topk_slots", "num_fused_shared_experts"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return 0


def check_signature() -> str | None:
    """Returns why this SGLang cannot be hooked, or None: the hooked function must take our arguments."""
    fn, why = _sglang_attr("sglang.srt.layers.moe.topk", "_post_process_topk_ids", TOPK_TARGET)
    if why:
        return why
    params = list(inspect.signature(fn).parameters)
    missing = [p for p in TOPK_PARAMS if p not in params]
    return f"{TOPK_TARGET} lacks parameters {missing}" if missing else None


def after_load_model(result: Any, runner: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook on ModelRunner.load_model: fails the load (and so the server start) on any mismatch."""
    model = getattr(runner, "model", None)
    if not isinstance(model, torch.nn.Module):
        raise EngineUnsupported(f"banpick: SGLang's {LOAD_TARGET} left no model in runner.model: unsupported SGLang version")
    install(model)
    return result


def after_get_model(model: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
    """Installs on a model built outside ModelRunner (e.g. `sglang.srt.model_loader.get_model`); returns it."""
    install(model)
    return model


def install(model: torch.nn.Module, *, engine: str = "SGLang") -> EngineRouter | None:
    """Checks the profile against `model`'s routers and builds the plan the topk hook applies."""
    settings = read_env()
    if settings is None:
        return None
    if _state["problem"]:
        raise EngineUnsupported(f"banpick: {engine}: {_state['problem']}: unsupported SGLang version")
    slots = set()
    for name, module in model.named_modules():
        config = getattr(module, "topk_config", None)
        if config is not None and LAYER_RE.search(name):
            slots.add(int(config.top_k) - shared_slots(config))
    gates = gate_modules(model.named_modules())
    if not slots and not gates:  # a dense model in the same process (e.g. a speculative draft): not ours
        logger.info("banpick: %s: skipping %s, it has no MoE layers", engine, type(model).__name__)
        return None
    if len(slots) != 1:
        raise EngineUnsupported(f"{engine}: expected one routed top-k across MoE layers' TopK modules, found {sorted(slots)}")
    router = EngineRouter(settings, gates, engine=engine, slots=slots.pop())
    _state["router"] = router
    logger.info(router.log_line())
    if router.plan.batch is not None:  # EngineRouter.is_decode stays False here
        logger.warning("banpick: %s: the batch-aware step does not run: this plugin cannot tell a decode step from "
                       "a prefill in SGLang's router (the vLLM plugin and the HF runtime can)", engine)
    if router.changed:
        logger.info(pruned_line())
    return router


def pruned_line() -> str:
    """The one line that says SGLang computes the slots the routing prunes, and why."""
    asked = os.environ.get("BANPICK_PRUNED_SLOTS", "auto").strip() or "auto"
    if asked not in ("auto", "compute", "sentinel"):
        raise EngineUnsupported(f"BANPICK_PRUNED_SLOTS={asked!r}: expected auto, compute or sentinel")
    why = ("its Triton MoE kernel skips expert id -1 only under expert parallelism (fused_experts' filter_expert), "
           "and its EPLB map would index -1")
    head = "BANPICK_PRUNED_SLOTS=sentinel refused: " if asked == "sentinel" else ""
    return f"banpick: SGLang: {head}pruned slots are computed at weight 0 on a valid expert ({why})"


def before_post_process(*args: Any, **kwargs: Any):
    """BEFORE hook: swaps in the plan's routing for the routed columns of a changed layer."""
    router: EngineRouter | None = _state["router"]
    if router is None:
        raise EngineUnsupported("banpick: SGLang routed experts before the model-load hook ran: unsupported SGLang version")
    bound = dict(zip(TOPK_PARAMS[: len(args)], args), **kwargs)
    layer_id = bound.get("layer_id")
    if layer_id is None:
        raise EngineUnsupported("banpick: SGLang's top-k call carries no layer_id: unsupported SGLang version or model")
    if not router.changes(int(layer_id)):
        return None
    ids, weights, config = bound["topk_ids"], bound["topk_weights"], bound["topk_config"]
    shared = shared_slots(config)
    routed = ids.shape[1] - shared
    capturing = ids.is_cuda and torch.cuda.is_current_stream_capturing()
    stock = (weights[:, :routed], ids[:, :routed]) if router.needs_check(int(layer_id)) and not capturing else None
    new_w, new_ids = router.route(int(layer_id), bound["router_logits"], ids.dtype, stock)
    if shared:
        new_ids = torch.cat([new_ids, ids[:, routed:]], dim=1)
        new_w = torch.cat([new_w.to(weights.dtype), weights[:, routed:]], dim=1)
    bound["topk_ids"], bound["topk_weights"] = new_ids, new_w.to(weights.dtype)
    return (), bound
