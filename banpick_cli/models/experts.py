"""The experts forward banpick's passes run: transformers' `grouped_mm` arithmetic in a smaller footprint.

transformers' default experts implementation (`grouped_mm`, integrations/moe.py) keeps every
intermediate of a batch alive until it returns: the S = tokens x top-k gathered inputs, the gate/up
output, the weighted down output and its reordered copy, about 4 x S x hidden values at its peak (128 MiB
for 1,024 tokens of a top-8, hidden-1024 layer in float32). A streamed pass holds one decoder layer,
so that transient was a third of its memory above the layer (docs/scaling.md).

`sliced_grouped_mm` computes the same products on the same rows, in the same order, and returns the same
bits (tests/models/test_experts.py holds it to transformers' own function, bit for bit, on all six
families, float32 and bfloat16, with and without pruned slots, on one and two threads):
- the pairs are sorted by expert as transformers sorts them, and every expert's GEMMs see exactly its
  rows. On the CPU torch's grouped_mm is a loop of one matrix product per expert, so the experts are
  taken in slices of at most SLICE_BYTES of intermediates, each slice through the same grouped_mm call
  on its own experts;
- each slice's weighted down output is written into one S x hidden buffer, and every intermediate is
  dropped as soon as it is used;
- the per-token sum over the top-k slots runs on token blocks of the reordered rows: the same reduction
  of the same k rows for every output element (torch's CPU reductions parallelise over the kept
  dimensions, never over k, which is always the smallest).
Its peak is `peak_bytes`: the S x hidden buffer, the output, and one slice or block. Off the CPU
transformers' own function runs: a GPU's grouped GEMM is one fused kernel, and it needs no host
synchronisation, which the slices' bounds would add.

`use_sliced_experts(model)` registers it through transformers' experts interface (the extension point
`set_experts_implementation` reads) and switches a model that runs `grouped_mm` to it; models on another
implementation (eager, a quantized kernel) are left as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

NAME = "banpick_sliced_grouped_mm"
SLICE_BYTES = 8 << 20  # intermediates of one slice of experts (gathered inputs, gate/up, gated)
BLOCK_BYTES = 8 << 20  # reordered rows of one block of tokens in the top-k sum


def sliced_grouped_mm(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor) -> torch.Tensor:
    """Returns the experts' weighted sum for each token ([tokens, hidden]), as transformers' grouped_mm does."""
    from transformers.integrations import moe

    if (hidden_states.device.type != "cpu" or getattr(self, "has_bias", False) or not getattr(self, "has_gate", True)
            or getattr(self, "has_post_expert_norm", False)):  # off the CPU, or not one of our six families' experts
        return moe.grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    k, tokens, hidden = top_k_index.size(-1), hidden_states.size(0), hidden_states.size(-1)
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))  # [S]: the pairs grouped by expert
    weights = top_k_weights.reshape(-1)[perm]
    # As transformers counts rows per expert on the CPU (histc of floats): pruned slots (id == num_experts, set
    # only with the expert-parallel flag, models/base.py) sort last and fall outside every expert.
    per_expert = torch.histc(expert_ids.float(), bins=self.num_experts, min=0, max=self.num_experts - 1)
    ends = torch.cumsum(per_expert, dim=0, dtype=torch.int32)  # [E]
    bounds = ends.tolist()
    pairs = expert_ids.numel()
    # The weighted rows in transformers' dtype: the experts' (inputs are cast to it) times the routing
    # weights' (float32 when the router keeps them so), summed in it, cast to the input's at the end. Rows
    # past the last expert (pruned slots) stay 0, as transformers' masks make them.
    dtype = torch.promote_types(self.down_proj.dtype, top_k_weights.dtype)
    empty = torch.zeros if bounds[-1] < pairs else torch.empty
    out = empty(pairs, hidden, dtype=dtype, device=hidden_states.device)
    width = self.down_proj.size(-2) if self.is_transposed else self.down_proj.size(-1)
    row_bytes = (hidden + 4 * width) * self.down_proj.element_size()  # gathered input, gate/up, gated
    for first, last in _slices(bounds, max(1, SLICE_BYTES // row_bytes)):
        start, stop = bounds[first - 1] if first else 0, bounds[last - 1]
        if stop == start:
            continue
        offsets = ends[first:last] - start
        rows = moe._grouped_linear(hidden_states[perm[start:stop] // k], self.gate_up_proj[first:last], offsets,
                                   is_transposed=self.is_transposed)
        rows = self._apply_gate(rows)
        rows = moe._grouped_linear(rows, self.down_proj[first:last], offsets, is_transposed=self.is_transposed)
        torch.mul(rows, weights[start:stop].unsqueeze(-1), out=out[start:stop])
        del rows
    del weights, expert_ids
    order = torch.empty_like(perm)
    order[perm] = torch.arange(perm.size(0), device=perm.device)
    del perm
    order = order.view(tokens, k)  # [tokens, k]: where each token's slot j landed in `out`
    result = out.new_empty(tokens, hidden)
    block = max(1, BLOCK_BYTES // (k * hidden * out.element_size()))
    for t0 in range(0, tokens, block):
        t1 = min(tokens, t0 + block)
        torch.sum(out[order[t0:t1].reshape(-1)].view(t1 - t0, k, hidden), dim=1, out=result[t0:t1])
    return result.to(hidden_states.dtype)


def _slices(ends: list[int], rows: int) -> list[tuple[int, int]]:
    """Returns [first, last) expert ranges whose rows add up to at most `rows` (an expert with more: alone)."""
    slices, first, start = [], 0, 0
    for expert, end in enumerate(ends):
        if end - start > rows and expert > first:
            slices.append((first, expert))
            first, start = expert, ends[expert - 1]
    slices.append((first, len(ends)))
    return slices


def peak_bytes(tokens: int, top_k: int, hidden: int, width: int, element: int, *, sliced: bool = True) -> int:
    """Returns the most memory the experts forward holds at once for `tokens` tokens (beyond its input):
    `sliced_grouped_mm`'s on the CPU, transformers' grouped_mm's (`sliced` False) elsewhere."""
    pairs = tokens * top_k
    if not sliced:  # gathered inputs, down output, weighted rows and their reordered copy; or inputs and gate/up
        return pairs * max(4 * hidden, hidden + 4 * width) * element + tokens * hidden * element
    slice_bytes = min(SLICE_BYTES, pairs * (hidden + 4 * width) * element)
    block_bytes = min(BLOCK_BYTES, pairs * hidden * element)
    # sort, permutation and order (int64), the weighted rows, the output, and the larger of a slice or a block
    return pairs * (3 * 8 + hidden * element) + tokens * hidden * element + max(slice_bytes, block_bytes)


def use_sliced_experts(model: nn.Module) -> bool:
    """Switches `model` from transformers' grouped_mm experts to `sliced_grouped_mm`; returns whether it did."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:  # a transformers without the experts interface: its experts run as they are
        return False
    config: Any = getattr(model, "config", None)
    if getattr(config, "_experts_implementation", None) != "grouped_mm" or not hasattr(model, "set_experts_implementation"):
        return False
    if NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(NAME, sliced_grouped_mm)
    model.set_experts_implementation(NAME)
    return config._experts_implementation == NAME
