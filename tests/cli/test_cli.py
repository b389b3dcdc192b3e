"""The command line: --help everywhere, `profile`/`inspect`/`merge` end to end, one clear line on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from banpick_cli.cli.app import app
from banpick_cli.profile import read_profile

runner = CliRunner()
SUBCOMMANDS = ["profile", "inspect", "merge", "kl-scan", "layer-sensitivity", "failure-probe", "export"]


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "calib.jsonl"
    lines = [{"text": f"problem {i}: {i} + {i * 3} = {i * 4}. the quick brown fox"} for i in range(12)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_subcommands_and_exit_codes():
    result = _run("--help")
    assert result.exit_code == 0
    for name in SUBCOMMANDS:
        assert name in result.output
    assert "Exit codes" in result.output


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name):
    result = _run(name, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


@pytest.mark.parametrize("name", [None, *SUBCOMMANDS])
def test_flags_show_no_value_placeholder(name):
    # Typer 0.29 prints "<bool>" after every flag ("--json <bool>"), as if it took a value; our flags hide it.
    # Typer's own -h/--help row keeps it: no public API reaches that option.
    result = _run(*([name] if name else []), "--help")
    rows = [line for line in result.output.splitlines() if "<bool>" in line]
    assert all("--help" in line for line in rows), rows
    assert any("--json" in line or "--version" in line for line in result.output.splitlines())


def test_console_script_help_is_light():
    code = "import sys, banpick_cli.cli.app; print(sorted(m for m in ('torch','transformers','datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_profile_inspect_merge_end_to_end(tiny_models, data_file, tmp_path):
    model = tiny_models["qwen3_moe"]
    out = tmp_path / "p.safetensors"
    # The first run goes through the installed console script, as a user would run it.
    args = ["profile", "--model", model, "--domain", "math", "--data", data_file, "--samples", 12, "--seq-len", 32,
            "--batch-size", 5, "--out", out, "--candidate-ratio", 1.2, "--no-progress", "--json"]
    done = subprocess.run([sys.executable, "-m", "banpick_cli", *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    prof = read_profile(out)
    assert summary["samples"] == 12 and summary["tokens"] == int(prof.get("domain/math/token_counts")[0])
    assert prof.get("domain/math/expert_counts").sum().item() == summary["tokens"] * 4 * 2
    record = prof.provenance["profile/math"]
    assert record["dataset"] == str(data_file) and record["samples"] == 12 and "--domain math" in record["command"]
    assert record["settings"]["candidate_ratio"] == 1.2

    # A second domain updates the same file in place; the first is kept.
    result = _run("profile", "--model", model, "--domain", "code", "--data", data_file, "--samples", 6, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert read_profile(out).domains() == ["code", "math"]

    result = _run("inspect", out)
    assert result.exit_code == 0 and "most used experts per layer" in result.output and "L2" in result.output

    shard = tmp_path / "shard.safetensors"
    assert _run("profile", "--model", model, "--domain", "math", "--data", data_file, "--samples", 12, "--out", shard,
                "--candidate-ratio", 1.2, "--no-progress").exit_code == 0  # shards share one candidate rule
    merged = tmp_path / "merged.safetensors"
    result = _run("merge", out, shard, "-o", merged)
    assert result.exit_code == 0, result.output
    m = read_profile(merged)
    assert torch.equal(m.get("domain/math/expert_counts"), 2 * prof.get("domain/math/expert_counts"))
    assert m.domains() == ["code", "math"]


def _assert_clean_failure(result, message, tmp_path, keep=()):
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert "Traceback" not in result.output and len(err.splitlines()) == 1, err
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_bad_inputs(tiny_models, data_file, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    model = tiny_models["qwen3_moe"]
    out = work / "p.safetensors"
    common = ["--data", data_file, "--out", out, "--no-progress"]
    _assert_clean_failure(_run("profile", "--model", work / "missing", "--domain", "math", *common), "model not found", work)
    _assert_clean_failure(_run("profile", "--model", tiny_models["llama"], "--domain", "math", *common), "dense model", work)
    _assert_clean_failure(_run("profile", "--model", model, "--domain", "chemistry", *common), "unknown domain 'chemistry'", work)
    _assert_clean_failure(_run("profile", "--model", model, "--domain", "math", *common, "--samples", 0), "--samples must be >= 1", work)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _assert_clean_failure(_run("profile", "--model", model, "--domain", "math", "--data", empty, "--out", out), "", work)
    _assert_clean_failure(_run("profile", "--model", model, "--domain", "math", "--data", tmp_path / "nope.jsonl", "--out", out),
                          "data file not found", work)
    _assert_clean_failure(_run("profile", "--model", model, "--domain", "math", "--data", data_file,
                               "--out", "/proc/banpick-test.safetensors"), "cannot write profile", work)
    corrupt = work / "corrupt.safetensors"
    corrupt.write_bytes(b"{not a profile")
    _assert_clean_failure(_run("inspect", corrupt), "not a banpick profile", work, keep=["corrupt.safetensors"])
    # An existing non-profile file given as --out is refused, not overwritten.
    _assert_clean_failure(_run("profile", "--model", model, "--domain", "math", "--data", data_file, "--out", corrupt),
                          "not a banpick profile", work, keep=["corrupt.safetensors"])
    assert corrupt.read_bytes() == b"{not a profile"


def test_profile_of_another_model_is_refused(tiny_models, data_file, tmp_path):
    out = tmp_path / "p.safetensors"
    assert _run("profile", "--model", tiny_models["qwen3_moe"], "--domain", "math", "--data", data_file, "--out", out,
                "--no-progress").exit_code == 0
    before = out.read_bytes()
    result = _run("profile", "--model", tiny_models["olmoe"], "--domain", "math", "--data", data_file, "--out", out, "--no-progress")
    assert result.exit_code == 1 and "made for another model" in result.stderr
    assert out.read_bytes() == before


def test_usage_error_is_exit_2():
    assert _run("profile", "--samples", "many").exit_code == 2
