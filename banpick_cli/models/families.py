"""Built-in adapters: Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral, DeepSeek-V2, DeepSeek-V3."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from banpick_cli.models.base import MoEAdapter, register
from banpick_cli.routing import RouterSpec


@register
class Qwen3MoeAdapter(MoEAdapter):
    """Qwen3-MoE: softmax router, top-k, renormalised when `norm_topk_prob`."""

    model_types = ("qwen3_moe",)
    family = "Qwen3-MoE"

    def routing_config(self, config: Any) -> RouterSpec:
        return RouterSpec(
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            scoring="softmax",
            renormalize=bool(config.norm_topk_prob),
            weights_in_logits_dtype=True,
        )


@register
class Qwen2MoeAdapter(Qwen3MoeAdapter):
    """Qwen2-MoE: as Qwen3-MoE plus a sigmoid-gated shared expert that routing does not touch."""

    model_types = ("qwen2_moe",)
    family = "Qwen2-MoE"


@register
class OlmoeAdapter(Qwen3MoeAdapter):
    """OLMoE: the same router as Qwen3-MoE (top-8 of 64), not renormalised by default."""

    model_types = ("olmoe",)
    family = "OLMoE"


@register
class MixtralAdapter(MoEAdapter):
    """Mixtral: softmax router, top-2 of 8, always renormalised."""

    model_types = ("mixtral",)
    family = "Mixtral"
    block_names = ("mlp", "block_sparse_moe")  # vLLM and the original checkpoints keep the old name

    def routing_config(self, config: Any) -> RouterSpec:
        return RouterSpec(
            num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok,
            scoring="softmax",
            renormalize=True,
        )


@register
class DeepseekV2Adapter(MoEAdapter):
    """DeepSeek-V2: softmax, greedy or group-limited top-k, routed scaling, no renormalisation."""

    model_types = ("deepseek_v2",)
    family = "DeepSeek-V2"

    def routing_config(self, config: Any) -> RouterSpec:
        return RouterSpec(
            num_experts=config.n_routed_experts,
            top_k=config.num_experts_per_tok,
            scoring="softmax",
            renormalize=False,
            routed_scaling_factor=float(config.routed_scaling_factor),
            topk_method=getattr(config, "topk_method", "greedy"),  # V3 configs have none: set below
            n_group=int(config.n_group or 1),
            topk_group=int(config.topk_group or 1),
        )


@register
class DeepseekV3Adapter(DeepseekV2Adapter):
    """DeepSeek-V3: sigmoid scores, correction bias for choice only, group top-k, optional renorm."""

    model_types = ("deepseek_v3",)
    family = "DeepSeek-V3"

    def routing_config(self, config: Any) -> RouterSpec:
        # DeepSeek-V2's router with sigmoid scores, the bias-corrected group choice and optional renorm.
        return replace(super().routing_config(config), scoring="sigmoid", renormalize=bool(config.norm_topk_prob),
                       topk_method="noaux_tc")
