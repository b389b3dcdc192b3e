"""What the appendix-E baselines are calibrated from: DES medians, ODP's key-token metric, RICE's nPMI."""

from __future__ import annotations

import math

import pytest
import torch

from acc_helpers import calib_file
from banpick_cli.passes.baseline_params import des_calibration, odp_key_tokens, rice_cognitive_experts
from banpick_cli.errors import BadSetting
from banpick_cli.models.loading import load_model
from banpick_cli.routing import des_thresholds, probs


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return load_model(str(tiny_models["qwen3_moe"]), device="cpu")


def _router_logits(loaded, texts):
    """Reference: each MoE layer's router logits on every real token, one unpadded text at a time."""
    from banpick_cli.models.base import RoutingHooks

    seen = [[] for _ in loaded.layers]
    hooks = RoutingHooks(loaded.layers, loaded.routing.num_experts,
                         observers=[lambda pos, logits, w, i: seen[pos].append(logits.detach().clone())])
    with hooks, torch.no_grad():
        for text in texts:
            loaded.model(input_ids=torch.tensor([loaded.tokenizer(text).input_ids]))
    return [torch.cat(rows) for rows in seen]


def test_des_medians_per_layer_over_real_tokens(loaded, tmp_path):
    texts = [f"{i} + {i * 7} is {i * 8}, said the fox" + " again" * (i % 4) for i in range(7)]  # ragged: padding
    got = des_calibration(loaded, texts, batch_size=3)
    specs = loaded.router_specs()
    want = torch.stack([des_thresholds(probs(logits, spec), 2, 3) for logits, spec in zip(_router_logits(loaded, texts), specs)])
    assert got.shape == (2, 1) and torch.allclose(got, want, atol=1e-6)


def test_odp_key_token_metric_by_hand():
    # one sequence of 3 real tokens after 1 pad; 1 head
    attn = torch.zeros(1, 1, 4, 4)
    attn[0, 0, 1, 1] = 1.0
    attn[0, 0, 2, 1:3] = torch.tensor([0.5, 0.5])
    attn[0, 0, 3, 1:4] = torch.tensor([0.6, 0.1, 0.3])
    attn[0, 0, 0, 0] = 1.0  # the pad row: dropped
    hidden = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])  # L1 norms 18, 1, 2, 1
    real = torch.tensor([[False, True, True, True]])
    # received / queries that see it * |x|_1: pos1 (1+.5+.6)/3*1 = .7, pos2 (.5+.1)/2*2 = .6, pos3 .3/1*1 = .3
    assert odp_key_tokens(attn, hidden, real, 0.34).tolist() == [[False, True, True, False]]  # ceil(.34*3) = 2
    assert odp_key_tokens(attn, hidden, real, 0.01).tolist() == [[False, True, False, False]]  # at least one
    assert not odp_key_tokens(attn, hidden, real, 0.0).any()


def test_rice_npmi_and_markers(loaded):
    texts = ["so the dog jumps", "the dog and the cat", "12 + 35 = 47 says the dog"]
    experts, npmi = rice_cognitive_experts(loaded, texts, ["the"], top=2)
    assert experts.sum() == 2 and npmi.shape == (2, 8)
    top2 = {divmod(int(i), 8) for i in torch.topk(npmi.flatten(), 2).indices}
    assert set(map(tuple, experts.nonzero().tolist())) == top2
    # nPMI by hand for layer 1's most marker-bound expert, from the router's own top-4 on every token
    ids = torch.cat([torch.tensor(loaded.tokenizer(t).input_ids) for t in texts])
    marker = torch.tensor([loaded.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("the", " the")])
    is_marker = torch.isin(ids, marker)
    chosen = torch.topk(probs(_router_logits(loaded, texts)[1], loaded.router_specs()[1]), 4).indices  # [T, 4]
    sel = torch.zeros(len(ids), 8, dtype=torch.bool).scatter_(1, chosen, True)
    n = len(ids)
    e = int(sel[is_marker].sum(0).argmax())
    p_xy, p_x, p_y = float(sel[is_marker, e].sum()) / n, float(is_marker.sum()) / n, float(sel[:, e].sum()) / n
    assert float(npmi[1, e]) == pytest.approx(math.log2(p_xy / (p_x * p_y)) / -math.log2(p_xy), abs=1e-5)
    with pytest.raises(BadSetting, match="no <think>"):
        rice_cognitive_experts(loaded, texts, None)
