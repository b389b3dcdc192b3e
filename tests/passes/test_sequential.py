"""Layer-by-layer onloading and --device-map give exactly the counts of the whole-model pass."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from banpick_cli.passes.batches import batches
from banpick_cli.passes.sequential import run_layerwise
from banpick_cli.passes.usage import count_usage
from banpick_cli.passes.usage_pass import RunOptions, count_usage_pass
from banpick_cli.errors import BadSetting
from banpick_cli.models.loading import load_model
from tiny import FAMILIES

TEXTS = ["the quick brown fox", "def add(x, y): return x + y and more words here", "12 + 35 = 47", "lazy dog",
         "a b c d e f g", "12 * 3 = 36 so the dog jumps"]


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_equals_whole_model(tiny_models, family):
    loaded = load_model(str(tiny_models[family]), device="cpu")
    whole = count_usage(loaded, TEXTS, seq_len=16, batch_size=4)
    layered = count_usage_pass(loaded, TEXTS, seq_len=16, batch_size=4, options=RunOptions(sequential=True, checkpoint_every=1))
    assert torch.equal(layered.usage.expert_counts, whole.expert_counts)
    assert torch.equal(layered.usage.token_counts, whole.token_counts)
    assert layered.usage.samples == len(TEXTS) and layered.batches == 2
    # Windows of batches through the whole model: the same again.
    windowed = count_usage_pass(loaded, TEXTS, seq_len=16, batch_size=4, options=RunOptions(checkpoint_every=1))
    assert torch.equal(windowed.usage.expert_counts, whole.expert_counts)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_layerwise_hidden_states_match_the_decoder(tiny_models, family):
    """The states after the last MoE layer equal the whole decoder's, on every real token."""
    loaded = load_model(str(tiny_models[family]), device="cpu")
    window = list(batches(loaded.tokenizer, TEXTS, seq_len=16, batch_size=3, device=torch.device("cpu")))
    states = run_layerwise(loaded, window, device=torch.device("cpu"))
    last = max(layer.layer_index for layer in loaded.layers)
    decoder = loaded.adapter.decoder(loaded.model)
    seen = []
    handle = decoder.layers[last].register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.inference_mode():
        for batch in window:
            decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    handle.remove()
    for batch, state, reference in zip(window, states, seen):
        real = batch.attention_mask.bool()
        torch.testing.assert_close(state[real], reference[real], rtol=0, atol=0)
    # The layers went back where they were kept.
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate not installed")
def test_device_map_auto_loads_and_counts_the_same(tiny_models):
    path = str(tiny_models["qwen3_moe"])
    mapped = load_model(path, device_map="auto")
    plain = load_model(path, device="cpu")
    assert mapped.fingerprint == plain.fingerprint
    assert mapped.device == mapped.model.get_input_embeddings().weight.device
    assert torch.equal(count_usage(mapped, TEXTS, seq_len=16, batch_size=4).expert_counts,
                       count_usage(plain, TEXTS, seq_len=16, batch_size=4).expert_counts)


def test_sequential_and_device_map_exclude_each_other():
    with pytest.raises(BadSetting, match="--device-map"):
        RunOptions(sequential=True, device_map="auto")
    with pytest.raises(BadSetting, match="--checkpoint-every"):
        RunOptions(checkpoint_every=-1)
