"""kl-scan: candidates, key-expert rule, the stage end to end, checkpoints that resume, bad input."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys

import pytest
import torch

from banpick_cli.passes.kl_math import LayerPlan, naive_kl
from banpick_cli.passes.resume import read_sidecar, sidecar_path
from banpick_cli.stages.kl_scan import KeyExpertRule, KLScanSettings, prune_variant, run_kl_scan, scanned_experts
from banpick_cli.errors import BadSetting, FingerprintMismatch, Interrupted, ProfileError
from banpick_cli.models.loading import load_model
from banpick_cli.profile import read_profile, write_profile
from scan_helpers import TEXTS, same, sharpened

NAN = math.nan


def _settings(data_file, **overrides):
    base = dict(domain="math", data=str(data_file), samples=len(TEXTS), seq_len=16, batch_size=3, top_tokens=50)
    return KLScanSettings(**{**base, **overrides})


def _copy(profiled, family, tmp_path, name="p.safetensors"):
    target = tmp_path / name
    shutil.copy(profiled(family), target)
    return target


def test_key_expert_rule_by_hand():
    kl = torch.tensor([[0.1, 0.5, NAN, 0.12], [0.15, NAN, NAN, NAN], [0.01, 0.011, NAN, NAN]])
    # Overall median of the six: (0.1 + 0.12) / 2 = 0.11.
    # L0: E1 = 0.5 >= 2 x median(0.1, 0.12) = 0.22 -> key; E0, E3 are below twice their others' median.
    # L1: a lone candidate is held against the other five, median 0.1: 0.15 < 2 x 0.1 (but >= 1.5 x 0.1).
    # L2: 0.011 < 2 x 0.01.
    assert KeyExpertRule().choose(kl).nonzero().tolist() == [[0, 1]]
    assert KeyExpertRule(factor=1.5).choose(kl).nonzero().tolist() == [[0, 1], [1, 0]]
    # L2's 0.011 passes 1.05 x 0.01 but not the overall median: a layer of negligible KLs proposes none.
    assert [2, 1] not in KeyExpertRule(factor=1.05).choose(kl).nonzero().tolist()
    assert KeyExpertRule(factor=1.5, min_kl=0.3).choose(kl).nonzero().tolist() == [[0, 1]]
    two = torch.tensor([[1.0, 0.9, 0.1, 0.1, 0.1]])
    assert KeyExpertRule(top=1).choose(two).nonzero().tolist() == [[0, 0]]
    assert KeyExpertRule(top=0).choose(two).nonzero().tolist() == [[0, 0], [0, 1]]
    assert not KeyExpertRule().choose(torch.full((2, 3), NAN)).any()
    assert not KeyExpertRule(factor=1.0).choose(torch.tensor([[NAN, 0.3], [NAN, NAN]])).any()  # nothing to stand out from


def test_settings_reject_bad_values(data_file):
    for bad, flag in ((dict(candidates="top-0"), "--candidates"), (dict(prune="cut"), "--prune"),
                      (dict(samples=0), "--samples"), (dict(top_tokens=0), "--top-tokens"), (dict(key_factor=0), "--key-factor")):
        with pytest.raises(BadSetting, match=flag):
            _settings(data_file, **bad)


def test_candidate_modes(profiled, data_file):
    prof = read_profile(profiled("qwen3_moe"))
    counts = prof.get("domain/math/expert_counts")
    assert torch.equal(scanned_experts(prof, _settings(data_file)), prof.get("domain/math/candidates"))
    top2 = scanned_experts(prof, _settings(data_file, candidates="top-2"))
    assert top2.sum(-1).tolist() == [2] * prof.shape[0]
    assert torch.all(counts[top2].view(-1, 2).min(-1).values >= counts.masked_fill(top2, 0).max(-1).values)
    assert scanned_experts(prof, _settings(data_file, candidates="all")).all()
    with pytest.raises(ProfileError, match=r"banpick profile --domain code"):
        scanned_experts(prof, _settings(data_file, domain="code"))


def test_scan_end_to_end_matches_the_reference(tiny_models, profiled, data_file, tmp_path):
    loaded = sharpened(tiny_models["qwen3_moe"])
    path = _copy(profiled, "qwen3_moe", tmp_path)
    settings = _settings(data_file, candidates="top-3", key_factor=1.0)
    result = run_kl_scan(settings, profile=path, loaded=loaded)
    prof = read_profile(path, fingerprint=loaded.fingerprint)
    scanned = scanned_experts(prof, settings)
    kl = prof.get("domain/math/kl")
    assert torch.equal(torch.isnan(kl), ~scanned)
    specs = loaded.router_specs()
    plans = [LayerPlan(p, tuple(prune_variant(specs[p], e) for e in scanned[p].nonzero().flatten().tolist()))
             for p in range(prof.shape[0])]
    reference = naive_kl(loaded, TEXTS, plans, seq_len=16, batch_size=3, top_tokens=50)
    for p, values in reference.items():
        torch.testing.assert_close(kl[p][scanned[p]], values.float(), rtol=1e-5, atol=1e-7)
    key = prof.get("domain/math/key_experts")
    assert torch.equal(key, KeyExpertRule(factor=1.0).choose(kl)) and key.any() and not (key & ~scanned).any()
    assert prof.settings["domain/math"]["key_experts"]["rule"] == {"factor": 1.0, "top": 2, "min_kl": 0.0}
    assert prof.settings["domain/math"]["candidates"]  # the profile stage's entry is kept
    record = prof.provenance["kl-scan/math"]
    assert record["tokens"] == result.tokens > 0 and record["experts_scanned"] == 6 and record["settings"]["candidates"] == "top-3"
    assert not sidecar_path(result.path, "kl-scan", "math").exists()
    ranked = result.ranked()
    assert [r.kl for r in ranked] == sorted((float(v) for v in kl[scanned]), reverse=True)
    # A finished scan is not redone: a rerun only re-chooses key experts with the new rule.
    again = run_kl_scan(_settings(data_file, candidates="top-3", key_top=1, key_factor=1.0), profile=path, loaded=loaded)
    assert again.layers_scanned == 0 and again.layers_resumed == prof.shape[0]
    assert same(again.kl, kl) and again.key_experts.sum(-1).max() <= 1


def test_drop_mode_is_the_alternative(tiny_models, profiled, data_file, tmp_path):
    loaded = sharpened(tiny_models["qwen2_moe"])
    path = _copy(profiled, "qwen2_moe", tmp_path)
    refill = run_kl_scan(_settings(data_file, candidates="top-1"), profile=path, loaded=loaded, out=tmp_path / "r.safetensors")
    drop = run_kl_scan(_settings(data_file, candidates="top-1", prune="drop"), profile=path, loaded=loaded, out=tmp_path / "d.safetensors")
    scanned = ~torch.isnan(refill.kl)
    assert torch.equal(scanned, ~torch.isnan(drop.kl)) and not torch.allclose(refill.kl[scanned], drop.kl[scanned])
    specs = loaded.router_specs()
    plans = [LayerPlan(p, tuple(prune_variant(specs[p], e, "drop") for e in scanned[p].nonzero().flatten().tolist()))
             for p in range(scanned.shape[0])]
    reference = naive_kl(loaded, TEXTS, plans, seq_len=16, batch_size=3, top_tokens=50)
    for p, values in reference.items():
        torch.testing.assert_close(drop.kl[p][scanned[p]], values.float(), rtol=1e-5, atol=1e-7)


def _stop_after_first_window(event):
    if event.task == "windows" and event.done == 1:  # the first window's sums are saved: a real mid-run stop
        raise KeyboardInterrupt


def test_interrupted_scan_resumes_after_its_finished_windows(tiny_models, profiled, data_file, tmp_path):
    loaded = sharpened(tiny_models["qwen3_moe"])
    whole = run_kl_scan(_settings(data_file, candidates="top-3"),  # one window: both batches fit the cache
                        profile=_copy(profiled, "qwen3_moe", tmp_path, "whole.safetensors"), loaded=loaded)
    assert whole.windows == 1 and whole.windows_resumed == 0
    path = _copy(profiled, "qwen3_moe", tmp_path)
    settings = _settings(data_file, candidates="top-3", checkpoint_every=1)  # 5 texts in batches of 3: two windows
    with pytest.raises(Interrupted, match="1 of 2 windows finished") as err:
        run_kl_scan(settings, profile=path, loaded=loaded, progress=_stop_after_first_window)
    assert err.value.exit_code == 3
    assert not read_profile(path).domain("math").has("kl")  # the profile is untouched until the scan ends
    partial = read_sidecar(sidecar_path(path, "kl-scan", "math"))
    assert partial.done == 1 and partial.state["windows"] == 1 and partial.tensors["kl_sums"].shape == (6,)
    windows = []
    # Resumed with the default windows: the numbers do not depend on how the batches are cut into windows.
    resumed = run_kl_scan(_settings(data_file, candidates="top-3"), profile=path, loaded=loaded,
                          progress=lambda e: windows.append(e.done) if e.task == "windows" else None)
    assert resumed.windows_resumed == 1 and resumed.windows == 2 and windows == [1, 2]  # one window computed
    assert resumed.tokens == whole.tokens
    assert same(resumed.kl, whole.kl)  # bit for bit: each batch runs the same kernels on the same shapes
    assert not sidecar_path(path, "kl-scan", "math").exists()


def test_changed_settings_or_restart_start_afresh(tiny_models, profiled, data_file, tmp_path):
    loaded = sharpened(tiny_models["qwen3_moe"])
    path = _copy(profiled, "qwen3_moe", tmp_path)
    with pytest.raises(Interrupted):
        run_kl_scan(_settings(data_file, candidates="top-3", checkpoint_every=1), profile=path, loaded=loaded,
                    progress=_stop_after_first_window)
    changed = run_kl_scan(_settings(data_file, candidates="top-3", top_tokens=20), profile=path, loaded=loaded)
    assert changed.windows_resumed == 0 and changed.layers_scanned == 2
    assert any("discarded the saved windows" in note for note in changed.notes)
    with pytest.raises(Interrupted):
        run_kl_scan(_settings(data_file, candidates="top-3", checkpoint_every=1, top_tokens=20), profile=path,
                    loaded=loaded, restart=True, progress=_stop_after_first_window)
    restarted = run_kl_scan(_settings(data_file, candidates="top-3", top_tokens=20), profile=path, loaded=loaded, restart=True)
    assert restarted.windows_resumed == 0 and restarted.layers_resumed == 0 and restarted.layers_scanned == 2
    assert same(restarted.kl, changed.kl)


KILLED_RUN = """
import sys, time
import torch
torch.set_num_threads(1)  # as the test process (tests/conftest.py): the same kernels, so the same bits
from banpick_cli.stages.kl_scan import KLScanSettings, run_kl_scan
model, profile, data = sys.argv[1:4]
def progress(event):
    if event.task == "windows" and event.done == 1:
        print("window saved", flush=True)
        time.sleep(300)
settings = KLScanSettings(domain="math", data=data, samples=5, seq_len=16, batch_size=3, top_tokens=50, candidates="top-3",
                          checkpoint_every=1)
run_kl_scan(settings, profile=profile, model=model, device="cpu", progress=progress)
"""


def test_sigkill_mid_scan_then_resume_gives_the_same_numbers(tiny_models, profiled, data_file, tmp_path):
    model = str(tiny_models["qwen3_moe"])
    path = _copy(profiled, "qwen3_moe", tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, model, str(path), str(data_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "window saved", proc.stderr.read()
    finally:
        proc.kill()  # SIGKILL: no handler runs, nothing is flushed
        proc.wait()
    assert read_sidecar(sidecar_path(path, "kl-scan", "math")).state["windows"] == 1
    loaded = load_model(model, device="cpu")
    settings = _settings(data_file, candidates="top-3", checkpoint_every=1)
    resumed = run_kl_scan(settings, profile=path, loaded=loaded)
    whole = run_kl_scan(settings, profile=_copy(profiled, "qwen3_moe", tmp_path, "w.safetensors"), loaded=loaded)
    assert resumed.windows_resumed == 1 and resumed.windows == whole.windows == 2 and whole.windows_resumed == 0
    assert same(resumed.kl, whole.kl)


def test_bad_input_leaves_the_profile_untouched(tiny_models, profiled, data_file, tmp_path):
    path = _copy(profiled, "qwen3_moe", tmp_path)
    before = path.read_bytes()
    other = load_model(str(tiny_models["qwen2_moe"]), device="cpu")
    with pytest.raises(FingerprintMismatch, match="made for another model"):
        run_kl_scan(_settings(data_file), profile=path, loaded=other)
    prof = read_profile(path)
    prof.put("domain/math/candidates", torch.zeros(prof.shape, dtype=torch.bool))
    empty = write_profile(prof, tmp_path / "empty.safetensors")
    with pytest.raises(ProfileError, match="no candidate experts for domain 'math'"):
        run_kl_scan(_settings(data_file), profile=empty, model=str(tiny_models["qwen3_moe"]))
    with pytest.raises(ProfileError, match="profile not found"):
        run_kl_scan(_settings(data_file), profile=tmp_path / "missing.safetensors", model=str(tiny_models["qwen3_moe"]))
    assert path.read_bytes() == before
