"""DeepSeek-V3's FP8 checkpoints stream: each layer's float8 weights are dequantized with their 128x128
block scales (edge blocks partial) as the layer is read, giving exactly the counts of the checkpoint's
dequantized twin."""

from __future__ import annotations

import pytest
import torch

from banpick_cli.errors import ModelError
from banpick_cli.models.loading import load_model
from banpick_cli.passes.streaming import LayerSource, load_streaming
from banpick_cli.passes.usage import count_usage
from banpick_cli.passes.usage_pass import count_usage_pass
from fp8_helpers import write_fp8_pair
from test_streaming import TEXTS


@pytest.fixture(scope="module")
def v3_source(tmp_path_factory):
    """A small DeepSeek-V3 whose projections span two 128-blocks with a partial edge (hidden 160, experts 136 wide)."""
    from transformers import DeepseekV3Config

    from tiny import COMMON, save_random

    config = DeepseekV3Config(**{**COMMON, "hidden_size": 160, "num_key_value_heads": 4}, n_routed_experts=8,
                              num_experts_per_tok=3, moe_intermediate_size=136, n_shared_experts=1, first_k_dense_replace=1,
                              n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=16,
                              q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=32, v_head_dim=32)
    return save_random(config, tmp_path_factory.mktemp("v3-source"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_checkpoint_streams_to_the_counts_of_its_dequantized_twin(v3_source, tmp_path, dtype):
    fp8, twin = tmp_path / "fp8", tmp_path / "twin"
    assert write_fp8_pair(v3_source, fp8, twin, twin_dtype=dtype) > 20  # every projection of 3 layers, experts included
    name = str(dtype).replace("torch.", "")
    streamed = load_streaming(str(fp8), device="cpu", dtype=name)
    got = count_usage_pass(streamed, TEXTS * 2, seq_len=16, batch_size=4).usage
    reference = load_model(str(twin), device="cpu", dtype=name)
    want = count_usage(reference, TEXTS * 2, seq_len=16, batch_size=4)
    assert torch.equal(got.expert_counts, want.expert_counts) and torch.equal(got.token_counts, want.token_counts)
    # Bit for bit: every streamed parameter is the twin's (float32 product, one rounding to the dtype).
    source = LayerSource(streamed)
    for i, ref_layer in enumerate(reference.adapter.decoder(reference.model).layers):
        want_params = dict(ref_layer.named_parameters())
        for pname, param in source.acquire(i, torch.device("cpu")).named_parameters():
            assert param.dtype == want_params[pname].dtype and torch.equal(param, want_params[pname]), (i, pname)
        source.release(i)


def test_fp8_checkpoint_in_memory_on_the_cpu_says_to_stream(v3_source, tmp_path):
    write_fp8_pair(v3_source, tmp_path / "fp8", tmp_path / "twin")
    with pytest.raises(ModelError, match="--stream") as err:
        load_model(str(tmp_path / "fp8"), device="cpu")
    assert "\n" not in str(err.value)
