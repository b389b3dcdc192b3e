"""`report` on a full disk or into a read-only folder: one line, no 0-byte PNG, no page without its figures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disk_helpers import enospc_everywhere, full_disk, leftovers, mounted_tmpfs  # noqa: E402
from synthetic import synthetic_profile  # noqa: E402

from banpick_cli.errors import OutputError  # noqa: E402
from banpick_cli.report import build_report  # noqa: E402


def test_report_on_a_full_disk_leaves_nothing(tmp_path):
    prof = synthetic_profile()
    with full_disk(tmp_path / "disk", free_bytes=8192) as disk:  # room for a figure or two, not the report
        with pytest.raises(OutputError, match="No space left on device") as err:
            build_report(prof, disk / "report")
        assert "\n" not in str(err.value)
        assert not (disk / "report").exists() and leftovers(disk) == []


def test_report_with_enospc_keeps_an_earlier_report(tmp_path, monkeypatch):
    prof = synthetic_profile()
    first = build_report(prof, tmp_path / "r")
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()}
    enospc_everywhere(monkeypatch)
    with pytest.raises(OutputError, match="No space left on device"):
        build_report(prof, tmp_path / "r")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()} == before and first.html.exists()


def test_report_into_a_read_only_folder_or_onto_a_file(tmp_path):
    prof = synthetic_profile()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        build_report(prof, tmp_path / "file")
    with mounted_tmpfs(tmp_path / "ro", "size=64k", "ro") as ro:
        with pytest.raises(OutputError, match="Read-only file system"):
            build_report(prof, ro / "report")
