"""Every writing command on a full disk: exit 1, one line, no traceback, nothing partial left; --version, -h."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disk_helpers import full_disk, leftovers  # noqa: E402

from banpick_cli import __version__  # noqa: E402
from banpick_cli.cli.app import app  # noqa: E402

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _clean_failure(result, message: str) -> None:
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert "Traceback" not in result.output and len(err.splitlines()) == 1, err
    assert message in err, err




def test_version_and_short_help():
    result = _run("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"banpick {__version__}"
    result = _run("-h")
    assert result.exit_code == 0 and "Exit codes" in result.output
    result = _run("profile", "-h")
    assert result.exit_code == 0 and "--domain" in result.output


@pytest.fixture(scope="module")
def made(tiny_models, data_file, tmp_path_factory):
    """A profile with usage and layer sensitivity (for export and eval), and a shard to merge with it."""
    root = tmp_path_factory.mktemp("made")
    model = tiny_models["qwen3_moe"]
    common = ["--model", model, "--data", data_file, "--seq-len", 16, "--device", "cpu", "--no-progress"]
    for out, samples in (("p.safetensors", 8), ("shard.safetensors", 6)):
        assert _run("profile", "--domain", "math", "--samples", samples, "--candidate-ratio", 1.2, "--out", root / out,
                    *common).exit_code == 0
    result = _run("layer-sensitivity", "--profile", root / "p.safetensors", "--domain", "math", "--samples", 4,
                  "--k-min", 2, *common)
    assert result.exit_code == 0, result.output
    tasks = root / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "t1", "domain": "general", "kind": "mc", "prompt": "Sky?", "answer": "A",
                                 "choices": ["blue", "green"]}) + "\n")
    return {"model": model, "data": data_file, "profile": root / "p.safetensors", "shard": root / "shard.safetensors",
            "tasks": tasks, "common": common}


def _commands(made, disk: Path) -> dict[str, list]:
    on_disk = disk / "p.safetensors"
    return {
        "profile new": ["profile", "--domain", "math", "--samples", 4, "--out", disk / "new.safetensors", *made["common"]],
        "profile update": ["profile", "--domain", "code", "--samples", 4, "--out", on_disk, *made["common"]],
        "kl-scan": ["kl-scan", "--profile", on_disk, "--domain", "math", "--samples", 2, "--candidates", "top-1",
                    *made["common"]],
        "layer-sensitivity": ["layer-sensitivity", "--profile", on_disk, "--domain", "math", "--samples", 2, "--k-min", 2,
                              *made["common"]],
        "report": ["report", on_disk, "-o", disk / "report", "--no-progress"],
        "merge": ["merge", made["profile"], made["shard"], "-o", disk / "merged.safetensors"],
        "export": ["export", made["profile"], "--target", "hf", "-o", disk / "bundle"],
        "eval -o": ["eval", "--task", made["tasks"], "--model", made["model"], "--device", "cpu", "--max-new-tokens", 2,
                    "--mc-scoring", "loglik", "--no-progress", "-o", disk / "eval.json"],
    }


@pytest.mark.parametrize("name", ["profile new", "profile update", "kl-scan", "layer-sensitivity", "report", "merge",
                                  "export", "eval -o"])
def test_full_disk_is_one_line_and_leaves_nothing(made, tmp_path, name):
    kept = made["profile"].read_bytes()
    with full_disk(tmp_path / "disk", files={"p.safetensors": kept}) as disk:
        result = _run(*_commands(made, disk)[name])
        _clean_failure(result, "No space left on device")
        assert leftovers(disk) == []
        assert sorted(p.name for p in disk.iterdir() if p.name != ".filler" and not p.name.endswith(".lock")) == ["p.safetensors"]
        assert (disk / "p.safetensors").read_bytes() == kept


def test_candidate_top_at_or_above_the_experts_is_refused_before_counting(tiny_models, data_file, tmp_path):
    out = tmp_path / "p.safetensors"
    result = _run("profile", "--model", tiny_models["qwen3_moe"], "--domain", "math", "--data", data_file, "--samples", 2,
                  "--candidate-top", 1000, "--out", out, "--device", "cpu", "--no-progress")
    _clean_failure(result, "--candidate-top 1000 would mark every used expert")
    assert not out.exists()


def test_a_mistyped_model_is_reported_as_a_model_before_any_data(tmp_path):
    result = _run("profile", "--model", tmp_path / "no-such-model", "--domain", "math", "--out", tmp_path / "p.safetensors",
                  "--no-progress")
    _clean_failure(result, "no-such-model")
    assert "dataset" not in result.output
