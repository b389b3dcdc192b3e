"""Faults in `profile`: SIGTERM exits 3 leaving the old profile intact; a SIGKILLed run resumes to the same profile."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from banpick_cli.passes.resume import Partial, Sidecar, run_fingerprint, sidecar_path, texts_digest
from banpick_cli.stages.profile import ProfileSettings, run_profile
from banpick_cli.passes.usage_pass import RunOptions
from banpick_cli.errors import Interrupted, ProfileError
from banpick_cli.profile import read_profile

REPO = Path(__file__).resolve().parents[2]
SAMPLES = 60


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    rows = [{"text": f"problem {i}: {i} + {i * 3} = {i * 4}. the quick brown fox " + "word " * (i % 7)} for i in range(SAMPLES)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _settings(calib: Path, **kw) -> ProfileSettings:
    return ProfileSettings(**{"domain": "math", "data": str(calib), "samples": SAMPLES, "seq_len": 16, "batch_size": 2, **kw})


def _slow_profile(model: Path, calib: Path, out: Path, delay: float) -> subprocess.Popen:
    """Starts the real `banpick profile` in a subprocess, each batch slowed by `delay` seconds."""
    code = (
        "import sys, time\n"
        "import banpick_cli.passes.usage_pass as up\n"
        "make = up._batch\n"
        f"up._batch = lambda *a, **k: (time.sleep({delay}), make(*a, **k))[1]\n"
        "from banpick_cli.cli.app import main\n"
        f"sys.argv = ['banpick', 'profile', '--model', {str(model)!r}, '--domain', 'math', '--data', {str(calib)!r},\n"
        f"            '--samples', '{SAMPLES}', '--seq-len', '16', '--batch-size', '2', '--checkpoint-every', '3',\n"
        f"            '--device', 'cpu', '--out', {str(out)!r}, '--no-progress']\n"
        "main()\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def _wait_for_windows(proc: subprocess.Popen, sidecar: Sidecar, windows: int, timeout: float = 60) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"profile ended before it was interrupted: {proc.communicate()}"
        partial = sidecar.load() if sidecar.path.exists() else None
        if partial is not None and partial.done >= 3 * windows:
            return partial.done
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def _sidecar_for(loaded, calib: Path, out: Path) -> Sidecar:
    """The sidecar `banpick profile` keeps for these settings (same fingerprint as profile_stage computes)."""
    from banpick_cli.stages.profile import load_domain_text

    settings = _settings(calib)
    _, text = load_domain_text(settings, model=loaded.identity.name_or_path)
    fp = run_fingerprint(model=loaded.fingerprint, data=texts_digest(text.texts), settings=settings.__dict__,
                         dtype=str(next(loaded.model.parameters()).dtype), world=1, rank=0)
    return Sidecar(out, "profile", "math", fp)


def test_sigterm_exits_3_and_keeps_the_previous_profile(tiny_models, calib, tmp_path, monkeypatch):
    """A real SIGTERM to this process in the middle of `banpick profile`: exit 3, old profile byte for byte."""
    import banpick_cli.passes.usage_pass as usage_pass
    from typer.testing import CliRunner

    from banpick_cli.cli.app import app

    model = tiny_models["qwen3_moe"]
    out = tmp_path / "p.safetensors"
    run_profile(_settings(calib, samples=6), out=out, model=str(model), device="cpu")
    before = out.read_bytes()
    make, made = usage_pass._batch, []

    def batch_then_term(*args, **kwargs):
        made.append(1)
        if len(made) == 8:  # two windows of three are saved by now
            os.kill(os.getpid(), signal.SIGTERM)
        return make(*args, **kwargs)

    monkeypatch.setattr(usage_pass, "_batch", batch_then_term)
    result = CliRunner().invoke(app, ["profile", "--model", str(model), "--domain", "math", "--data", str(calib), "--samples",
                                      str(SAMPLES), "--seq-len", "16", "--batch-size", "2", "--checkpoint-every", "3",
                                      "--device", "cpu", "--out", str(out), "--no-progress"])
    assert result.exit_code == 3, result.output
    assert "profile stopped: 6 batches finished and saved beside" in result.output  # two windows of three
    assert out.read_bytes() == before  # the old profile, untouched
    assert Sidecar(out, "profile", "math", "").path.exists() and not list(tmp_path.glob(".*.tmp"))
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone after the command


def test_sigkilled_profile_resumes_to_the_uninterrupted_result(tiny_models, calib, tmp_path):
    from banpick_cli.models.loading import load_model

    model = tiny_models["qwen3_moe"]
    out = tmp_path / "p.safetensors"
    proc = _slow_profile(model, calib, out, delay=0.1)
    loaded = load_model(str(model), device="cpu")
    sidecar = _sidecar_for(loaded, calib, out)
    done = _wait_for_windows(proc, sidecar, 2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL and not out.exists()

    resumed = run_profile(_settings(calib), out=out, loaded=loaded, options=RunOptions(checkpoint_every=3))
    assert resumed.resumed_batches >= done and resumed.resumed_batches % 3 == 0
    assert not sidecar.path.exists()  # removed once the profile is written
    whole = run_profile(_settings(calib), out=tmp_path / "whole.safetensors", loaded=loaded, options=RunOptions(checkpoint_every=0))
    a, b = read_profile(out), read_profile(tmp_path / "whole.safetensors")
    for name in ("expert_counts", "token_counts", "candidates"):
        assert torch.equal(a.get(f"domain/math/{name}"), b.get(f"domain/math/{name}")), name
    assert a.provenance["profile/math"]["samples"] == SAMPLES and a.provenance["profile/math"]["resumed_batches"] == resumed.resumed_batches


def test_a_changed_setting_never_mixes_with_stale_partial_counts(tiny_models, calib, tmp_path):
    from banpick_cli.models.loading import load_model

    model = load_model(str(tiny_models["olmoe"]), device="cpu")
    out = tmp_path / "p.safetensors"
    windows = []

    def stop_after_two(event):  # the pass reports every batch; a window of 4 ends at a multiple of 4
        if event.done and event.done % 4 == 0:
            windows.append(event.done)
        if len(windows) == 2:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="profile stopped: 8 batches finished and saved"):
        run_profile(_settings(calib), out=out, loaded=model, options=RunOptions(checkpoint_every=4), progress=stop_after_two)
    assert sidecar_path(out, "profile", "math").exists() and not out.exists()
    # Another seq_len: the sidecar is someone else's; it is discarded, never added in.
    other = run_profile(_settings(calib, seq_len=12), out=out, loaded=model, options=RunOptions(checkpoint_every=4))
    assert other.stale_sidecar and other.resumed_batches == 0
    fresh = run_profile(_settings(calib, seq_len=12), out=tmp_path / "fresh.safetensors", loaded=model,
                        options=RunOptions(checkpoint_every=0))
    assert torch.equal(other.usage.expert_counts, fresh.usage.expert_counts)


def test_sidecar_refuses_torn_and_foreign_files(tmp_path):
    out = tmp_path / "p.safetensors"
    car = Sidecar(out, "profile", "math", "sha256:aa")
    assert car.load() is None and not car.stale
    car.save(Partial(4, {"expert_counts": torch.ones(2, 3, dtype=torch.int64)}, {"samples": 8}))
    back = car.load()
    assert back.done == 4 and back.state == {"samples": 8} and torch.equal(back.tensors["expert_counts"], torch.ones(2, 3, dtype=torch.int64))
    assert Sidecar(out, "profile", "math", "sha256:bb").load() is None  # another run's fingerprint
    car.path.write_bytes(car.path.read_bytes()[:40])  # torn
    assert car.load() is None and car.stale


def test_an_interrupt_with_checkpoints_off_says_nothing_was_saved(tiny_models, calib, tmp_path):
    from banpick_cli.models.loading import load_model

    model = load_model(str(tiny_models["olmoe"]), device="cpu")
    out = tmp_path / "p.safetensors"

    def stop(event):
        raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="profile stopped before it saved anything; rerun the same command"):
        run_profile(_settings(calib), out=out, loaded=model, options=RunOptions(checkpoint_every=0), progress=stop)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_second_writer_of_the_same_domain_is_refused_not_silently_overwritten(tiny_models, calib, tmp_path, monkeypatch):
    from banpick_cli.models.loading import load_model
    from banpick_cli.passes import usage_pass

    model = load_model(str(tiny_models["olmoe"]), device="cpu")
    out = tmp_path / "p.safetensors"
    make, state = usage_pass._batch, {"nested": False}

    def another_writer_meanwhile(*args, **kwargs):
        if not state["nested"]:  # while the first run counts, a second `profile --domain math` finishes
            state["nested"] = True
            run_profile(_settings(calib, seq_len=12), out=out, loaded=model, options=RunOptions(checkpoint_every=0))
        return make(*args, **kwargs)

    monkeypatch.setattr(usage_pass, "_batch", another_writer_meanwhile)
    with pytest.raises(ProfileError, match="another writer stored usage counts of 'math' in .* nothing was written"):
        run_profile(_settings(calib), out=out, loaded=model, options=RunOptions(checkpoint_every=0))
    assert read_profile(out).recorded("profile", "math")["seq_len"] == 12  # the second writer's counts stand
    monkeypatch.setattr(usage_pass, "_batch", make)
    again = run_profile(_settings(calib), out=out, loaded=model, options=RunOptions(checkpoint_every=0))
    assert read_profile(out).recorded("profile", "math")["seq_len"] == 16 and again.usage.tokens > 0  # a rerun replaces
