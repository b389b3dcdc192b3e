"""Usage counting: sums, agreement with a slow reference, padding ignored, LM head skipped."""

from __future__ import annotations

import pytest
import torch

from banpick_cli.passes.usage import count_usage
from banpick_cli.models import RoutingHooks
from banpick_cli.models.loading import load_model
from tiny import FAMILIES

TEXTS = ["the quick brown fox", "def add(x, y): return x + y and more words here", "12 + 35 = 47", "lazy dog"]


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_sum_to_tokens_times_k_and_match_reference(tiny_models, family):
    loaded = load_model(str(tiny_models[family]), device="cpu")
    usage = count_usage(loaded, TEXTS, seq_len=16, batch_size=3)
    K, E = loaded.routing.top_k, loaded.routing.num_experts
    real_tokens = sum(len(loaded.tokenizer(t)["input_ids"][:16]) for t in TEXTS)
    assert usage.tokens == real_tokens
    assert usage.token_counts.tolist() == [real_tokens] * len(loaded.layers)
    assert usage.expert_counts.sum(-1).tolist() == [real_tokens * K] * len(loaded.layers)

    # Slow reference: one text at a time (no padding), a Python loop over the router's choices.
    reference = torch.zeros(len(loaded.layers), E, dtype=torch.int64)

    def record(position, logits, weights, indices):
        for row in indices.tolist():
            for expert in row:
                reference[position, expert] += 1

    with torch.inference_mode(), RoutingHooks(loaded.layers, E, observers=[record]):
        for text in TEXTS:
            ids = loaded.tokenizer(text, return_tensors="pt", truncation=True, max_length=16)["input_ids"]
            loaded.model(ids)
    assert torch.equal(usage.expert_counts, reference)


def test_lm_head_is_skipped(tiny_models):
    loaded = load_model(str(tiny_models["qwen3_moe"]), device="cpu")
    calls = []
    handle = loaded.model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    count_usage(loaded, TEXTS, seq_len=16, batch_size=2)
    handle.remove()
    assert calls == []


def test_sentinel_slots_are_not_counted(tiny_models):
    loaded = load_model(str(tiny_models["qwen3_moe"]), device="cpu")
    E = loaded.routing.num_experts

    def drop_last(position, logits, weights, indices):
        indices = indices.clone()
        indices[:, -1] = E
        return weights, indices

    plain = count_usage(loaded, TEXTS, seq_len=16, batch_size=2)
    hooks = RoutingHooks(loaded.layers, E, overrides={p.position: drop_last for p in loaded.layers}).install()
    try:
        pruned = count_usage(loaded, TEXTS, seq_len=16, batch_size=2)
    finally:
        hooks.remove()
    K = loaded.routing.top_k
    assert pruned.expert_counts.sum(-1).tolist() == [plain.tokens * (K - 1)] * len(loaded.layers)
