"""The KL that the scans measure (appendix B's top-k KL), the plans they scan, and the brute-force
reference the engine (passes/kl.py) is tested and benchmarked against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from banpick_cli.models.base import RoutingHooks
from banpick_cli.models.loading import LoadedModel
from banpick_cli.passes.batches import batches

TOP_TOKENS = 1000  # appendix B


def default_stack(device_type: str) -> int:
    """Returns how many variants share one forward in the scans by default (docs/benchmarks.md: 8 on a GPU, 2 on a CPU)."""
    return 8 if device_type == "cuda" else 2

# Routes one MoE layer for a variant: router logits [T, E] -> (weights [T, W], indices [T, W]),
# what the experts use instead of the router's choice; index == num_experts is "no expert".
RouteVariant = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LayerPlan:
    """The variants of one MoE layer (its position): each routes that layer its own way, the rest as usual."""

    position: int
    variants: tuple[RouteVariant, ...]


def top_targets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the k largest logits per row and their token ids: ([N, k] float32, [N, k] int32).

    All that is kept of the unmodified model's output: p' is the softmax of these k logits, and q'
    the softmax of the modified model's logits at the same ids (the vocabulary normaliser cancels).
    """
    values, indices = torch.topk(logits.float(), k, dim=-1)
    return values, indices.int()


def target_log_probs(values: torch.Tensor) -> torch.Tensor:
    """Returns log p' [N, k] (float64): p restricted to its top-k set and renormalised, from its top-k logits."""
    return torch.log_softmax(values.double(), dim=-1)


def topk_kl(log_p: torch.Tensor, indices: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Returns D_KL(p' || q') per row [N] (float64, natural log): appendix B's top-k KL.

    `log_p` [N, k] is log p' (`target_log_probs`) on the token ids `indices` [N, k]; q' is the modified
    model's `logits` [N, V] restricted to the same ids and renormalised (a softmax over them).
    """
    log_q = torch.log_softmax(logits.gather(1, indices.long()).double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


@torch.inference_mode()
def naive_kl(
    loaded: LoadedModel,
    texts: Sequence[str],
    plans: Sequence[LayerPlan],
    *,
    seq_len: int,
    batch_size: int = 8,
    top_tokens: int = TOP_TOKENS,
) -> dict[int, torch.Tensor]:
    """Returns what `KLEngine.run` returns, by brute force: one full forward per variant and batch.

    The reference the engine is tested and benchmarked against; no stored states, no stacking.
    """
    model = loaded.model
    k = min(top_tokens, int(loaded.adapter.output_head(model)[1].weight.shape[0]))
    sums = {plan.position: torch.zeros(len(plan.variants), dtype=torch.float64) for plan in plans}
    tokens = 0
    with RoutingHooks(loaded.layers, loaded.routing.num_experts) as hooks:
        for batch in batches(loaded.tokenizer, list(texts), seq_len=seq_len, batch_size=batch_size, device=loaded.device):
            mask = batch.attention_mask.bool()
            inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            values, indices = top_targets(model(**inputs).logits[mask], k)
            log_p = target_log_probs(values)
            for plan in plans:
                for v, variant in enumerate(plan.variants):
                    hooks.overrides = {plan.position: lambda position, logits, w, i, f=variant: f(logits)}
                    sums[plan.position][v] += topk_kl(log_p, indices, model(**inputs).logits[mask]).sum().cpu()
                    hooks.overrides = {}
            tokens += batch.tokens
    return {position: s / max(tokens, 1) for position, s in sums.items()}
