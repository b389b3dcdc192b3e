"""Atomic outputs: a failed write leaves the old file and nothing else; errors are one line; paths are
checked before work starts; profile updates under a lock all land."""

from __future__ import annotations

import multiprocessing
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from disk_helpers import enospc_everywhere, full_disk, leftovers, mounted_tmpfs  # noqa: E402

from banpick_cli.errors import BanpickError, OutputError, ProfileError  # noqa: E402
from banpick_cli.outputs import atomic_folder, atomic_path, check_output, write_bytes_atomic, write_text_atomic  # noqa: E402
from banpick_cli.profile.format import lock_path, new_profile, read_profile, update_profile, write_profile  # noqa: E402
from banpick_cli.profile.identity import ModelIdentity  # noqa: E402
from banpick_cli.profile.stats import CandidateRule  # noqa: E402
from banpick_cli.routing import RouterSpec  # noqa: E402

FP = "sha256:" + "ab" * 32


def _identity() -> ModelIdentity:
    return ModelIdentity("tiny", "Qwen3MoeForCausalLM", "qwen3_moe", 2, (0, 1), 32, RouterSpec(8, 2, "softmax", True))


def _profile(domain: str = "math", fill: int = 3):
    prof = new_profile(_identity(), FP)
    prof.domain(domain).store_usage(torch.full((2, 8), fill, dtype=torch.int64), torch.full((2,), 12, dtype=torch.int64),
                                    CandidateRule())
    return prof


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and text
    return text


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("a bug mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_new_files_get_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    path = write_text_atomic(tmp_path / "a.json", "{}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    os.chmod(path, 0o640)
    write_text_atomic(path, "[]")  # an existing file keeps its mode
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_enospc_is_one_line_and_leaves_the_old_profile(tmp_path, monkeypatch):
    path = write_profile(_profile(fill=3), tmp_path / "p.safetensors")
    before = path.read_bytes()
    enospc_everywhere(monkeypatch)
    with pytest.raises(OutputError) as err:
        write_profile(_profile(fill=5), path)
    assert "No space left on device" in _one_line(err.value) and str(path) in str(err.value)
    with pytest.raises(OutputError, match="No space left"):
        write_text_atomic(tmp_path / "eval.json", "{}")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]


def test_profile_on_a_real_full_disk(tmp_path):
    with full_disk(tmp_path / "disk") as disk:
        with pytest.raises(OutputError, match="No space left on device") as err:
            write_profile(_profile(), disk / "p.safetensors")
        _one_line(err.value)
        assert leftovers(disk) == [] and not (disk / "p.safetensors").exists()


def test_folder_stages_all_files_or_none(tmp_path):
    bundle = tmp_path / "new" / "bundle"
    with pytest.raises(OutputError):
        with atomic_folder(bundle) as stage:
            write_bytes_atomic(stage.path("a.bin"), b"a")  # staged names may themselves be written atomically
            stage.path("b.bin").write_bytes(b"b")
            raise OSError(28, "No space left on device")
    assert not (tmp_path / "new").exists()  # the folders this call made are gone too
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "other.txt").write_text("mine")
    (keep / "a.bin").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(keep) as stage:
            stage.path("a.bin").write_bytes(b"new")
            raise KeyboardInterrupt
    assert sorted(p.name for p in keep.iterdir()) == ["a.bin", "other.txt"] and (keep / "a.bin").read_bytes() == b"old"
    with atomic_folder(keep) as stage:
        stage.path("a.bin").write_bytes(b"new")
        stage.path("b.bin").write_bytes(b"b")
    assert sorted(p.name for p in keep.iterdir()) == ["a.bin", "b.bin", "other.txt"]
    assert (keep / "a.bin").read_bytes() == b"new"


def test_check_output(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    assert check_output(tmp_path / "new.json") == tmp_path / "new.json"
    assert check_output(tmp_path / "file") == tmp_path / "file"  # overwriting a file is allowed
    cases = [
        (dict(path=tmp_path / "dir"), "is a directory"),
        (dict(path=tmp_path / "missing" / "x.json"), "does not exist"),
        (dict(path=tmp_path / "file", kind="folder"), "exists and is not a folder"),
        (dict(path=tmp_path / "file" / "sub", kind="folder"), "is not a folder"),
        (dict(path=tmp_path / "file", inputs=[tmp_path / "x", str(tmp_path / "." / "file")]), "is also an input"),
    ]
    for kwargs, message in cases:
        with pytest.raises(OutputError, match=message) as err:
            check_output(**kwargs)
        _one_line(err.value)
    assert check_output(tmp_path / "a" / "b", kind="folder") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # checking creates nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]


def test_check_output_in_a_read_only_folder(tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "size=64k", "ro") as ro:
        for kind in ("file", "folder"):
            with pytest.raises(OutputError, match="Read-only file system") as err:
                check_output(ro / "out", kind=kind)
            _one_line(err.value)
        with pytest.raises(OutputError, match="Read-only file system"):
            write_profile(_profile(), ro / "p.safetensors")
        with pytest.raises(OutputError, match="Read-only file system"):
            with atomic_folder(ro / "bundle"):
                pass


def test_update_profile_refuses_a_foreign_file(tmp_path):
    other = tmp_path / "notes.safetensors"
    other.write_bytes(b"{not a profile")
    with pytest.raises(ProfileError, match="not a banpick profile"):
        update_profile(other, lambda p: None, model=_identity(), fingerprint=FP)
    assert other.read_bytes() == b"{not a profile"


def test_negative_counts_are_refused():
    prof = _profile()
    prof.tensors["domain/math/expert_counts"][0, 0] = -1
    with pytest.raises(ProfileError, match="negative counts"):
        write_profile(prof, "/nonexistent/p.safetensors")


def _writer(path: str, domain: str, fill: int, hold: float) -> None:
    import time

    def change(prof):
        time.sleep(hold)  # both processes have started; without the lock one domain would be lost
        prof.domain(domain).store_usage(torch.full((2, 8), fill, dtype=torch.int64), torch.full((2,), 12, dtype=torch.int64),
                                        CandidateRule())
        prof.provenance[f"profile/{domain}"] = {"stage": "profile"}

    update_profile(path, change, model=_identity(), fingerprint=FP)


def test_concurrent_writers_both_land(tmp_path):
    path = tmp_path / "p.safetensors"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), d, f, 0.5)) for d, f in (("math", 3), ("code", 4))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    prof = read_profile(path, fingerprint=FP)
    assert prof.domains() == ["code", "math"]
    assert int(prof.domain("code").expert_counts[0, 0]) == 4 and int(prof.domain("math").expert_counts[0, 0]) == 3
    assert sorted(prof.provenance) == ["profile/code", "profile/math"]
    assert lock_path(path).exists() and sorted(p.name for p in tmp_path.iterdir()) == [".p.safetensors.lock", "p.safetensors"]


def test_output_error_is_a_user_error():
    assert issubclass(OutputError, BanpickError) and OutputError.exit_code == 1
