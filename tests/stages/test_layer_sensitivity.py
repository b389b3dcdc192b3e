"""layer-sensitivity: W_l against the reference, R statistics against a direct count, resume, bad input; every family."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

from banpick_cli.passes.kl_math import LayerPlan, naive_kl
from banpick_cli.stages.kl_scan import KLScanSettings, run_kl_scan
from banpick_cli.passes.resume import read_sidecar, sidecar_path
from banpick_cli.stages.layer_sensitivity import LayerSensitivitySettings, k_min_variant, run_layer_sensitivity
from banpick_cli.errors import BadSetting, Interrupted
from banpick_cli.models.base import RoutingHooks
from banpick_cli.profile import read_profile
from banpick_cli.routing import token_ratio
from scan_helpers import TEXTS, same, sharpened
from tiny import FAMILIES


def _settings(data_file, **overrides):
    base = dict(data=str(data_file), samples=len(TEXTS), seq_len=16, batch_size=3, top_tokens=50, k_min=2)
    return LayerSensitivitySettings(**{**base, **overrides})


def _ratios_by_hand(loaded, k_num):
    """Returns R per layer [tokens] from plain forwards, one text at a time (no padding)."""
    specs = loaded.router_specs()
    found = [[] for _ in loaded.layers]

    def record(position, logits, weights, indices):
        found[position].append(token_ratio(logits, specs[position], k_num, loaded.routing.top_k))

    with torch.inference_mode(), RoutingHooks(loaded.layers, loaded.routing.num_experts, observers=[record]):
        for text in TEXTS:
            loaded.model(**loaded.tokenizer(text, return_tensors="pt", truncation=True, max_length=16), use_cache=False)
    return [torch.cat(r) for r in found]


def test_layer_kl_and_ratios_match_references(tiny_models, profiled, data_file, tmp_path):
    loaded = sharpened(tiny_models["olmoe"])
    path = tmp_path / "p.safetensors"
    shutil.copy(profiled("olmoe"), path)
    result = run_layer_sensitivity(_settings(data_file), profile=path, loaded=loaded)
    prof = read_profile(path, fingerprint=loaded.fingerprint)

    specs = loaded.router_specs()
    plans = [LayerPlan(p, (k_min_variant(specs[p], 2),)) for p in range(len(loaded.layers))]
    reference = naive_kl(loaded, TEXTS, plans, seq_len=16, batch_size=3, top_tokens=50)
    w = prof.ban.layer_kl
    torch.testing.assert_close(w, torch.stack([reference[p][0] for p in range(len(plans))]).float(), rtol=1e-5, atol=1e-7)
    lp = prof.ban.layer_sensitivity
    torch.testing.assert_close(lp, (w - w.min()) / (w.max() - w.min()))
    assert lp.min() == 0 and lp.max() == 1

    ratios = _ratios_by_hand(loaded, k_num=2)
    tokens = ratios[0].numel()
    assert result.tokens == tokens
    torch.testing.assert_close(prof.ban.ratio_min, torch.stack([r.min() for r in ratios]))
    torch.testing.assert_close(prof.ban.ratio_max, torch.stack([r.max() for r in ratios]))
    hist = prof.ban.ratio_hist
    assert hist.shape == (3, 100) and hist.sum(-1).tolist() == [tokens] * 3
    assert hist[:, : 2 * 100 // 4].sum() == 0  # R >= k_num / K_base = 2/4
    ban = prof.settings["ban"]
    assert ban == {
        "k_base": 4, "k_min": 2, "lam": 0.7, "beta": 0.5, "ratio_k_num": 2, "ratio_scope": "layer",
        "ratio_percentile": 0.0, "ratio_min_global": pytest.approx(float(torch.cat(ratios).min())),
        "ratio_max_global": pytest.approx(float(torch.cat(ratios).max())), "ratio_bins": 100, "top_tokens": 50,
    }
    assert prof.provenance["layer-sensitivity"]["settings"]["domain"] == "math"  # the profile's only domain
    assert not sidecar_path(result.path, "layer-sensitivity", "").exists()


def test_percentiles_literal_top3_and_pooled_scope(tiny_models, data_file, tmp_path):
    loaded = sharpened(tiny_models["qwen3_moe"])
    settings = _settings(data_file, domain="math", ratio_percentile=10, ratio_k_num=3, ratio_scope="pooled", lam=0.6)
    result = run_layer_sensitivity(settings, profile=tmp_path / "new.safetensors", loaded=loaded)  # a new profile
    ratios = _ratios_by_hand(loaded, k_num=3)
    torch.testing.assert_close(result.ratio_min, torch.stack([torch.quantile(r, 0.1) for r in ratios]))
    torch.testing.assert_close(result.ratio_max, torch.stack([torch.quantile(r, 0.9) for r in ratios]))
    pooled = torch.cat(ratios)
    assert result.ban["ratio_min_global"] == pytest.approx(float(torch.quantile(pooled, 0.1)), rel=1e-6)
    assert result.ban["ratio_max_global"] == pytest.approx(float(torch.quantile(pooled, 0.9)), rel=1e-6)
    assert result.ban["ratio_k_num"] == 3 and result.ban["ratio_scope"] == "pooled" and result.ban["lam"] == 0.6


def test_interrupted_run_resumes_with_the_same_numbers(tiny_models, profiled, data_file, tmp_path):
    loaded = sharpened(tiny_models["olmoe"])
    whole_path, path = tmp_path / "whole.safetensors", tmp_path / "p.safetensors"
    for target in (whole_path, path):
        shutil.copy(profiled("olmoe"), target)
    settings = _settings(data_file, ratio_percentile=10)  # R's kept values are part of the saved state too
    whole = run_layer_sensitivity(settings, profile=whole_path, loaded=loaded)

    def stop(event):
        if event.task == "windows" and event.done == 1:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="1 of 2 windows"):
        run_layer_sensitivity(replace(settings, checkpoint_every=1), profile=path, loaded=loaded, progress=stop)
    assert not read_profile(path).ban.has("layer_kl")
    partial = read_sidecar(sidecar_path(path, "layer-sensitivity", ""))
    assert partial.state["windows"] == 1 and partial.tensors["ratio_hist"].sum(-1).tolist() == [partial.state["tokens"]] * 3
    resumed = run_layer_sensitivity(settings, profile=path, loaded=loaded)
    assert resumed.windows_resumed == 1 and resumed.windows == 2 and resumed.tokens == whole.tokens
    for name in ("layer_kl", "layer_sensitivity", "ratio_min", "ratio_max"):
        assert same(getattr(resumed, name), getattr(whole, name)), name  # bit for bit
    assert torch.equal(resumed.ratio_hist, whole.ratio_hist) and resumed.ban == whole.ban
    # The batch-aware step's bound, calibrated after Ban on the same first tokens whether or not the run resumed.
    batch, whole_batch = read_profile(path).batch.settings, read_profile(whole_path).batch.settings
    k = loaded.routing.top_k
    assert batch == whole_batch and k <= batch["candidates"] <= 2 * k and batch["method"] == "ban"
    assert batch["batch_size"] == 16 and min(float(v) for v in batch["distinct"].values()) <= batch["plain_distinct"]
    # Complete: a rerun measures no layer again, and a new lambda only changes the stored setting.
    again = run_layer_sensitivity(replace(settings, lam=0.9), profile=path, loaded=loaded)
    assert again.layers_scanned == 0 and same(again.layer_kl, whole.layer_kl) and again.ban["lam"] == 0.9


def test_bad_k_min_and_domain_fail_before_any_work(tiny_models, profiled, data_file, tmp_path):
    path = tmp_path / "p.safetensors"
    shutil.copy(profiled("qwen3_moe"), path)
    before = path.read_bytes()
    for k_min in (4, 9):  # K_base = 4
        with pytest.raises(BadSetting, match=rf"--k-min {k_min} must be in \[1, 3\]"):
            run_layer_sensitivity(_settings(data_file, k_min=k_min), profile=path, model="/no/such/model")
    with pytest.raises(BadSetting, match="--k-min must be >= 1"):
        _settings(data_file, k_min=0)
    with pytest.raises(BadSetting, match="--ratio-k-num 5"):
        run_layer_sensitivity(_settings(data_file, ratio_k_num=5), profile=path, model="/no/such/model")
    with pytest.raises(BadSetting, match="--domain is needed"):
        run_layer_sensitivity(_settings(data_file), profile=tmp_path / "new.safetensors", model=str(tiny_models["qwen3_moe"]))
    assert path.read_bytes() == before and not (tmp_path / "new.safetensors").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_both_scans_run_on_every_family(tiny_models, profiled, data_file, tmp_path, family):
    loaded = sharpened(tiny_models[family])
    path = tmp_path / "p.safetensors"
    shutil.copy(profiled(family), path)
    scan = run_kl_scan(KLScanSettings(domain="math", data=str(data_file), samples=3, seq_len=12, top_tokens=50,
                                      candidates="top-2"), profile=path, loaded=loaded)
    k_base = loaded.routing.top_k
    sens = run_layer_sensitivity(_settings(data_file, samples=3, seq_len=12, k_min=k_base - 1), profile=path, loaded=loaded)
    prof = read_profile(path)
    assert (~scan.kl.isnan()).sum(-1).tolist() == [2] * len(loaded.layers) and scan.kl.nan_to_num().min() >= 0
    # R >= k_num / K_base when the router prefers by probability; DeepSeek-V3's correction bias reorders.
    floor = 0.0 if family == "deepseek_v3" else (k_base - 1) / k_base - 1e-6
    assert torch.all(sens.layer_kl > 0) and torch.all(sens.ratio_min >= floor) and torch.all(sens.ratio_min > 0)
    assert torch.all(sens.ratio_max <= 1 + 1e-6) and prof.has("domain/math/kl") and prof.ban.has("layer_sensitivity")
