"""A "no expert" slot (index == E, weight 0) fed to a real transformers experts module changes nothing."""

import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from banpick_cli.routing import RouterSpec, ban, keep_top

E, H, T = 8, 16, 24


def experts(implementation, dtype=torch.float32):
    config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=8, num_experts=E, num_experts_per_tok=4,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                            experts_implementation=implementation)
    torch.manual_seed(0)
    module = Qwen3MoeExperts(config)
    for weight in module.parameters():
        torch.nn.init.normal_(weight, std=0.2)
    return module.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_experts_skip_sentinel_slots_exactly(dtype):
    module = experts("eager", dtype)
    hidden, logits = torch.randn(T, H, dtype=dtype), torch.randn(T, E, dtype=dtype)
    spec = RouterSpec(E, 4, "softmax", True, weights_in_logits_dtype=True)
    routing = keep_top(logits, spec, torch.full((T,), 2))  # [T, 4]: two experts, two "no expert" slots
    assert (routing.indices[:, 2:] == E).all()
    with torch.no_grad():
        with_sentinels = module(hidden, routing.indices, routing.weights)
        deleted = module(hidden, routing.indices[:, :2], routing.weights[:, :2])
    assert torch.equal(with_sentinels, deleted)


def test_eager_experts_with_a_ragged_routing_match_each_token_alone():
    module = experts("eager")
    hidden, logits = torch.randn(T, H), torch.randn(T, E)
    routing = ban(logits, RouterSpec(E, 8, "softmax", True), 0.5, 0.3, 0.9, lam=1.0)
    assert routing.k.min() < routing.k.max() < 8  # really ragged, really sentinel-padded
    with torch.no_grad():
        out = module(hidden, routing.indices, routing.weights)
        alone = torch.cat([module(hidden[t : t + 1], routing.indices[t : t + 1, : k], routing.weights[t : t + 1, : k])
                           for t, k in enumerate(routing.k.tolist())])
    torch.testing.assert_close(out, alone, atol=1e-6, rtol=1e-6)  # only the matmul batch shape differs


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_kernels_that_cannot_skip_sentinels_get_the_same_output_from_sentinel_free(implementation):
    module = experts(implementation)
    hidden, logits = torch.randn(T, H), torch.randn(T, E)
    spec = RouterSpec(E, 4, "softmax", True)
    routing = keep_top(logits, spec, torch.full((T,), 2))
    with torch.no_grad():
        reference = module(hidden, routing.indices[:, :2], routing.weights[:, :2])
        safe = routing.sentinel_free(E)
        out = module(hidden, safe.indices, safe.weights)
    # The extra zero-weight slots change how the kernel groups rows into GEMMs (grouped_mm) or batches
    # them (batched_mm); a different grouping may pick another blocked reduction (seen on AVX-512 CPUs),
    # so equality holds to float32 rounding, not bit for bit. The zero weights themselves add exactly 0.
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-5)
