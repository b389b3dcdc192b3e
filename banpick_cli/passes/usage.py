"""Usage profiling: how often each expert is selected per MoE layer, counted on the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from banpick_cli.passes.batches import batches
from banpick_cli.models.base import RoutingHooks
from banpick_cli.models.loading import LoadedModel
from banpick_cli.progress import ProgressEvent, ProgressFn, silent


@dataclass
class UsageCounts:
    """Selection counts of one calibration pass."""

    expert_counts: torch.Tensor  # [moe_layers, experts] int64
    token_counts: torch.Tensor  # [moe_layers] int64: real tokens routed at each layer
    tokens: int
    samples: int


class UsageCounter:
    """A router observer that adds each layer's selected experts into a [layers, experts] tensor."""

    def __init__(self, num_layers: int, num_experts: int, device: torch.device):
        self.num_experts = num_experts
        self.counts = torch.zeros(num_layers, num_experts + 1, dtype=torch.int64, device=device)
        self.tokens = torch.zeros(num_layers, dtype=torch.int64, device=device)
        self._mask: torch.Tensor | None = None
        self._real: torch.Tensor | None = None
        self._on_device: dict[torch.device, torch.Tensor] = {}

    @property
    def mask(self) -> torch.Tensor | None:
        """bool [flattened tokens]: the real (non-padding) positions of the batch being run."""
        return self._mask

    @mask.setter
    def mask(self, value: torch.Tensor | None) -> None:
        # Set once per batch; the real-token count and per-device copies are reused by every layer.
        self._mask = value
        self._real = None if value is None else value.sum()
        self._on_device = {} if value is None else {value.device: value[:, None]}

    def __call__(self, position: int, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> None:
        if self._mask is None:
            chosen, real = indices, indices.shape[0]
        else:
            # With --device-map the layers live on several GPUs: the mask follows the router's device.
            mask = self._on_device.get(indices.device)
            if mask is None:
                mask = self._on_device[indices.device] = self._mask.to(indices.device)[:, None]
            # Padding goes to the extra "no expert" bin: no boolean indexing, no host sync.
            chosen, real = torch.where(mask, indices, self.num_experts), self._real
        found = torch.bincount(chosen.reshape(-1), minlength=self.num_experts + 1)
        self.counts[position] += found.to(self.counts.device, non_blocking=True)
        self.tokens[position] += real if isinstance(real, int) else real.to(self.tokens.device)

    def result(self, samples: int) -> UsageCounts:
        counts = self.counts[:, : self.num_experts].cpu()
        tokens = self.tokens.cpu()
        return UsageCounts(counts, tokens, int(tokens[0]) if len(tokens) else 0, samples)


@torch.inference_mode()
def count_usage(
    loaded: LoadedModel, texts: list[str], *, seq_len: int, batch_size: int, progress: ProgressFn = silent
) -> UsageCounts:
    """Runs every text through the decoder (no LM head) and returns per-layer expert selection counts."""
    counter = UsageCounter(len(loaded.layers), loaded.routing.num_experts, loaded.device)
    decoder = loaded.adapter.decoder(loaded.model)
    done_tokens = 0
    with RoutingHooks(loaded.layers, loaded.routing.num_experts, observers=[counter]):
        for i, batch in enumerate(batches(loaded.tokenizer, texts, seq_len=seq_len, batch_size=batch_size, device=loaded.device)):
            counter.mask = batch.attention_mask.reshape(-1).bool()
            decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            done_tokens += batch.tokens
            progress(ProgressEvent("profile", min((i + 1) * batch_size, len(texts)), len(texts), done_tokens))
    return counter.result(len(texts))
