"""The two scan commands: JSON and tables end to end, one clear line on bad input, SIGTERM is exit 3."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import banpick_cli.cli.scans  # noqa: F401  (registers the commands on the app)
from banpick_cli.cli.base import app
from banpick_cli.passes.resume import read_sidecar, sidecar_path
from banpick_cli.profile import read_profile, write_profile
from scan_helpers import TEXTS

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture()
def profile_copy(profiled, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    path = work / "p.safetensors"
    shutil.copy(profiled("qwen3_moe"), path)
    return path


def _common(tiny_models, data_file):
    return ["--model", tiny_models["qwen3_moe"], "--data", data_file, "--samples", len(TEXTS), "--seq-len", 16,
            "--top-tokens", 50, "--no-progress"]


def test_kl_scan_and_layer_sensitivity_end_to_end(tiny_models, data_file, profile_copy):
    common = _common(tiny_models, data_file)
    result = _run("kl-scan", "--profile", profile_copy, "--domain", "math", "--candidates", "top-3", "--key-factor", 1.0, *common, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    prof = read_profile(profile_copy)
    assert summary["experts_scanned"] == 6 and summary["layers_scanned"] == 2 and summary["tokens"] > 0
    assert summary["top"][0]["kl"] == summary["kl_max"] == float(prof.get("domain/math/kl").nan_to_num().max())
    assert summary["key_experts"] and prof.provenance["kl-scan/math"]["settings"]["candidates"] == "top-3"

    result = _run("kl-scan", "--profile", profile_copy, "--domain", "math", "--candidates", "top-3", *common)
    assert result.exit_code == 0, result.output
    assert "6 candidates by the KL of the output" in result.stdout and "2 of 2 layers resumed" in result.stdout

    result = _run("layer-sensitivity", "--profile", profile_copy, "--k-min", 2, *common, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["ban"]["k_min"] == 2 and summary["ban"]["lam"] == 0.7 and len(summary["layers"]) == 2
    assert read_profile(profile_copy).ban.has("ratio_hist")
    result = _run("layer-sensitivity", "-o", profile_copy, "--k-min", 2, *common)  # -o alone: update in place
    assert result.exit_code == 0 and "W spread" in result.stdout and "R min" in result.stdout


def _assert_clean_failure(result, message, path, before):
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert "Traceback" not in result.output and len(err.splitlines()) == 1 and message in err, err
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_bad_input_is_one_line_and_leaves_the_profile(tiny_models, data_file, profile_copy):
    common = _common(tiny_models, data_file)
    before = profile_copy.read_bytes()
    _assert_clean_failure(_run("layer-sensitivity", "--profile", profile_copy, "--k-min", 4, *common),
                          "--k-min 4 must be in [1, 3]", profile_copy, before)
    _assert_clean_failure(_run("layer-sensitivity", "--profile", profile_copy, "--k-min", 0, *common),
                          "--k-min must be >= 1", profile_copy, before)
    other = ["--model", tiny_models["olmoe"], *common[2:]]
    _assert_clean_failure(_run("kl-scan", "--profile", profile_copy, "--domain", "math", *other), "made for another model",
                          profile_copy, before)
    _assert_clean_failure(_run("layer-sensitivity", "--profile", profile_copy, "--k-min", 2, *other), "made for another model",
                          profile_copy, before)
    _assert_clean_failure(_run("kl-scan", "--profile", profile_copy, "--domain", "code", *common),
                          "run `banpick profile --domain code` first", profile_copy, before)
    _assert_clean_failure(_run("kl-scan", "--profile", profile_copy, "--domain", "math", "--candidates", "some", *common),
                          "--candidates must be", profile_copy, before)
    _assert_clean_failure(_run("kl-scan", "--domain", "math", *common), "give the profile with --profile", profile_copy, before)
    prof = read_profile(profile_copy)
    prof.tensors["domain/math/candidates"][:] = False
    write_profile(prof, profile_copy)
    before = profile_copy.read_bytes()
    _assert_clean_failure(_run("kl-scan", "--profile", profile_copy, "--domain", "math", *common),
                          "no candidate experts for domain 'math'", profile_copy, before)


def test_top_tokens_beyond_the_vocabulary_is_clamped_and_said(tiny_models, data_file, profile_copy):
    common = _common(tiny_models, data_file)[:-3] + ["--top-tokens", 5000, "--no-progress"]
    result = _run("kl-scan", "--profile", profile_copy, "--domain", "math", "--candidates", "top-1", *common)
    assert result.exit_code == 0, result.output
    assert "note: --top-tokens 5000 is larger than the vocabulary (320); using 320" in result.stderr


TERMINATED_RUN = """
import sys, time
from contextlib import contextmanager
import banpick_cli.cli.scans as scans

@contextmanager
def slow_after_first_window(enabled, description):
    def progress(event):
        if event.task == "windows" and event.done == 1:
            print("window saved", flush=True)
            time.sleep(300)
    yield progress

scans.progress_bar = slow_after_first_window
scans.app(sys.argv[1:])
"""


def test_sigterm_exits_3_with_finished_windows_saved(tiny_models, data_file, profile_copy):
    args = ["layer-sensitivity", "--profile", profile_copy, "--k-min", 2, "--checkpoint-every", 1, "--batch-size", 3,
            *_common(tiny_models, data_file)]
    proc = subprocess.Popen([sys.executable, "-c", TERMINATED_RUN, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "window saved"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 3, err
    assert "1 of 2 windows finished and saved" in err and "Traceback" not in err
    assert read_sidecar(sidecar_path(profile_copy, "layer-sensitivity", "")).state["windows"] == 1
    result = _run(*args, "--json")  # the rerun resumes after the saved window
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["windows_resumed"] == 1


def test_dry_run_counts_what_the_run_does_and_writes_nothing(tiny_models, data_file, profile_copy):
    common = [*_common(tiny_models, data_file), "--batch-size", 3, "--checkpoint-every", 1]
    before = profile_copy.read_bytes()
    result = _run("layer-sensitivity", "--profile", profile_copy, "--k-min", 2, *common, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    est = json.loads(result.stdout)
    # 5 texts in batches of 3: 2 batches, a window each; one variant per MoE layer (2 of the 3 decoder layers).
    assert est["batches"] == 2 and est["windows"] == 2 and est["variants"] == 2 and est["generated_tokens"] == 0
    assert est["layer_loads"]["whole"] == 0 and est["layer_loads"]["stream"] == 2 * 3
    assert est["head_runs"] == 2 * (1 + 2) and est["seconds"]["stream"] > 0
    assert set(est["peak_bytes"]) == {"whole", "sequential", "stream"} and est["fits"]["whole"]
    result = _run("kl-scan", "--profile", profile_copy, "--domain", "math", "--candidates", "top-3", *common, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "6 variants in 2 windows" in result.stdout and "--stream" in result.stdout
    assert profile_copy.read_bytes() == before and sorted(p.name for p in profile_copy.parent.iterdir()) == [profile_copy.name]
    # The real run does what the estimate said: two windows, each loading both layers.
    result = _run("layer-sensitivity", "--profile", profile_copy, "--k-min", 2, *common, "--stream", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["windows"] == 2
    assert read_profile(profile_copy).provenance["layer-sensitivity"]["layer_loads"] == est["layer_loads"]["stream"]


def test_stream_is_chosen_when_the_weights_do_not_fit(tiny_models, data_file, profile_copy, monkeypatch):
    from banpick_cli.stages import estimate

    monkeypatch.setattr(estimate, "available_memory", lambda device: {"cpu": 1 << 10})  # 1 KiB free
    result = _run("kl-scan", "--profile", profile_copy, "--domain", "math", "--candidates", "top-1",
                  *_common(tiny_models, data_file), "--json")
    assert result.exit_code == 0, result.output
    assert "do not fit the 0.0 GiB free here: streaming each decoder layer" in result.stderr
    assert read_profile(profile_copy).provenance["kl-scan/math"]["stream"] is True


def test_eta_counts_only_this_runs_work():
    from banpick_cli.progress import eta

    # 3 of 4 windows done, 2 of them resumed: one window in 10 s, so one left is 10 s (not 3.3 s).
    assert eta(3, 4, started=0.0, resumed=2, now=10.0) == 10.0
    assert eta(2, 4, started=0.0, resumed=2, now=10.0) is None  # nothing done yet at this run's rate


def test_dry_run_on_a_cpu_shows_one_memory_and_says_how_it_timed(tiny_models, data_file, profile_copy):
    # A CPU-only run showed "peak device 0.20 GiB" as if there were a GPU, and a time without its basis.
    common = [*_common(tiny_models, data_file), "--batch-size", 3, "--device", "cpu"]
    result = _run("kl-scan", "--profile", profile_copy, "--domain", "math", "--candidates", "top-2", *common, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "peak device" not in result.stdout and "peak memory of the process (CPU, no GPU here)" in result.stdout
    assert "est. s = " in result.stdout and "decoder-layer runs x" in result.stdout and "3x16-token batch" in result.stdout
    est = json.loads(_run("kl-scan", "--profile", profile_copy, "--domain", "math", "--candidates", "top-2", *common,
                          "--dry-run", "--json").stdout)
    timing = est["timing"]
    assert est["cpu_only"] is True and timing["runs"] >= 3 and (timing["batch_size"], timing["seq_len"]) == (3, 16)
    # The estimate is the counts times the rates timed here (rounded to 0.01 s in the JSON).
    assert est["seconds"]["whole"] == pytest.approx(est["layer_runs"] * timing["layer_s"] + est["head_runs"] * timing["head_s"],
                                                    abs=0.01)
    assert est["seconds_basis"].startswith(f"{est['layer_runs']:,} decoder-layer runs x ")
