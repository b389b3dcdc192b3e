"""Tiny random-weight models of every supported family, built from the real config classes."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=320, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, intermediate_size=48, tie_word_embeddings=False)


def _configs():
    from transformers import (DeepseekV2Config, DeepseekV3Config, LlamaConfig, MixtralConfig, OlmoeConfig,
                              Qwen2MoeConfig, Qwen3MoeConfig)

    return {
        "qwen3_moe": Qwen3MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=4, moe_intermediate_size=16,
                                    norm_topk_prob=True, head_dim=8, mlp_only_layers=[1]),
        "qwen2_moe": Qwen2MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=4, moe_intermediate_size=16,
                                    shared_expert_intermediate_size=24, norm_topk_prob=False),
        "olmoe": OlmoeConfig(**COMMON, num_experts=8, num_experts_per_tok=4, norm_topk_prob=False),
        "mixtral": MixtralConfig(**COMMON, num_local_experts=6, num_experts_per_tok=2),
        "deepseek_v2": DeepseekV2Config(**{**COMMON, "num_key_value_heads": 4}, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
                                        n_shared_experts=1, first_k_dense_replace=1, topk_method="group_limited_greedy",
                                        n_group=4, topk_group=2, routed_scaling_factor=1.5, kv_lora_rank=16,
                                        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
        "deepseek_v3": DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
                                        n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
                                        routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=16,
                                        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
        "llama": LlamaConfig(**COMMON),
    }


FAMILIES = ["qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "deepseek_v2", "deepseek_v3"]


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|eos|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the quick brown fox jumps over the lazy dog", "def add(x, y): return x + y", "12 + 35 = 47"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|eos|>")
    fast.save_pretrained(out)
    return fast


def build_model(family: str, out: Path, seed: int = 0) -> Path:
    """Saves a random tiny model of `family` (and a tokenizer) under `out`; returns the directory."""
    return save_random(_configs()[family], out, seed)


def save_random(config, out: Path, seed: int = 0) -> Path:
    """Saves a model of `config` with random weights, random routers (and router biases), and the tiny
    tokenizer under `out`; returns the directory."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Router weights start at zero in some families; random routers make routing non-trivial.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight"):
                param.normal_(0, 0.5)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.1)
    model.save_pretrained(out)
    build_tokenizer(out)
    return out
