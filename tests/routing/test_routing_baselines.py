"""Baselines of appendix E: dynamic (top-p) routing, DES, ODP, RICE."""

import pytest
import torch

from banpick_cli.routing import (
    RouterSpec,
    des,
    des_bounds,
    des_ratios,
    des_thresholds,
    dynamic,
    dynamic_k,
    odp,
    probs,
    rice,
    route,
)

E = 8
#          e0    e1    e2    e3    e4    e5    e6    e7
TOKEN = [0.06, 0.40, 0.01, 0.16, 0.20, 0.05, 0.10, 0.02]  # sorted: .40 .20 .16 .10 .06 .05 .02 .01
SPEC = RouterSpec(E, 4, "softmax", True)


def logits_of(*rows):
    return torch.tensor(rows, dtype=torch.float64).log().float()


def close(actual, expected):
    torch.testing.assert_close(actual.float(), torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


def test_dynamic_k_is_the_fewest_experts_reaching_tau():
    logits = logits_of(TOKEN)  # cumulative: .40 .60 .76 .86 .92 .97 .99 1
    assert [dynamic_k(logits, SPEC, tau).item() for tau in (0.3, 0.5, 0.7, 0.9)] == [1, 2, 3, 5]
    assert dynamic_k(logits, SPEC, 0.9, cap=4).item() == 4
    # Over the renormalised top-4 (.465 .698 .884 1): .7 needs 3, .9 needs 4.
    assert [dynamic_k(logits, SPEC, tau, over="topk").item() for tau in (0.7, 0.9)] == [3, 4]


def test_dynamic_routing_runs_those_experts_with_the_model_weights():
    r = dynamic(logits_of(TOKEN), SPEC, 0.7)
    assert r.indices.tolist() == [[1, 4, 3, E, E, E, E, E]]  # width: every expert, no cap
    close(r.weights, [[0.40 / 0.76, 0.20 / 0.76, 0.16 / 0.76, 0, 0, 0, 0, 0]])
    assert dynamic(logits_of(TOKEN), SPEC, 0.7, cap=4).indices.tolist() == [[1, 4, 3, E]]


def test_des_bounds_scale_4_to_6_of_8():
    assert [des_bounds(k) for k in (2, 3, 4, 6, 8, 16)] == [(1, 2), (2, 3), (2, 3), (3, 5), (4, 6), (8, 12)]
    with pytest.raises(ValueError, match="k_base"):
        des_bounds(1)


CALIB = torch.tensor([
    [0.5, 0.4, 0.3, 0.12, 0.10, 0.08, 0.01, 0.005],  # r4/r5 1.2, r5/r6 1.25
    [0.5, 0.4, 0.3, 0.15, 0.10, 0.05, 0.01, 0.005],  # 1.5, 2.0
    [0.5, 0.4, 0.3, 0.20, 0.10, 0.08, 0.01, 0.005],  # 2.0, 1.25
    [0.5, 0.4, 0.35, 0.30, 0.10, 0.09, 0.01, 0.005],  # 3.0, 1.111
])


def test_des_thresholds_are_true_medians():
    close(des_ratios(CALIB, 4, 6), [[1.2, 1.25], [1.5, 2.0], [2.0, 1.25], [3.0, 0.10 / 0.09]])
    close(des_thresholds(CALIB, 4, 6), [1.75, 1.25])  # torch.median would give 1.5 for the first
    close(des_thresholds(CALIB[:3], 4, 6), [1.5, 1.25])  # odd count: the middle one


def test_des_keeps_k_lo_if_the_first_ratio_exceeds_its_median_else_steps_up():
    logits = CALIB.log()  # softmax rescales each row; ratios stay
    spec = RouterSpec(E, 8, "softmax", True)
    r = des(logits, spec, torch.tensor([1.75, 1.4]))
    assert r.k.tolist() == [6, 5, 4, 4]  # 1.2/1.25 -> 6; 1.5/2.0 -> 5; 2.0 -> 4; 3.0 -> 4
    assert r.indices.shape == (4, 6)
    assert r.indices[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert r.indices[1].tolist() == [0, 1, 2, 3, 4, E]
    row = CALIB[2, :4].double()
    close(r.weights[2], (row / row.sum()).tolist() + [0, 0])
    exactly = des_ratios(probs(logits, spec), 4, 6)[2]  # token 2's own ratios as the medians
    assert des(logits, spec, exactly).k[2].item() == 6  # strict >: equal to its median does not prune


def test_odp_keeps_k_hi_on_key_tokens():
    logits = CALIB.log()
    spec = RouterSpec(E, 8, "softmax", True)
    key = torch.tensor([False, False, True, False])
    assert odp(logits, spec, torch.tensor([1.75, 1.4]), key).k.tolist() == [6, 5, 6, 4]


def test_rice_multiplies_the_final_weights_of_selected_cognitive_experts():
    cognitive = torch.zeros(E, dtype=torch.bool)
    cognitive[[4, 2]] = True  # e4 selected, e2 not
    r = rice(logits_of(TOKEN), SPEC, cognitive, 2.0)
    assert r.indices.tolist() == route(logits_of(TOKEN), SPEC).indices.tolist() == [[1, 4, 3, 6]]
    close(r.weights, [[0.40 / 0.86, 0.40 / 0.86, 0.16 / 0.86, 0.10 / 0.86]])  # sums to 1.23, not 1
    renormed = rice(logits_of(TOKEN), SPEC, cognitive, 2.0, renormalize=True)
    close(renormed.weights, [[0.40 / 1.06, 0.40 / 1.06, 0.16 / 1.06, 0.10 / 1.06]])


@pytest.mark.parametrize("tokens", [0, 1])
def test_shapes_for_zero_and_one_token_and_bf16(tokens):
    logits = torch.randn(tokens, E).bfloat16()
    spec = RouterSpec(E, 8, "softmax", True)
    assert dynamic(logits, spec, 0.8).indices.shape == (tokens, 8)
    assert des(logits, spec, torch.tensor([1.5, 1.5])).indices.shape == (tokens, 6)
    assert odp(logits, spec, torch.tensor([1.5, 1.5]), torch.zeros(tokens, dtype=torch.bool)).k.shape == (tokens,)
    assert rice(logits, spec, torch.ones(E, dtype=torch.bool), 1.5).weights.shape == (tokens, 8)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: dynamic(torch.randn(2, E), SPEC, 0.0), "tau"),
        (lambda: dynamic(torch.randn(2, E), SPEC, 0.5, over="sorted"), "over"),
        (lambda: dynamic(torch.randn(2, E), SPEC, 0.5, cap=0), "k must"),
        (lambda: des(torch.randn(2, E), SPEC, torch.tensor([1.0, 1.0, 1.0])), "thresholds"),
        (lambda: des(torch.randn(2, E), SPEC, torch.tensor([1.0]), k_lo=3), "k_lo and k_hi"),
        (lambda: des_ratios(torch.rand(2, E), 4, 4), "k_lo < k_hi"),
        (lambda: des_thresholds(torch.rand(0, E), 4, 6), "calibration"),
        (lambda: rice(torch.randn(2, E), SPEC, torch.ones(E, dtype=torch.bool), 0.0), "factor"),
        (lambda: odp(torch.randn(2, E), SPEC, torch.tensor([1.0]), torch.ones(3, dtype=torch.bool)), "key_tokens"),
    ],
)
def test_bad_options_fail_with_one_line(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)
