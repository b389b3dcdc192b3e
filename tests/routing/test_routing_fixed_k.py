"""Fixed-K: the model's own routing with a smaller k, on a hand example and against keep_top on every rule."""

import pytest
import torch

from banpick_cli.routing import RouterSpec, fixed_k, keep_top, route

E = 8
#          e0    e1    e2    e3    e4    e5    e6    e7
TOKEN = [0.06, 0.40, 0.01, 0.16, 0.20, 0.05, 0.10, 0.02]  # sorted: .40 .20 .16 .10 .06 .05 .02 .01


def logits_of(*rows):
    return torch.tensor(rows, dtype=torch.float64).log().float()


def test_fixed_k_keeps_the_top_k_with_the_models_weights():
    logits = logits_of(TOKEN)
    renorm = fixed_k(logits, RouterSpec(E, 4, "softmax", True), k=2)
    assert renorm.indices.tolist() == [[1, 4]] and renorm.k.tolist() == [2] and renorm.width == 2
    torch.testing.assert_close(renorm.weights, torch.tensor([[0.4 / 0.6, 0.2 / 0.6]]))
    raw = fixed_k(logits, RouterSpec(E, 4, "softmax", False, routed_scaling_factor=2.0), k=3)
    assert raw.indices.tolist() == [[1, 4, 3]]
    torch.testing.assert_close(raw.weights, torch.tensor([[0.8, 0.4, 0.32]]))  # probabilities x scaling, no renorm


@pytest.mark.parametrize("spec", [
    RouterSpec(E, 4, "softmax", True, weights_in_logits_dtype=True),
    RouterSpec(E, 3, "softmax", False, 1.5, "group_limited_greedy", n_group=4, topk_group=2),
    RouterSpec(E, 3, "sigmoid", True, 2.5, "noaux_tc", n_group=4, topk_group=2,
               correction_bias=torch.linspace(-0.1, 0.1, E)),
])
def test_fixed_k_is_keep_top_of_the_models_routing_and_k_base_is_the_model(spec):
    logits = torch.randn(64, E, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    own = route(logits, spec)
    same = fixed_k(logits, spec)
    assert torch.equal(same.indices, own.indices) and torch.equal(same.weights, own.weights)
    for k in range(1, spec.top_k):
        mine, kept = fixed_k(logits, spec, k), keep_top(logits, spec, torch.tensor(k))
        assert torch.equal(mine.indices, kept.indices[:, :k]) and (kept.indices[:, k:] == E).all()
        torch.testing.assert_close(mine.weights, kept.weights[:, :k], atol=0, rtol=0)
        assert mine.k.tolist() == [k] * 64 and mine.weights.dtype == own.weights.dtype


def test_fixed_k_refuses_k_outside_1_to_k_base():
    spec = RouterSpec(E, 4, "softmax", True)
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match=r"k must be an integer in \[1, K_base=4\]"):
            fixed_k(logits_of(TOKEN), spec, bad)
