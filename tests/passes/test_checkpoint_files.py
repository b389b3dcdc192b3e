"""Malformed safetensors checkpoints: every reader (streamed, in memory, import-usage's fingerprint, the CLI)
refuses each in one line that names the file, and writes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from banpick_cli.cli.app import app
from banpick_cli.errors import ModelError
from banpick_cli.models.loading import load_model
from banpick_cli.passes.checkpoint import Checkpoint
from banpick_cli.passes.streaming import load_streaming
from banpick_cli.stages.import_usage import model_identity


def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def _huge_header(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.write((10**12).to_bytes(8, "little"))


def _not_json(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(8)
        handle.write(b"{{{{")


def _bad_offsets(path: Path) -> None:
    """A valid JSON header whose first tensor's offsets run past its shape (same header length: spaces pad it)."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    key = next(k for k in header if k != "__metadata__")
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [begin, end + 4]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= size
    path.write_bytes(data[:8] + text.ljust(size) + data[8 + size:])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


CORRUPTIONS = {"truncated": (_truncate, "truncated?"), "huge header": (_huge_header, "header claims"),
               "header not JSON": (_not_json, "header is not JSON"), "offsets past the shape": (_bad_offsets, "do not fit"),
               "empty file": (_empty, "header claims")}


@pytest.fixture(params=list(CORRUPTIONS))
def corrupt(request, tiny_models, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["qwen3_moe"], folder)
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) == 1
    damage, words = CORRUPTIONS[request.param]
    damage(shards[0])
    return folder, shards[0], words


def test_the_streaming_reader_and_import_usage_name_the_file_and_what_is_wrong(corrupt):
    folder, shard, words = corrupt
    for read in (lambda: Checkpoint(folder), lambda: load_streaming(str(folder), device="cpu"),
                 lambda: model_identity(str(folder))):
        with pytest.raises(ModelError) as err:
            read()
        message = str(err.value)
        assert str(shard) in message and words in message and "\n" not in message, message


def test_the_in_memory_loader_refuses_in_one_line(corrupt):
    folder, _, _ = corrupt
    with pytest.raises(ModelError) as err:
        load_model(str(folder), device="cpu")
    assert str(err.value).startswith(f"cannot load model '{folder}'") and "\n" not in str(err.value)


@pytest.mark.parametrize("stream", [True, False])
def test_profile_on_a_corrupt_checkpoint_exits_1_in_one_line_and_writes_nothing(corrupt, tmp_path, stream):
    folder, _, _ = corrupt
    out = tmp_path / "out"
    out.mkdir()
    args = ["profile", "-m", str(folder), "-d", "math", "--data", "embedded", "--samples", "4", "--seq-len", "16",
            "-o", str(out / "p.safetensors"), "--no-progress", *(["--stream"] if stream else [])]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(out.iterdir()) == []


def test_an_index_that_is_not_json_or_names_a_missing_tensor_is_one_line(tiny_models, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["qwen3_moe"], folder)
    index = folder / "model.safetensors.index.json"
    index.write_text("{not json")
    with pytest.raises(ModelError, match="is not a safetensors index"):
        Checkpoint(folder)
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "model.safetensors", "nope": "model.safetensors"}}))
    with pytest.raises(ModelError, match="has no tensor nope, which its index places there"):
        Checkpoint(folder).entry("nope")
