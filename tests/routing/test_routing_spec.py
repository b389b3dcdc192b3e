"""RouterSpec validation and the Routing container."""

import pytest
import torch

from banpick_cli.routing import RouterSpec, Routing


def test_a_valid_spec_keeps_its_fields_and_compares_by_value():
    bias = torch.tensor([0.1, -0.2, 0.0, 0.3], dtype=torch.float64)
    a = RouterSpec(4, 2, "sigmoid", True, 2.5, "noaux_tc", 2, 1, bias)
    b = RouterSpec(4, 2, "sigmoid", True, 2.5, "noaux_tc", 2, 1, bias.clone())
    assert a == b and hash(a) == hash(b)
    assert a.correction_bias.dtype == torch.float32  # stored as float32, detached
    assert a != RouterSpec(4, 2, "sigmoid", True, 2.5, "noaux_tc", 2, 1, None)
    assert a.group_size == 2 and a.available() == 2
    assert RouterSpec(8, 2, "softmax", False).available() == 8


@pytest.mark.parametrize(
    "kwargs, names",
    [
        (dict(num_experts=0), "num_experts"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=9), "top_k"),
        (dict(scoring="relu"), "scoring"),
        (dict(renormalize=1), "renormalize"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor"),
        (dict(topk_method="sorted"), "topk_method"),
        (dict(n_group=3), "n_group"),
        (dict(n_group=2, topk_group=3), "topk_group"),
        (dict(topk_method="noaux_tc", n_group=8, topk_group=4), "top-2"),
        (dict(topk_method="group_limited_greedy", n_group=4, topk_group=1, top_k=3), "cannot hold"),
        (dict(correction_bias=torch.zeros(7)), "correction_bias"),
        (dict(correction_bias=torch.zeros(8, dtype=torch.long)), "correction_bias"),
    ],
)
def test_a_bad_spec_fails_with_one_line_naming_it(kwargs, names):
    base = dict(num_experts=8, top_k=2, scoring="softmax", renormalize=True)
    with pytest.raises(ValueError, match=names) as err:
        RouterSpec(**{**base, **kwargs})
    assert "\n" not in str(err.value)


def test_sentinel_free_points_empty_slots_at_the_first_expert_with_weight_zero():
    r = Routing(torch.tensor([[3, 1, 4, 4], [4, 4, 4, 4]]), torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.0] * 4]),
                torch.tensor([2, 0]))
    s = r.sentinel_free(4)
    assert s.indices.tolist() == [[3, 1, 3, 3], [0, 0, 0, 0]]
    assert s.weights.tolist() == r.weights.tolist() and s.k.tolist() == [2, 0]
    assert r.width == 4 and r.as_router_output()[1] is r.indices
