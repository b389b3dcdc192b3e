"""SGLang plugin: `sglang.srt.plugins` entry point `banpick = banpick_cli.runtime.sglang_plugin:register`.

With BANPICK_PROFILE set, registers two hooks with SGLang's HookRegistry (python/sglang/srt/plugins):
AFTER `sglang.srt.model_loader.get_model` checks the profile against the loaded routers and builds
the plan; BEFORE `sglang.srt.layers.moe.topk._post_process_topk_ids` replaces the routed columns of
(topk_ids, topk_weights) for the layers the plan changes. That function runs after every native
selection path (plain, grouped, biased, fused kernels) and before routed-expert capture, EPLB
mapping and the expert-distribution recorder, so those see the rerouted experts. Fused shared-
expert columns are left as they are. See docs/runtimes.md for the source lines.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

from banpick_cli.runtime.engine import LAYER_RE, EngineRouter, EngineUnsupported, gate_modules, read_env

logger = logging.getLogger("banpick")
TOPK_TARGET = "sglang.srt.layers.moe.topk._post_process_topk_ids"
LOAD_TARGET = "sglang.srt.model_loader.get_model"
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
    _state["problem"] = check_signature()
    HookRegistry.register(LOAD_TARGET, after_get_model, HookType.AFTER)
    HookRegistry.register(TOPK_TARGET, before_post_process, HookType.BEFORE)
    _state["armed"] = True
    logger.info("banpick: SGLang plugin armed (profile %s)", settings.profile)


def check_signature() -> str | None:
    """Returns why this SGLang cannot be hooked, or None: the hooked function must take our arguments."""
    try:
        from sglang.srt.layers.moe import topk
    except ImportError as err:
        return f"cannot import sglang.srt.layers.moe.topk ({err})"
    fn = getattr(topk, "_post_process_topk_ids", None)
    if fn is None:
        return f"{TOPK_TARGET} does not exist in this SGLang"
    params = list(inspect.signature(fn).parameters)
    missing = [p for p in TOPK_PARAMS if p not in params]
    return f"{TOPK_TARGET} lacks parameters {missing}" if missing else None


def after_get_model(model: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
    """AFTER hook on get_model: fails the load (and so the server start) on any mismatch."""
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
            slots.add(int(config.top_k) - int(getattr(config, "num_fused_shared_experts", 0) or 0))
    gates = gate_modules(model.named_modules())
    if not slots and not gates:  # a dense model in the same process (e.g. a speculative draft): not ours
        logger.info("banpick: %s: skipping %s, it has no MoE layers", engine, type(model).__name__)
        return None
    if len(slots) != 1:
        raise EngineUnsupported(f"{engine}: expected one routed top-k across MoE layers' TopK modules, found {sorted(slots)}")
    router = EngineRouter(settings, gates, engine=engine, slots=slots.pop())
    _state["router"] = router
    logger.info(router.log_line())
    return router


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
    shared = int(getattr(config, "num_fused_shared_experts", 0) or 0)
    routed = ids.shape[1] - shared
    capturing = ids.is_cuda and torch.cuda.is_current_stream_capturing()
    stock = (weights[:, :routed], ids[:, :routed]) if router.needs_check(int(layer_id)) and not capturing else None
    new_w, new_ids = router.route(int(layer_id), bound["router_logits"], ids.dtype, stock)
    if shared:
        new_ids = torch.cat([new_ids, ids[:, routed:]], dim=1)
        new_w = torch.cat([new_w.to(weights.dtype), weights[:, routed:]], dim=1)
    bound["topk_ids"], bound["topk_weights"] = new_ids, new_w.to(weights.dtype)
    return (), bound
