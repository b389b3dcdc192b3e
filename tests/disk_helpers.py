"""A full disk and a read-only folder, portably: a tiny tmpfs where mounting is allowed (root on Linux),
else a skip; and ENOSPC injected into os.write / matplotlib's savefig everywhere."""

from __future__ import annotations

import errno
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest


@contextmanager
def mounted_tmpfs(where: Path, *options: str) -> Iterator[Path]:
    """Mounts a tmpfs at `where` (e.g. "size=64k", "ro"); skips the test where mounting is not permitted."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options or ("size=64k",)), "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()[:80]})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@contextmanager
def full_disk(where: Path, free_bytes: int = 0, *, files: dict[str, bytes] | None = None, size: str = "64k") -> Iterator[Path]:
    """A small tmpfs at `where` holding `files`, then filled to leave about `free_bytes` free (files written
    there fail with ENOSPC)."""
    with mounted_tmpfs(where, f"size={size}") as mount:
        for name, data in (files or {}).items():
            (mount / name).write_bytes(data)
        filler = mount / ".filler"
        try:
            with open(filler, "wb") as handle:
                while True:
                    handle.write(b"\0" * 4096)
                    handle.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
        if free_bytes:
            with open(filler, "r+b") as handle:
                handle.truncate(max(0, filler.stat().st_size - free_bytes))
        yield mount


def enospc_everywhere(monkeypatch) -> None:
    """Makes every os.write, and matplotlib's PNG writer, fail as on a full disk."""
    real_write = os.write

    def write(fd, data):
        if fd in (0, 1, 2):  # keep the test runner's own output working
            return real_write(fd, data)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return

    def savefig(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", savefig)


def leftovers(folder: Path) -> list[str]:
    """Returns temporary or empty files under `folder` (what a half-done write leaves)."""
    found = []
    for path in folder.rglob("*"):
        if path.name == ".filler" or path.name.endswith(".lock"):
            continue
        if path.name.endswith(".tmp") or path.is_file() and path.stat().st_size == 0:
            found.append(str(path.relative_to(folder)))
    return sorted(found)
