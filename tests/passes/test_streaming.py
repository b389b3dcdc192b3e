"""Streaming from the checkpoint: a meta-built model whose layers are read when they run gives the
in-memory model's numbers, holding one decoder layer at a time."""

from __future__ import annotations

import pytest
import torch

from banpick_cli.models.loading import load_model
from banpick_cli.passes.streaming import LayerSource, load_streaming
from banpick_cli.passes.usage import count_usage
from banpick_cli.passes.usage_pass import RunOptions, count_usage_pass
from tiny import FAMILIES

TEXTS = ["the quick brown fox", "def add(x, y): return x + y and more words here", "12 + 35 = 47", "lazy dog",
         "a b c d e f g", "12 * 3 = 36 so the dog jumps"]


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_profile_counts_equal_the_in_memory_model(tiny_models, family):
    path = str(tiny_models[family])
    whole = count_usage(load_model(path, device="cpu"), TEXTS, seq_len=16, batch_size=4)
    streamed = load_streaming(path, device="cpu")
    decoder_layers = len(streamed.adapter.decoder(streamed.model).layers)
    last = max(layer.layer_index for layer in streamed.layers)
    got = count_usage_pass(streamed, TEXTS, seq_len=16, batch_size=4, options=RunOptions(checkpoint_every=1))
    assert torch.equal(got.usage.expert_counts, whole.expert_counts)  # integers: exact
    assert torch.equal(got.usage.token_counts, whole.token_counts)
    # Two windows of one batch: every layer up to the last MoE layer read once per window.
    assert got.layer_loads == streamed.streamed.loads == 2 * (last + 1) <= 2 * decoder_layers
    # Between passes no decoder layer holds weights, except its router.
    routers = {id(p) for layer in streamed.layers for p in layer.router.parameters()}
    for layer in streamed.adapter.decoder(streamed.model).layers:
        assert all(p.is_meta for p in layer.parameters() if id(p) not in routers)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2"])
def test_streamed_layers_are_the_checkpoint_tensors_and_go_back_to_meta(tiny_models, family):
    path = str(tiny_models[family])
    reference = load_model(path, device="cpu")
    streamed = load_streaming(path, device="cpu")
    assert streamed.fingerprint == reference.fingerprint  # routers are resident, hashed as usual
    assert streamed.identity == reference.identity
    source = LayerSource(streamed)
    ref_layers = reference.adapter.decoder(reference.model).layers
    for i, ref_layer in enumerate(ref_layers):
        layer = source.acquire(i, torch.device("cpu"))
        want = dict(ref_layer.named_parameters())
        for name, param in layer.named_parameters():
            assert torch.equal(param, want[name]), name
        source.release(i)
        assert any(p.is_meta for p in layer.parameters())
    assert source.loads == [1] * len(ref_layers)
    with source.head(torch.device("cpu")) as (_, head):
        assert torch.equal(head.weight, reference.model.get_output_embeddings().weight)
    assert streamed.model.get_output_embeddings().weight.is_meta  # the tiny models' heads are untied


def _sharpened_checkpoint(tiny_models, family, folder):
    """Saves the scan tests' sharpened model (peaked output, strong experts: KLs far from zero) as a checkpoint."""
    from scan_helpers import sharpened

    loaded = sharpened(tiny_models[family])
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return loaded


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_kl_scan_equals_the_naive_reference(tiny_models, family, tmp_path):
    from banpick_cli.passes.kl import KLEngine
    from banpick_cli.passes.kl_math import naive_kl
    from scan_helpers import TEXTS as SCAN_TEXTS
    from test_kl import RUN, _plans

    loaded = _sharpened_checkpoint(tiny_models, family, tmp_path)
    plans = _plans(loaded)
    slow = naive_kl(loaded, SCAN_TEXTS, plans, **RUN)
    streamed = load_streaming(str(tmp_path), device="cpu")
    engine = KLEngine(streamed, SCAN_TEXTS, stack=3, **RUN)
    fast = engine.run(_plans(streamed))
    for position, values in slow.items():
        assert values.min() > 1e-4
        torch.testing.assert_close(fast[position], values, rtol=1e-5, atol=1e-7)
    # Layer-major: every decoder layer read once for the one window, whatever the number of variants.
    assert engine.windows == 1 and engine.layer_loads == [1] * len(streamed.adapter.decoder(streamed.model).layers)


def test_each_layer_loads_once_per_window_and_observers_see_every_token(tiny_models, tmp_path):
    from banpick_cli.passes.kl import KLEngine
    from banpick_cli.stages.layer_sensitivity import RatioStats
    from scan_helpers import TEXTS as SCAN_TEXTS
    from test_kl import RUN, _plans

    loaded = _sharpened_checkpoint(tiny_models, "olmoe", tmp_path)
    specs = loaded.router_specs()
    reference_ratios = RatioStats(specs, 2, 4, 10, keep_values=False)
    reference = KLEngine(loaded, SCAN_TEXTS, **RUN).run(_plans(loaded, experts=(0, 1, 2)), observers=[reference_ratios])
    streamed = load_streaming(str(tmp_path), device="cpu")
    ratios = RatioStats(streamed.router_specs(), 2, 4, 10, keep_values=False)
    engine = KLEngine(streamed, SCAN_TEXTS, hidden_cache_mb=0, **RUN)  # a window per batch, states on disk
    got = engine.run(_plans(streamed, experts=(0, 1, 2)), observers=[ratios])
    assert engine.windows == 2 and engine.layer_loads == [2, 2, 2]  # 15 variants, 3 layers, 2 windows
    assert streamed.streamed.loads == 6
    for position in reference:
        torch.testing.assert_close(got[position], reference[position], rtol=1e-6, atol=1e-9)
    assert torch.equal(ratios.hist, reference_ratios.hist) and torch.equal(ratios.min, reference_ratios.min)
