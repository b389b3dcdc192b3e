"""The KL engine: appendix B's formula, fast path equal to the naive reference on every family, least work."""

from __future__ import annotations

import pytest
import torch

from banpick_cli.passes import kl as kl_module
from banpick_cli.passes.kl import KLEngine
from banpick_cli.passes.kl_math import LayerPlan, naive_kl, target_log_probs, top_targets, topk_kl
from banpick_cli.stages.kl_scan import prune_variant
from banpick_cli.stages.layer_sensitivity import k_min_variant
from scan_helpers import TEXTS, sharpened
from tiny import FAMILIES

RUN = dict(seq_len=16, batch_size=3, top_tokens=50)  # 5 texts in batches of 3 and 2, padded


def test_topk_kl_is_appendix_b_by_hand():
    torch.manual_seed(0)
    zp, zq = torch.randn(3, 40) * 3, torch.randn(3, 40) * 3
    values, indices = top_targets(zp, 10)
    log_p = target_log_probs(values)
    got = topk_kl(log_p, indices, zq)
    p, q = zp.double().softmax(-1), zq.double().softmax(-1)
    for row in range(3):
        top = torch.argsort(p[row], descending=True)[:10]
        p1 = p[row, top] / p[row, top].sum()
        q1 = q[row, top] / q[row, top].sum()
        assert got[row].item() == pytest.approx(float((p1 * (p1 / q1).log()).sum()), rel=1e-6)
    # k = vocabulary: the plain KL; q's normaliser never matters; identical models give 0.
    all_values, all_indices = top_targets(zp, 40)
    full = topk_kl(target_log_probs(all_values), all_indices, zq)
    assert torch.allclose(full, (p * (p.log() - q.log())).sum(-1), rtol=1e-6)
    assert torch.allclose(topk_kl(log_p, indices, zq.double() + 7.0), got, rtol=1e-9)
    assert torch.all(topk_kl(log_p, indices, zp).abs() < 1e-12)


def _plans(loaded, experts=(0,)):
    specs = loaded.router_specs()
    plans = []
    for layer in loaded.layers:
        spec = specs[layer.position]
        variants = [prune_variant(spec, e) for e in experts] + [prune_variant(spec, 1, "drop"), k_min_variant(spec, 1)]
        plans.append(LayerPlan(layer.position, tuple(variants)))
    return plans


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_equals_naive_reference(tiny_models, family):
    loaded = sharpened(tiny_models[family])
    plans = _plans(loaded)
    fast = KLEngine(loaded, TEXTS, stack=3, **RUN).run(plans)
    slow = naive_kl(loaded, TEXTS, plans, **RUN)
    assert sorted(fast) == [layer.position for layer in loaded.layers]
    for position, values in slow.items():
        assert values.min() > 1e-4  # pruning visibly moves the output, so equality means something
        torch.testing.assert_close(fast[position], values, rtol=1e-5, atol=1e-7)


def test_stacking_chunking_sorting_and_recomputed_inputs_change_nothing(tiny_models, monkeypatch):
    loaded = sharpened(tiny_models["olmoe"])  # three MoE layers
    plans = _plans(loaded, experts=(0, 1, 2))
    reference = KLEngine(loaded, TEXTS, stack=1, sort_by_length=False, **RUN).run(plans)
    monkeypatch.setitem(kl_module.LOGITS_BUDGET, "cpu", 320 * 7)  # seven tokens of LM-head output at a time
    engine = KLEngine(loaded, TEXTS, stack=4, hidden_cache_mb=0, **RUN)  # one batch per window, states on disk
    other = engine.run(plans)
    assert engine.windows == 2 and any("disk" in note for note in engine.notes)
    for position in reference:
        torch.testing.assert_close(other[position], reference[position], rtol=1e-6, atol=1e-9)


def test_layers_before_the_variant_run_once_per_batch(tiny_models):
    loaded = sharpened(tiny_models["olmoe"])
    layers = loaded.adapter.decoder(loaded.model).layers
    calls = [0] * len(layers)
    handles = [layer.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1)) for i, layer in enumerate(layers)]
    last = loaded.layers[-1]
    plan = LayerPlan(last.position, tuple(prune_variant(loaded.router_specs()[last.position], e) for e in range(5)))
    KLEngine(loaded, TEXTS, stack=8, **RUN).run([plan])
    for handle in handles:
        handle.remove()
    assert calls == [2, 2, 2 + 2]  # 2 batches in pass 1; the last layer once more per batch, 5 variants stacked


def test_out_of_memory_halves_the_work_and_says_so(tiny_models, monkeypatch):
    loaded = sharpened(tiny_models["qwen3_moe"])
    plans = _plans(loaded, experts=(0, 1, 2, 3))
    reference = KLEngine(loaded, TEXTS, stack=8, **RUN).run(plans)
    layer = loaded.adapter.decoder(loaded.model).layers[-1]
    real_forward = layer.forward

    def small_memory(hidden, *args, **kwargs):
        if hidden.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(hidden, *args, **kwargs)

    monkeypatch.setattr(layer, "forward", small_memory)
    engine = KLEngine(loaded, TEXTS, stack=8, **RUN)
    got = engine.run(plans)
    assert any("out of memory" in note for note in engine.notes)
    assert engine.stack == 1
    for position in reference:
        torch.testing.assert_close(got[position], reference[position], rtol=1e-6, atol=1e-9)


def test_top_tokens_is_clamped_to_the_vocabulary(tiny_models):
    loaded = sharpened(tiny_models["qwen3_moe"])
    engine = KLEngine(loaded, TEXTS, seq_len=16, top_tokens=10_000)
    assert engine.top_tokens == 320 and "larger than the vocabulary" in engine.notes[0]
    plans = _plans(loaded, experts=(0,))[:1]
    torch.testing.assert_close(engine.run(plans)[0], naive_kl(loaded, TEXTS, plans, seq_len=16, top_tokens=10_000)[0])
