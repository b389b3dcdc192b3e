"""The model's own rule on hand-computed tokens: probs, choice scores, route, weights_for, keep_top."""

import math

import pytest
import torch

from banpick_cli.routing import RouterSpec, keep_top, probs, route, select_scores, weights_for

# One token, probabilities chosen by hand (they sum to 1); expert ids are not in rank order.
#          e0    e1    e2    e3    e4    e5    e6    e7
TOKEN = [0.06, 0.40, 0.01, 0.16, 0.20, 0.05, 0.10, 0.02]  # ranks: e1 e4 e3 e6 e0 e5 e7 e2
E = 8


def logits_of(*rows):
    """Returns logits whose softmax is each row (up to float rounding)."""
    return torch.tensor(rows, dtype=torch.float64).log().float()


def sigmoid_logits_of(*rows):
    """Returns logits whose sigmoid is each row."""
    s = torch.tensor(rows, dtype=torch.float64)
    return (s / (1 - s)).log().float()


def close(actual, expected):
    torch.testing.assert_close(actual.float(), torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


def softmax_spec(k=4, renormalize=True, **kw):
    return RouterSpec(E, k, "softmax", renormalize, **kw)


def test_probs_is_the_softmax_or_the_sigmoid():
    close(probs(logits_of(TOKEN), softmax_spec()), [TOKEN])
    close(probs(sigmoid_logits_of(TOKEN), RouterSpec(E, 2, "sigmoid", True)), [TOKEN])


def test_route_keeps_the_top_k_in_order_and_renormalises():
    r = route(logits_of(TOKEN), softmax_spec())
    assert r.indices.tolist() == [[1, 4, 3, 6]] and r.k.tolist() == [4]
    close(r.weights, [[0.40 / 0.86, 0.20 / 0.86, 0.16 / 0.86, 0.10 / 0.86]])


def test_route_without_renormalisation_applies_routed_scaling_to_raw_probabilities():
    r = route(logits_of(TOKEN), softmax_spec(renormalize=False, routed_scaling_factor=2.5))
    close(r.weights, [[1.0, 0.5, 0.4, 0.25]])


def test_route_with_another_k():
    r = route(logits_of(TOKEN), softmax_spec(), k=2)
    assert r.indices.tolist() == [[1, 4]]
    close(r.weights, [[0.4 / 0.6, 0.2 / 0.6]])


def test_a_banned_expert_is_removed_before_top_k_and_the_next_fills_its_slot():
    banned = torch.zeros(E, dtype=torch.bool)
    banned[4] = True
    r = route(logits_of(TOKEN), softmax_spec(), banned=banned)
    assert r.indices.tolist() == [[1, 3, 6, 0]]
    close(r.weights, [[0.40 / 0.72, 0.16 / 0.72, 0.10 / 0.72, 0.06 / 0.72]])
    assert select_scores(logits_of(TOKEN), softmax_spec(), banned)[0, 4] == float("-inf")


def test_banning_more_experts_than_can_be_spared_leaves_no_expert_slots():
    banned = torch.ones(E, dtype=torch.bool)
    banned[[1, 0]] = False
    r = route(logits_of(TOKEN), softmax_spec(), banned=banned)
    assert r.indices.tolist() == [[1, 0, E, E]] and r.k.tolist() == [2]
    close(r.weights, [[0.40 / 0.46, 0.06 / 0.46, 0.0, 0.0]])


def test_weights_for_applies_the_model_rule_to_any_set_and_ignores_sentinels():
    indices = torch.tensor([[1, E, 0, E]])
    close(weights_for(logits_of(TOKEN), softmax_spec(), indices), [[0.40 / 0.46, 0.0, 0.06 / 0.46, 0.0]])
    close(weights_for(logits_of(TOKEN), softmax_spec(renormalize=False), indices), [[0.40, 0.0, 0.06, 0.0]])
    empty = weights_for(logits_of(TOKEN), softmax_spec(), torch.tensor([[E, E]]))
    assert empty.tolist() == [[0.0, 0.0]]  # no expert, no NaN


def test_keep_top_keeps_a_prefix_per_token_and_reweights():
    logits = logits_of(TOKEN, TOKEN)
    r = keep_top(logits, softmax_spec(), torch.tensor([2, 3]))
    assert r.indices.tolist() == [[1, 4, E, E], [1, 4, 3, E]] and r.k.tolist() == [2, 3]
    close(r.weights, [[0.4 / 0.6, 0.2 / 0.6, 0, 0], [0.4 / 0.76, 0.2 / 0.76, 0.16 / 0.76, 0]])


def test_keep_top_of_another_routing_orders_by_preference():
    base = route(logits_of(TOKEN), softmax_spec(), k=2)
    base = type(base)(torch.tensor([[0, 4, 1, E]]), base.weights, base.k)  # an arbitrary set, unordered
    r = keep_top(logits_of(TOKEN), softmax_spec(), torch.tensor([2]), base=base)
    assert r.indices.tolist() == [[1, 4, E, E]]


# Groups: {e0,e1} {e2,e3} {e4,e5} {e6,e7}.
GROUPED = [0.30, 0.01, 0.05, 0.20, 0.19, 0.18, 0.04, 0.03]


def test_group_limited_greedy_chooses_inside_the_groups_with_the_best_expert():
    spec = RouterSpec(E, 3, "softmax", False, 1.0, "group_limited_greedy", n_group=4, topk_group=2)
    r = route(logits_of(GROUPED), spec)  # group maxima .30 .20 .19 .04: groups 0 and 1
    assert r.indices.tolist() == [[0, 3, 2]]  # greedy would take e4 (.19) before e2 (.05)
    close(r.weights, [[0.30, 0.20, 0.05]])
    choice = select_scores(logits_of(GROUPED), spec)
    assert torch.isinf(choice[0, 4:]).all() and torch.isfinite(choice[0, :4]).all()


def test_noaux_tc_scores_groups_by_their_top_two_and_weights_by_unbiased_sigmoid():
    spec = RouterSpec(E, 3, "sigmoid", True, 2.0, "noaux_tc", n_group=4, topk_group=2)
    r = route(sigmoid_logits_of(GROUPED), spec)  # group top-2 sums .31 .25 .37 .07: groups 2 and 0
    assert r.indices.tolist() == [[0, 4, 5]]
    close(r.weights, [[2 * 0.30 / 0.67, 2 * 0.19 / 0.67, 2 * 0.18 / 0.67]])
    bias = torch.zeros(E)
    bias[2] = 0.30  # e2 chooses at .35: group 1 sums .55 and wins with group 2
    biased = RouterSpec(E, 3, "sigmoid", True, 2.0, "noaux_tc", n_group=4, topk_group=2, correction_bias=bias)
    r = route(sigmoid_logits_of(GROUPED), biased)
    assert r.indices.tolist() == [[2, 3, 4]]
    close(r.weights, [[2 * 0.05 / 0.44, 2 * 0.20 / 0.44, 2 * 0.19 / 0.44]])  # the bias is for choice only
    close(select_scores(sigmoid_logits_of(GROUPED), biased)[:, 2:6], [[0.35, 0.20, 0.19, 0.18]])


@pytest.mark.parametrize("tokens", [0, 1])
def test_shapes_for_zero_and_one_token(tokens):
    logits = torch.randn(tokens, E)
    spec = softmax_spec()
    r = route(logits, spec)
    assert r.indices.shape == (tokens, 4) and r.weights.shape == (tokens, 4) and r.k.shape == (tokens,)
    assert probs(logits, spec).shape == (tokens, E)
    assert keep_top(logits, spec, torch.full((tokens,), 2)).indices.shape == (tokens, 4)
    assert weights_for(logits, spec, r.indices).shape == (tokens, 4)


def test_bf16_logits_are_computed_in_float32_and_cast_back_only_when_the_model_does():
    logits = torch.randn(5, E)
    native = route(logits.bfloat16(), softmax_spec())
    assert native.weights.dtype == torch.float32
    assert torch.equal(native.indices, route(logits.bfloat16().float(), softmax_spec()).indices)
    qwen = route(logits.bfloat16(), softmax_spec(weights_in_logits_dtype=True))
    assert qwen.weights.dtype == torch.bfloat16
    assert torch.equal(qwen.weights, native.weights.bfloat16())


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s: route(torch.randn(2, 7), s), "logits"),
        (lambda s: route(torch.randint(0, 3, (2, E)), s), "floating"),
        (lambda s: route(torch.randn(2, E), s, k=9), "k must"),
        (lambda s: route(torch.randn(2, E), s, k=0), "k must"),
        (lambda s: route(torch.randn(2, E), s, banned=torch.zeros(E)), "banned"),
        (lambda s: keep_top(torch.randn(2, E), s, torch.tensor([1, 2, 3])), "k_per_token"),
        (lambda s: weights_for(torch.randn(2, E), s, torch.zeros(3, 2, dtype=torch.long)), "indices"),
    ],
)
def test_bad_inputs_fail_with_one_line(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call(softmax_spec())
    assert "\n" not in str(err.value)


def test_hand_probabilities_really_sum_to_one():
    assert math.isclose(sum(TOKEN), 1.0) and math.isclose(sum(GROUPED), 1.0)


@pytest.mark.parametrize("spec", [
    RouterSpec(8, 4, "softmax", True, weights_in_logits_dtype=True),
    RouterSpec(8, 3, "softmax", False, 1.5, "group_limited_greedy", n_group=4, topk_group=2),
    RouterSpec(8, 3, "sigmoid", True, 2.5, "noaux_tc", n_group=4, topk_group=2, correction_bias=torch.linspace(-0.1, 0.1, 8)),
])
def test_keep_prefix_is_keep_top_probs_on_preference_ordered_indices(spec):
    from banpick_cli.routing.topk import keep_prefix, keep_top_probs, route_probs

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(200, 8, generator=gen).to(torch.bfloat16)
    p = probs(logits, spec)
    k = torch.randint(0, spec.top_k + 1, (200,), generator=gen)
    top = route_probs(p, spec, spec.top_k, logits.dtype).indices
    fast, slow = keep_prefix(p, spec, k, top, logits.dtype), keep_top_probs(p, spec, k, top, logits.dtype)
    assert torch.equal(fast.indices, slow.indices) and torch.equal(fast.k, slow.k) and torch.equal(fast.k, k)
    assert torch.equal(fast.weights, slow.weights)
