"""route(logits, spec) equals each transformers 5.24 router's (weights, indices), bit for bit."""

import pytest
import torch
from transformers import (
    DeepseekV2Config,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from banpick_cli.routing import RouterSpec, route

H = 32  # hidden size
SMALL = dict(hidden_size=H, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2)


def qwen_like(config_cls, router_cls, norm):
    config = config_cls(**SMALL, num_experts=16, num_experts_per_tok=4, norm_topk_prob=norm)
    spec = RouterSpec(16, 4, "softmax", norm, weights_in_logits_dtype=True)
    return router_cls(config), spec


def mixtral():
    config = MixtralConfig(**SMALL, num_local_experts=8, num_experts_per_tok=2)
    return MixtralTopKRouter(config), RouterSpec(8, 2, "softmax", True)


def deepseek_v2(method):
    groups = dict(n_group=4, topk_group=2) if method == "group_limited_greedy" else {}
    config = DeepseekV2Config(**SMALL, n_routed_experts=16, num_experts_per_tok=6, topk_method=method,
                              routed_scaling_factor=16.0, **groups)
    spec = RouterSpec(16, 6, "softmax", False, 16.0, method, groups.get("n_group", 1), groups.get("topk_group", 1))
    return DeepseekV2TopkRouter(config), spec


def deepseek_v3(norm, n_group, topk_group):
    config = DeepseekV3Config(**SMALL, n_routed_experts=16, num_experts_per_tok=4, n_group=n_group,
                              topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=2.5)
    router = DeepseekV3TopkRouter(config)
    router.e_score_correction_bias.normal_(0.0, 0.2)
    return router, lambda r: RouterSpec(16, 4, "sigmoid", norm, 2.5, "noaux_tc", n_group, topk_group,
                                        r.e_score_correction_bias)


CASES = {
    "qwen3_moe": lambda: qwen_like(Qwen3MoeConfig, Qwen3MoeTopKRouter, True),
    "qwen3_moe_no_norm": lambda: qwen_like(Qwen3MoeConfig, Qwen3MoeTopKRouter, False),
    "qwen2_moe": lambda: qwen_like(Qwen2MoeConfig, Qwen2MoeTopKRouter, False),
    "olmoe": lambda: qwen_like(OlmoeConfig, OlmoeTopKRouter, False),
    "mixtral": mixtral,
    "deepseek_v2_greedy": lambda: deepseek_v2("greedy"),
    "deepseek_v2_group_limited": lambda: deepseek_v2("group_limited_greedy"),
    "deepseek_v3": lambda: deepseek_v3(True, 4, 2),
    "deepseek_v3_no_norm_one_group": lambda: deepseek_v3(False, 1, 1),
}


def by_index(weights, indices):
    order = indices.argsort(dim=-1)
    return weights.gather(1, order), indices.gather(1, order)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_route_reproduces_the_hf_router(name, dtype):
    torch.manual_seed(sum(map(ord, name)))
    router, spec = CASES[name]()
    torch.nn.init.normal_(router.weight, std=0.5)
    router = router.to(dtype)
    spec = spec(router) if callable(spec) else spec
    hidden = torch.randn(64, H, dtype=dtype)
    with torch.no_grad():
        logits, weights, indices = router(hidden)
    ours = route(logits, spec)
    assert ours.weights.dtype == weights.dtype  # Qwen-like: logits dtype; Mixtral, DeepSeek: float32
    hf_w, hf_i = by_index(weights, indices)
    our_w, our_i = by_index(ours.weights, ours.indices)
    assert torch.equal(our_i, hf_i)
    assert torch.equal(our_w, hf_w)
    assert ours.k.tolist() == [spec.top_k] * 64
    # Our slots are in the router's preference order (the HF routers with sorted=True agree exactly).
    if name.startswith(("qwen", "olmoe", "mixtral")):
        assert torch.equal(ours.indices, indices)
