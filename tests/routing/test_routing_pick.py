"""Pick strategies A-E (paper section 4.3) on hand-computed tokens."""

import math

import pytest
import torch

from banpick_cli.routing import RouterSpec, pick, route

E = 8
#          e0    e1    e2    e3    e4    e5    e6    e7
TOKEN = [0.06, 0.40, 0.01, 0.16, 0.20, 0.05, 0.10, 0.02]  # ranks: e1 e4 e3 e6 e0 e5 e7 e2 (1..8)
SPEC = RouterSpec(E, 3, "softmax", True)  # top-3 = e1 e4 e3; range top-6 reaches e5


def logits_of(*rows):
    return torch.tensor(rows, dtype=torch.float64).log().float()


def keys(*ids):
    mask = torch.zeros(E, dtype=torch.bool)
    mask[list(ids)] = True
    return mask


def close(actual, expected):
    torch.testing.assert_close(actual.float(), torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


def renorm(*ps):
    return [p / sum(ps) for p in ps]


# Key experts: e4 (already selected), e0 (rank 5, within top-6), e2 (rank 8, outside).
KEY = keys(4, 0, 2)


def test_a_forced_addition_adds_every_missing_key_expert():
    r = pick(logits_of(TOKEN), SPEC, KEY, "A")
    assert r.indices.tolist() == [[1, 4, 3, 0, 2, E]]  # width k + |key| = 6; e4 was already there
    close(r.weights, [renorm(0.40, 0.20, 0.16, 0.06, 0.01) + [0.0]])
    assert r.k.tolist() == [5]


def test_b_forced_replacement_evicts_the_weakest_non_key_experts_and_never_a_key_expert():
    r = pick(logits_of(TOKEN), SPEC, KEY, "B")
    # e0 and e2 are missing; the non-key selected are e3 (.16) then e1 (.40); e4 stays.
    assert r.indices.tolist() == [[4, 0, 2]]
    close(r.weights, [renorm(0.20, 0.06, 0.01)])


def test_b_with_more_missing_keys_than_slots_lets_the_most_probable_enter():
    r = pick(logits_of(TOKEN), SPEC, keys(0, 2, 5, 7), "B")
    assert r.indices.tolist() == [[0, 5, 7]]  # e2 (.01) is the least probable and stays out
    close(r.weights, [renorm(0.06, 0.05, 0.02)])


def test_b_literal_eviction_by_weight_can_evict_a_key_expert_forced_in_earlier():
    r = pick(logits_of(TOKEN), SPEC, KEY, "B", evict="weakest")
    # e0 enters for e3; then e2 enters for the weakest now, e0 itself.
    assert r.indices.tolist() == [[1, 4, 2]]
    close(r.weights, [renorm(0.40, 0.20, 0.01)])


def test_c_range_based_addition_adds_only_key_experts_within_top_2k():
    r = pick(logits_of(TOKEN), SPEC, KEY, "C")
    assert r.indices.tolist() == [[1, 4, 3, 0, E, E]]
    close(r.weights, [renorm(0.40, 0.20, 0.16, 0.06) + [0.0, 0.0]])
    wide = pick(logits_of(TOKEN), SPEC, KEY, "C", range_factor=8 / 3)  # top-8 reaches e2
    assert wide.indices.tolist() == [[1, 4, 3, 0, 2, E]]


def test_d_range_based_replacement_evicts_the_weakest_selected_non_key_expert():
    r = pick(logits_of(TOKEN), SPEC, KEY, "D")
    assert r.indices.tolist() == [[1, 4, 0]]  # e0 replaces e3
    close(r.weights, [renorm(0.40, 0.20, 0.06)])


def test_without_renormalisation_a_forced_expert_brings_its_own_probability():
    spec = RouterSpec(E, 3, "softmax", False, routed_scaling_factor=2.0)
    r = pick(logits_of(TOKEN), spec, KEY, "A")
    close(r.weights, [[0.80, 0.40, 0.32, 0.12, 0.02, 0.0]])


# A token whose fourth expert (e6, key) is close behind the third (e3).
CLOSE = [0.05, 0.40, 0.01, 0.15, 0.20, 0.03, 0.145, 0.015]


def test_e_logit_bias_is_a_fifth_of_the_mean_top_k_weight_and_weights_come_from_the_biased_softmax():
    r = pick(logits_of(CLOSE), SPEC, keys(6), "E")
    bias = 0.2 / 3  # renormalised top-3 weights average 1/3
    boosted = 0.145 * math.exp(bias)  # .1551 > .15: e6 now outranks e3
    assert r.indices.tolist() == [[1, 4, 6]]
    close(r.weights, [renorm(0.40, 0.20, boosted)])


def test_e_without_renormalisation_uses_the_raw_weights_mean_and_the_biased_probabilities():
    spec = RouterSpec(E, 3, "softmax", False)
    r = pick(logits_of(CLOSE), spec, keys(6), "E")
    bias = 0.2 * (0.40 + 0.20 + 0.15) / 3
    boosted = 0.145 * math.exp(bias)
    total = 1 + boosted - 0.145
    assert r.indices.tolist() == [[1, 4, 6]]
    close(r.weights, [[0.40 / total, 0.20 / total, boosted / total]])


def test_e_options_a_fixed_bias_and_a_score_bias():
    assert pick(logits_of(CLOSE), SPEC, keys(6), "E", bias=0.01).indices.tolist() == [[1, 4, 3]]  # too small
    scored = pick(logits_of(CLOSE), SPEC, keys(6), "E", bias=0.01, bias_target="scores")
    assert scored.indices.tolist() == [[1, 4, 6]]  # .145 + .01 > .15 on the probabilities
    close(scored.weights, [renorm(0.40, 0.20, 0.145)])  # weights stay unbiased


def test_e_on_a_sigmoid_router_biases_the_choice_scores_only():
    s = torch.tensor([CLOSE], dtype=torch.float64)
    logits = (s / (1 - s)).log().float()
    spec = RouterSpec(E, 3, "sigmoid", True)
    r = pick(logits, spec, keys(6), "E")  # bias 0.2/3 on the scores: .145 + .067 > .20
    assert r.indices.tolist() == [[1, 6, 4]]
    close(r.weights, [renorm(0.40, 0.145, 0.20)])


@pytest.mark.parametrize("strategy", list("ABCDE"))
def test_no_key_expert_gives_exactly_the_model_routing(strategy):
    logits = torch.randn(16, E)
    r, base = pick(logits, SPEC, keys(), strategy), route(logits, SPEC)
    assert torch.equal(r.indices, base.indices) and torch.equal(r.weights, base.weights)


@pytest.mark.parametrize("strategy", list("ABCDE"))
@pytest.mark.parametrize("tokens", [0, 1])
def test_shapes_for_zero_and_one_token_and_bf16(strategy, tokens):
    r = pick(torch.randn(tokens, E).bfloat16(), SPEC, KEY, strategy)
    width = 6 if strategy in "AC" else 3
    assert r.indices.shape == (tokens, width) and r.weights.shape == (tokens, width)
    assert r.weights.dtype == torch.float32


def test_key_experts_are_always_present_after_a_and_b_and_never_duplicated():
    torch.manual_seed(0)
    logits = torch.randn(200, E)
    for strategy in "AB":
        r = pick(logits, SPEC, keys(0, 5), strategy)
        real = r.indices[r.indices < E].view(-1)
        assert (r.indices == 0).any(-1).all() and (r.indices == 5).any(-1).all()
        for row in r.indices.tolist():
            ids = [i for i in row if i < E]
            assert len(ids) == len(set(ids))
        assert real.numel() == int(r.k.sum())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(strategy="F"), "strategy"),
        (dict(range_factor=0), "range_factor"),
        (dict(evict="random"), "evict"),
        (dict(strategy="E", bias_fraction=-1.0), "bias_fraction"),
        (dict(strategy="E", bias_reference="median"), "bias_reference"),
        (dict(strategy="E", bias_target="probs"), "bias_target"),
        (dict(key_experts=torch.zeros(E)), "key_experts"),
    ],
)
def test_bad_options_fail_with_one_line(kwargs, match):
    args = {"key_experts": KEY, "strategy": "C", **kwargs}
    with pytest.raises(ValueError, match=match) as err:
        pick(logits_of(TOKEN), SPEC, **args)
    assert "\n" not in str(err.value)
