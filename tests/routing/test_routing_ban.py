"""Ban (paper section 5, appendix C): R per token, K per token, and the pruned routing."""

import pytest
import torch

from banpick_cli.routing import RouterSpec, ban, ban_k, route, token_ratio

E = 8
#          e0    e1    e2    e3    e4    e5    e6    e7
PEAKED = [0.06, 0.40, 0.01, 0.16, 0.20, 0.05, 0.10, 0.02]  # top-3 .76 of 1
FLAT = [0.14, 0.135, 0.13, 0.125, 0.12, 0.118, 0.117, 0.115]  # top-3 .405 of 1, below R_min
SPEC = RouterSpec(E, 8, "softmax", True)  # K_base 8 of 8, K_min 3: the paper's Qwen3 setting


def logits_of(*rows):
    return torch.tensor(rows, dtype=torch.float64).log().float()


def close(actual, expected):
    torch.testing.assert_close(actual.float(), torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


def test_token_ratio_is_top_k_min_over_top_k_base():
    close(token_ratio(logits_of(PEAKED, FLAT), SPEC, k_num=3), [0.76, 0.405])
    spec = RouterSpec(E, 4, "softmax", False)
    close(token_ratio(logits_of(PEAKED), spec, k_num=2), [0.60 / 0.86])  # of the router's top-4


def test_reading_5_a_flat_token_gets_6_with_the_clip_and_7_without():
    r = torch.tensor([0.375])  # a flat token: 3/8
    common = dict(layer_sensitivity=0.4, r_min=0.5, r_max=0.9, k_base=8, k_min=3, lam=1.0, beta=0.5)
    assert ban_k(r, **common).tolist() == [6]  # T' = 1: floor(3 + 5 * .7)
    assert ban_k(r, **common, clip=False).tolist() == [7]  # T' = 1.3125: floor(3 + 5 * .85625)


def test_ban_k_by_hand():
    # R .76: T' = .35, S = .2 + .175 = .375, K = floor(3 + 5 * .375) = floor(4.875) = 4.
    # R .95 (above R_max): T' = 0 (clipped), S = .2, K = floor(4) = 4; unclipped T' = -.125, K = floor(3.6875) = 3.
    r = torch.tensor([0.76, 0.95])
    args = dict(layer_sensitivity=0.4, r_min=0.5, r_max=0.9, k_base=8, lam=1.0)
    assert ban_k(r, **args).tolist() == [4, 4]
    assert ban_k(r, **args, clip=False).tolist() == [4, 3]
    assert ban_k(r, **args, beta=1.0).tolist() == [5, 5]  # layer term only: floor(3 + 5 * .4)


def test_reading_7_at_lambda_07_no_token_runs_more_than_6_of_8_experts():
    torch.manual_seed(0)
    ratios = torch.rand(10_000)  # anything, including far outside [R_min, R_max]
    for layer_sensitivity in (0.0, 0.5, 1.0):
        k = ban_k(ratios, layer_sensitivity, r_min=0.3, r_max=0.8, k_base=8)
        assert k.min() >= 3 and k.max() <= 6
    assert ban_k(torch.tensor([0.0]), 1.0, 0.3, 0.8, k_base=8).tolist() == [6]  # floor(3 + 5 * .7 * 1)


def test_lambda_0_gives_k_min_and_exact_integers_do_not_slip_below():
    assert ban_k(torch.tensor([0.1, 0.9]), 1.0, 0.2, 0.8, 8, lam=0.0).tolist() == [3, 3]
    # S = 1 exactly: K = 3 + 5 * 1 = 8.0, computed in float64 so it floors to 8, not 7.
    assert ban_k(torch.tensor([0.1]), 1.0, 0.2, 0.8, 8, lam=1.0).tolist() == [8]


def test_equal_r_min_and_r_max_leaves_only_the_layer_term():
    assert ban_k(torch.tensor([0.1, 0.5, 0.9]), 0.8, 0.5, 0.5, 8, lam=1.0).tolist() == [5, 5, 5]  # floor(3 + 5 * .4)


def test_ban_keeps_a_prefix_of_the_model_routing_and_renormalises():
    r = ban(logits_of(PEAKED, FLAT), SPEC, layer_sensitivity=0.4, r_min=0.5, r_max=0.9, lam=1.0)
    assert r.k.tolist() == [4, 6]
    base = route(logits_of(PEAKED, FLAT), SPEC).indices
    assert r.indices[0].tolist() == [1, 4, 3, 6, E, E, E, E]
    assert r.indices[1, :6].tolist() == base[1, :6].tolist() and r.indices[1, 6:].tolist() == [E, E]
    close(r.weights[0], [0.40 / 0.86, 0.20 / 0.86, 0.16 / 0.86, 0.10 / 0.86, 0, 0, 0, 0])
    assert ban(logits_of(FLAT), SPEC, 0.4, 0.5, 0.9, lam=1.0, clip=False).k.tolist() == [7]


def test_the_literal_top_3_numerator_differs_from_top_k_min_when_k_min_is_not_3():
    logits = logits_of(PEAKED)
    # top-2/top-8 = .6: T' = .75, S = .575, K = floor(2 + 6 * .575) = 5; top-3 .76: T' = .35, S = .375, K = 4.
    assert ban(logits, SPEC, 0.4, 0.5, 0.9, k_min=2, lam=1.0).k.tolist() == [5]
    assert ban(logits, SPEC, 0.4, 0.5, 0.9, k_min=2, lam=1.0, ratio_k_num=3).k.tolist() == [4]


@pytest.mark.parametrize("tokens", [0, 1])
def test_shapes_for_zero_and_one_token_and_bf16(tokens):
    logits = torch.randn(tokens, E).bfloat16()
    r = ban(logits, SPEC, 0.5, 0.4, 0.8)
    assert r.indices.shape == (tokens, 8) and r.k.shape == (tokens,) and r.weights.dtype == torch.float32
    assert token_ratio(logits, SPEC).shape == (tokens,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k_min=0), "k_min"),
        (dict(k_min=9), "k_min"),
        (dict(lam=-0.1), "lam"),
        (dict(beta=1.5), "beta"),
        (dict(layer_sensitivity=1.2), "layer_sensitivity"),
        (dict(r_min=0.9, r_max=0.5), "r_min"),
        (dict(ratio_k_num=0), "ratio_k_num"),
    ],
)
def test_bad_hyperparameters_fail_with_one_line(kwargs, match):
    args = {"layer_sensitivity": 0.5, "r_min": 0.4, "r_max": 0.8, **kwargs}
    with pytest.raises(ValueError, match=match) as err:
        ban(torch.randn(3, E), SPEC, **args)
    assert "\n" not in str(err.value)


def test_reweight_keep_leaves_the_top_k_base_weights_unrenormalised():
    r = ban(logits_of(PEAKED), SPEC, 0.4, 0.5, 0.9, lam=1.0, reweight="keep")  # K = 4 of a full top-8
    close(r.weights[0], [0.40, 0.20, 0.16, 0.10, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="reweight"):
        ban(logits_of(PEAKED), SPEC, 0.4, 0.5, 0.9, reweight="none")
