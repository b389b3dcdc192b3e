"""vLLM plugin: `vllm.general_plugins` entry point `banpick = banpick_cli.runtime.vllm_plugin:register`.

With BANPICK_PROFILE set, every vLLM process that loads the model (each worker, TP/DP rank) checks
the profile against the loaded routers after weights are loaded, and reroutes each MoE layer the
plan changes by shadowing that layer router's `_compute_routing` (vLLM's routers are objects since
the MoE router refactor, PR #30623; see docs/runtimes.md for the source lines). The routing runs in
the opaque op banpick::route, so vLLM's default compiled mode does not trace it; on vLLM's CPU experts
kernel the pruned slots are not computed (banpick::experts_kept; BANPICK_PRUNED_SLOTS). Without
BANPICK_PROFILE the plugin does nothing. Targets vLLM >=0.26,<0.34 (SUPPORTED).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

from banpick_cli.runtime import engine_ops
from banpick_cli.runtime.engine import (
    LAYER_RE,
    EngineRouter,
    EngineUnsupported,
    attach_log_handler,
    check_version,
    engine_fingerprint,
    gate_modules,
    read_env,
)

logger = logging.getLogger("banpick")
# tests/engines/ ran on 0.26.0 and 0.33.0; the seams in between were read in each release's wheel
# (docs/runtimes.md, "vLLM versions").
SUPPORTED = ((0, 26), (0, 34))
_MARK = "_banpick_wrapped"
ENV_PRUNED = "BANPICK_PRUNED_SLOTS"
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
        for name, wrap in (("load_model", _after_load), ("load_weights", _after_load_weights)):
            if name in cls.__dict__ and not getattr(cls.__dict__[name], _MARK, False):
                setattr(cls, name, wrap(cls.__dict__[name]))
    _armed = True
    import vllm.logger  # noqa: F401  (configures vLLM's handlers, which banpick's lines then share)

    attach_log_handler("vllm")
    logger.info("banpick: vLLM plugin armed (profile %s, method %s, domain %s)", settings.profile,
                settings.method or "from bundle", settings.domain or "from bundle")


def install(model: torch.nn.Module, *, engine: str = "vLLM", enforce_eager: bool | None = None,
            vllm_config: Any = None) -> EngineRouter | None:
    """Checks the profile against `model`'s routers and reroutes the layers the plan changes.

    `vllm_config`: the engine's config; the plugin records itself in its `additional_config`, which
    vLLM hashes into its torch.compile cache key, so a graph compiled without the plugin (or with
    other layers rerouted) is never loaded from the cache for this one, nor this one's for it.
    """
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
    router = EngineRouter(settings, gates, engine=engine, slots=slots.pop(),
                          fingerprint=getattr(model, "_banpick_fingerprint", None))
    router.is_decode = decode_step
    unreachable = sorted(set(router.position) - set(runners))
    if unreachable:  # a layer whose router we cannot shadow would silently keep its own routing
        raise EngineUnsupported(f"{engine}: MoE layers {unreachable[:8]} have no router object to reroute (module with "
                                "`.router` and `.layer_name`): this vLLM version or model is not supported")
    if enforce_eager is False and not router.capture_safe:
        raise EngineUnsupported(f"Pick {router.plan.params.get('strategy')} cannot run inside CUDA graphs: add --enforce-eager")
    mode = pruned_slots_mode()
    skipped = []
    if mode == "sentinel":
        why = sentinel_refusal(runners, router)
        router.sentinel = why is None
        if why:
            logger.warning("banpick: %s=sentinel refused, pruned slots keep a valid expert at weight 0: %s", ENV_PRUNED, why)
    for index, runner in runners.items():
        if router.changes(index):
            _shadow(runner.router, router, index)
            experts = _experts_kernel(runner)
            if mode == "auto" and _compactable(experts):
                _skip_pruned(experts)
                skipped.append(type(experts).__name__)
            elif router.sentinel:
                skipped.append(f"{type(experts).__name__} (expert id -1, unverified on a GPU)")
    _record_in_config(vllm_config, router, bool(skipped))
    model._banpick_router = router
    logger.info(router.log_line())
    if router.changed:
        logger.info(pruned_line(router, skipped, mode, runners))
    return router


def pruned_slots_mode() -> str:
    """BANPICK_PRUNED_SLOTS: "auto" (default: not computed where banpick can skip them safely: vLLM's
    CPU kernel), "compute" (every slot computed, the pruned ones at weight 0: for comparisons), or
    "sentinel" (opt-in, GPU: pruned slots get expert id -1 where this vLLM's Triton experts skip it)."""
    mode = os.environ.get(ENV_PRUNED, "auto").strip() or "auto"
    if mode not in ("auto", "compute", "sentinel"):
        raise EngineUnsupported(f"{ENV_PRUNED}={mode!r}: expected auto, compute or sentinel")
    return mode


def sentinel_refusal(runners: dict[int, Any], router: EngineRouter) -> str | None:
    """Returns why pruned slots cannot be given expert id -1 on these layers, or None when they can:
    every rerouted layer runs vLLM's TritonExperts, and this vLLM's Triton path skips -1 at every batch
    size (read in its source, `triton_sentinel_refusal`)."""
    try:
        from vllm.model_executor.layers.fused_moe import fused_moe
        from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts
    except ImportError as err:
        return f"this vLLM has no Triton experts module ({err})"
    kernels = {_name(_experts_kernel(r)) for i, r in runners.items() if router.changes(i)
               if not isinstance(_experts_kernel(r), TritonExperts)}
    if kernels:
        return f"the experts kernel is {', '.join(sorted(kernels))}, not TritonExperts"
    kernel = getattr(fused_moe.fused_moe_kernel, "fn", fused_moe.fused_moe_kernel)  # a triton.JITFunction on GPUs
    return triton_sentinel_refusal(_source(kernel), _source(TritonExperts.moe_sum))


def triton_sentinel_refusal(kernel_source: str, moe_sum_source: str) -> str | None:
    """Returns why vLLM's Triton experts, given these sources, would not skip an expert id of -1 at
    every batch size, or None.

    Two places must skip it (vLLM 0.32, read): `fused_moe_kernel` writes zeros for a block whose
    expert is -1 (`if off_experts == -1:`); the aligned path (more than E / (4 top_k) tokens) drops
    -1 rows in `moe_align_block_size` and leaves them unwritten, so `TritonExperts.moe_sum` must
    pass `topk_ids` to `ops.moe_sum`, which then skips them: 0.32 does so only with an expert_map
    (expert parallelism), and otherwise would sum unwritten memory.
    """
    if "off_experts == -1" not in kernel_source:
        return "its fused_moe_kernel does not zero-write blocks of expert -1"
    call = moe_sum_source.split("ops.moe_sum(", 1)
    if len(call) < 2 or "topk_ids" not in call[1].split(")", 1)[0]:
        return "its TritonExperts.moe_sum does not pass topk_ids to ops.moe_sum"
    if "if expert_map is not None" in moe_sum_source:
        return ("its TritonExperts.moe_sum skips -1 slots only under expert parallelism (with an expert_map; "
                "vLLM PR #54083): without one, -1 rows of the aligned path would be summed unwritten")
    return None


def _source(obj: Any) -> str:
    import inspect

    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def pruned_line(router: EngineRouter, skipped: list[str], mode: str, runners: dict[int, Any]) -> str:
    """The one line that says whether this engine computes the slots the routing prunes."""
    if skipped:
        return (f"banpick: pruned slots are not computed: {skipped[0]} runs only the kept (token, expert) pairs "
                f"on {len(skipped)}/{len(router.changed)} rerouted layers")
    kernels = sorted({_name(_experts_kernel(r)) for i, r in runners.items() if router.changes(i)})
    why = f"{ENV_PRUNED}=compute" if mode == "compute" else "this experts kernel cannot skip a slot"
    return (f"banpick: pruned slots are computed at weight 0 ({', '.join(kernels)}; {why}): the routing changes, "
            "the experts' compute does not shrink")


def decode_step() -> bool:
    """Returns whether the forward vLLM is running is a decode step: every attention layer's metadata in the
    forward context has `max_query_len` 1 (one new token per request; the CPU, FlashAttention and Triton
    backends all carry it). False when there is no forward context or it does not say: the batch-aware
    step then does not run (on a GPU a CUDA graph bakes in what capture saw: unverified, docs/runtimes.md)."""
    try:
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not is_forward_context_available():
            return False
        meta = get_forward_context().attn_metadata
    except Exception:  # another vLLM's forward context: do not guess
        return False
    parts = meta if isinstance(meta, list) else [meta]
    found = [m for part in parts for m in (part.values() if isinstance(part, dict) else [part]) if m is not None]
    lengths = [getattr(m, "max_query_len", None) for m in found]
    return bool(lengths) and all(n == 1 for n in lengths)


def _shadow(engine_router: Any, router: EngineRouter, index: int) -> None:
    # An instance attribute shadows BaseRouter._compute_routing for this layer only; select_experts
    # still does EPLB mapping, capture and the indices dtype around it. The routing itself runs in
    # the opaque op banpick::route (engine_ops), which torch.compile does not trace.
    original = engine_router._compute_routing
    if getattr(original, _MARK, False):
        original = original.__wrapped__

    def call(hidden_states, router_logits):
        capturing = router_logits.is_cuda and torch.cuda.is_current_stream_capturing()
        check = router.needs_check(index) and not capturing
        stock = original(hidden_states, router_logits, None) if check else None
        return router.route(index, router_logits, torch.int32, stock)

    handle, slots = engine_ops.add(call), router.slots

    @functools.wraps(original)
    def compute_routing(hidden_states, router_logits, indices_type=None, *args, **kwargs):
        weights, ids = torch.ops.banpick.route(hidden_states, router_logits, handle, slots)
        return weights, ids if indices_type in (None, torch.int32) else ids.to(indices_type)

    setattr(compute_routing, _MARK, True)
    engine_router._compute_routing = compute_routing


def _name(experts: Any) -> str:
    return "no experts kernel built" if experts is None else type(experts).__name__


def _experts_kernel(runner: Any) -> Any:
    """The experts object of a modular MoE kernel (`quant_method.moe_kernel.fused_experts`), or None."""
    quant, _ = _kernel_kind(runner)
    return getattr(getattr(quant, "moe_kernel", None), "fused_experts", None)


def _compactable(experts: Any) -> bool:
    """Whether `experts` is vLLM's unquantized CPU kernel (`CPUUnquantizedExperts`, torch.ops._C.cpu_fused_moe),
    whose cost is one GEMM row per (token, slot): rows of top-k 1 give it the same sums."""
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:
        return False
    return isinstance(experts, CPUUnquantizedExperts) and not getattr(experts, _MARK, False)


def _skip_pruned(experts: Any) -> None:
    # Shadows this layer's CPUUnquantizedExperts.apply (called with keywords by vLLM's modular kernel)
    # with one that runs vLLM's own apply on the kept (token, slot) pairs only (engine_ops.experts_kept,
    # an opaque op: the compaction has data-dependent shapes).
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    original = experts.apply

    def kernel(output, hidden_states, w1, w2, topk_weights, topk_ids, activation, num_experts):
        original(output=output, hidden_states=hidden_states, w1=w1, w2=w2, topk_weights=topk_weights,
                 topk_ids=topk_ids, activation=MoEActivation(activation), global_num_experts=num_experts,
                 expert_map=None, a1q_scale=None, a2_scale=None, workspace13=None, workspace2=None,
                 expert_tokens_meta=None, apply_router_weight_on_input=False)

    handle = engine_ops.add(kernel)

    @functools.wraps(original)
    def apply(*, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
              expert_map, a1q_scale, apply_router_weight_on_input, **rest):
        if expert_map is not None or a1q_scale is not None or apply_router_weight_on_input:
            return original(output=output, hidden_states=hidden_states, w1=w1, w2=w2, topk_weights=topk_weights,
                            topk_ids=topk_ids, activation=activation, global_num_experts=global_num_experts,
                            expert_map=expert_map, a1q_scale=a1q_scale,
                            apply_router_weight_on_input=apply_router_weight_on_input, **rest)
        torch.ops.banpick.experts_kept(output, hidden_states, w1, w2, topk_weights, topk_ids, handle,
                                       activation.value, int(global_num_experts))
        return None

    experts.apply = apply
    setattr(experts, _MARK, True)


def _record_in_config(vllm_config: Any, router: EngineRouter, skipped: bool) -> None:
    extra = getattr(vllm_config, "additional_config", None)
    if not router.changed or vllm_config is None:
        return
    key = {"version": engine_ops.VERSION, "layers": sorted(router.changed), "skip_pruned": skipped}
    if isinstance(extra, dict):
        extra["banpick"] = key
        return
    raise EngineUnsupported("vLLM's additional_config is not a dict here, so banpick cannot keep its compiled graphs "
                            "apart from stock ones in vLLM's compile cache: set VLLM_DISABLE_COMPILE_CACHE=1 or use --enforce-eager")


def _after_load(load_model):
    @functools.wraps(load_model)
    def wrapped(self, vllm_config, model_config, *args, **kwargs):
        model = load_model(self, vllm_config, model_config, *args, **kwargs)
        install(model, engine=f"vLLM {_version()}", enforce_eager=getattr(model_config, "enforce_eager", None),
                vllm_config=vllm_config)
        return model

    setattr(wrapped, _MARK, True)
    return wrapped


def _after_load_weights(load_weights):
    # The router fingerprint is taken here, after the weights are read and before vLLM post-processes
    # them: on a CPU it packs every linear layer for oneDNN and empties its `weight`
    # (`dispatch_cpu_unquantized_gemm(layer, remove_weight=True)`, vLLM 0.32).
    @functools.wraps(load_weights)
    def wrapped(self, model, *args, **kwargs):
        result = load_weights(self, model, *args, **kwargs)
        if read_env() is not None and getattr(model, "_banpick_fingerprint", None) is None:
            gates = gate_modules(model.named_modules())
            if gates and all(g.weight.numel() for g in gates.values()):
                model._banpick_fingerprint = engine_fingerprint(gates)
        return result

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
