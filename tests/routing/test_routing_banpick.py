"""Ban&Pick (paper section 6.1): Ban from the unmodified routing, then Pick C with range top-2*K_i."""

import pytest
import torch

from banpick_cli.routing import RouterSpec, ban, ban_pick

E = 10
#           e0    e1    e2    e3    e4     e5    e6     e7    e8    e9
TOKEN = [0.04, 0.10, 0.30, 0.05, 0.015, 0.25, 0.005, 0.15, 0.03, 0.06]
# ranks: e2 e5 e7 e1 | e9 e3 e0 e8 | e4 e6.  K_base 4, K_min 2: R = top-2/top-4 = .55/.80 = .6875;
# with L' .4, R_min .5, R_max .9, lam 1: T' = .53125, S = .465625, K = floor(2 + 2 * .465625) = 2.
SPEC = RouterSpec(E, 4, "softmax", True)
ARGS = dict(layer_sensitivity=0.4, r_min=0.5, r_max=0.9, k_min=2, lam=1.0)


def logits_of(*rows):
    return torch.tensor(rows, dtype=torch.float64).log().float()


def keys(*ids):
    mask = torch.zeros(E, dtype=torch.bool)
    mask[list(ids)] = True
    return mask


def close(actual, expected):
    torch.testing.assert_close(actual.float(), torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


def test_ban_alone_keeps_two():
    r = ban(logits_of(TOKEN), SPEC, **ARGS)
    assert r.indices.tolist() == [[2, 5, E, E]] and r.k.tolist() == [2]


def test_a_key_expert_ban_pruned_comes_back_when_within_top_2_k_i():
    # Key: e7 (rank 3, pruned by Ban, within top-4 = 2 * K_i) and e3 (rank 6, outside).
    r = ban_pick(logits_of(TOKEN), SPEC, keys(7, 3), **ARGS)
    assert r.indices.tolist() == [[2, 5, 7, E, E, E]]  # width K_base + |key| = 6
    close(r.weights, [[0.30 / 0.70, 0.25 / 0.70, 0.15 / 0.70, 0, 0, 0]])
    assert r.k.tolist() == [3]


def test_range_over_2_k_base_reaches_further():
    r = ban_pick(logits_of(TOKEN), SPEC, keys(7, 3), **ARGS, range_base="base")  # top-8 reaches e3
    assert r.indices.tolist() == [[2, 5, 7, 3, E, E]]
    close(r.weights, [[0.30 / 0.75, 0.25 / 0.75, 0.15 / 0.75, 0.05 / 0.75, 0, 0]])


def test_no_key_expert_gives_exactly_ban():
    logits = torch.randn(32, E)
    a, b = ban_pick(logits, SPEC, keys(), **ARGS), ban(logits, SPEC, **ARGS)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights) and torch.equal(a.k, b.k)


@pytest.mark.parametrize("tokens", [0, 1])
def test_shapes_for_zero_and_one_token_and_bf16(tokens):
    r = ban_pick(torch.randn(tokens, E).bfloat16(), SPEC, keys(1, 3), **ARGS)
    assert r.indices.shape == (tokens, 6) and r.weights.shape == (tokens, 6) and r.k.shape == (tokens,)


def test_bad_options_fail_with_one_line():
    for kwargs, match in [(dict(range_base="all"), "range_base"), (dict(range_factor=-1.0), "range_factor"),
                          (dict(beta=2.0), "beta")]:
        with pytest.raises(ValueError, match=match):
            ban_pick(logits_of(TOKEN), SPEC, keys(7), **{**ARGS, **kwargs})
