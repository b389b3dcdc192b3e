"""Opaque torch ops the engine plugins route and compute through, so that torch.compile never traces
banpick's Python.

vLLM compiles the model by default (no --enforce-eager), and on a CPU its MoE runner calls the MoE
forward directly instead of through its own opaque `moe_forward` op (`MoERunner._select_forward`,
vLLM 0.32), so Dynamo traces the router. Routing with a data-dependent Python branch (the load-time
self-check's `float(...)`, a CPU-only width trim) then fails with "Could not guard on data-dependent
expression". Each op below is a `torch.library.custom_op`: Dynamo and Inductor see only its fake
(shapes and dtypes: static, [T, slots]), and its body runs eagerly on every call. On a GPU the router
already runs inside vLLM's opaque op and CUDA graphs capture the body as before: these ops add no
host sync of their own (the pruned-slot compaction, which syncs, is registered for CPU kernels only).

A layer registers a callable and gets an integer handle (`add`); the op takes the handle. Handles
are numbered in install order, so a graph vLLM compiled and cached in one process calls the same
layers' callables in the next (the plugin keys vLLM's compile cache with VERSION and its layers).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

VERSION = 1  # bump when an op's signature or meaning changes: it keys vLLM's compile cache
_CALLS: dict[int, Callable[..., Any]] = {}


def add(call: Callable[..., Any]) -> int:
    """Registers `call` for one layer of this process; returns its handle for the ops."""
    handle = len(_CALLS)
    _CALLS[handle] = call
    return handle


@torch.library.custom_op("banpick::route", mutates_args=())
def route(hidden_states: torch.Tensor, logits: torch.Tensor, handle: int, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights float32 [T, slots], ids int32 [T, slots]) from the layer's routing call."""
    weights, ids = _CALLS[handle](hidden_states, logits)
    return weights.to(torch.float32).contiguous().clone(), ids.to(torch.int32).contiguous().clone()


@route.register_fake
def _route_fake(hidden_states, logits, handle, slots):
    # Under torch.compile `handle` and `slots` may be symbolic: the fake reads neither as a key.
    shape = (logits.shape[0], slots)
    return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.int32)


@torch.library.custom_op("banpick::experts_kept", mutates_args=("output",))
def experts_kept(output: torch.Tensor, hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                 topk_weights: torch.Tensor, topk_ids: torch.Tensor, handle: int, activation: str,
                 num_experts: int) -> None:
    """Writes into `output` the layer's experts kernel run over the kept (token, slot) pairs only.

    A slot is kept when its weight is > 0 (a pruned slot holds weight 0, and a weight-0 slot adds
    nothing to the token's sum). With every slot kept the kernel runs unchanged. Otherwise the kept
    pairs become rows of top-k 1 (the token's hidden state, the slot's expert and weight), the same
    kernel runs on them, and the rows are summed back per token in float32: the kernel's work then
    follows the experts the routing kept, not the slot count.
    """
    kernel = _CALLS[handle]
    kept = topk_weights > 0
    if bool(kept.all()):
        kernel(output, hidden_states, w1, w2, topk_weights, topk_ids, activation, num_experts)
        return
    tokens, slots = kept.nonzero(as_tuple=True)
    rows = output.new_empty((tokens.numel(), output.shape[1]))
    kernel(rows, hidden_states.index_select(0, tokens).contiguous(), w1, w2,
           topk_weights[tokens, slots].unsqueeze(1).contiguous(), topk_ids[tokens, slots].unsqueeze(1).contiguous(), activation, num_experts)
    total = torch.zeros(output.shape, dtype=torch.float32, device=output.device)
    output.copy_(total.index_add_(0, tokens, rows.float()))


@experts_kept.register_fake
def _experts_kept_fake(output, hidden_states, w1, w2, topk_weights, topk_ids, handle, activation, num_experts):
    return None
