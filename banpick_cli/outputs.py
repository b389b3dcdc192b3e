"""Writes that cannot half-happen: every file banpick writes goes to a temporary name beside it and is
renamed into place; a failure (a full disk, a read-only folder) leaves nothing partial and is one line.

    check_output(out, kind="file", inputs=[profile])   # before a long run: parent, writable, not an input
    with atomic_path(out) as tmp:                       # after it: write tmp however you like
        fig.savefig(tmp)
    write_text_atomic(out / "report.html", html)
    with atomic_folder(bundle) as stage:                # several files that appear together, or none
        stage.write_text("manifest.json", text)         # (each staged beside its final name)
        write_profile(profile, stage.path("profile.safetensors"))

Profiles add a lock around read-merge-write (`profile.format.update_profile`), so concurrent stages
writing one profile all land.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from banpick_cli.errors import OutputError

_TMP_SUFFIX = ".tmp"


def _reason(err: OSError) -> str:
    text = err.strerror or str(err) or type(err).__name__
    if err.errno == errno.ENOSPC:
        return f"{text} (nothing was written; free some space and rerun)"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{text} (the folder is not writable)"
    return text


def output_error(target: str | os.PathLike, err: OSError, *, what: str = "") -> OutputError:
    """Returns the one-line error for a failed write of `target`."""
    return OutputError(f"cannot write {what + ' ' if what else ''}{target}: {_reason(err)}")


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask's set-and-restore races other threads)
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Syncs a folder's entries (a rename into it survives a crash); a no-op where the file system refuses."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: str | os.PathLike, *, what: str = "") -> Iterator[Path]:
    """Yields a temporary path in the target's folder; on a clean exit it is synced and renamed onto
    `target`, on any failure it is removed. OSErrors (in the block or the rename) become one OutputError
    naming `target`; other exceptions pass through, still leaving nothing behind."""
    target = Path(target)
    folder = target.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {what + ' ' if what else ''}{target}: folder {folder} does not exist")
    if target.is_dir():
        raise OutputError(f"cannot write {what + ' ' if what else ''}{target}: it is a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=_TMP_SUFFIX, dir=folder)
        os.close(fd)
    except OSError as err:
        raise output_error(target, err, what=what) from None
    tmp = Path(name)
    try:
        try:
            yield tmp
            mode = target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~_umask()
            os.chmod(tmp, mode)  # mkstemp makes 0600; the output gets what a plain open() would give
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except OSError as err:
            raise output_error(target, err, what=what) from None
        fsync_dir(folder)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def write_bytes_atomic(target: str | os.PathLike, data: bytes, *, what: str = "") -> Path:
    """Writes `data` to `target` atomically; returns the path."""
    target = Path(target)
    with atomic_path(target, what=what) as tmp:
        _write_all(tmp, data)
    return target


def _write_all(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CREAT, 0o600)
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def write_text_atomic(target: str | os.PathLike, text: str, *, what: str = "") -> Path:
    """Writes UTF-8 text to `target` atomically; returns the path."""
    return write_bytes_atomic(target, text.encode("utf-8"), what=what)


class Staging:
    """The files of one `atomic_folder` block: each is written to a temporary name beside its final one."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._staged: list[tuple[Path, Path]] = []  # (temporary, final)

    def path(self, name: str) -> Path:
        """Returns a temporary path to write the folder's file `name` to (renamed at the end of the block)."""
        final = self.folder / name
        if final.is_dir():
            raise OutputError(f"cannot write {final}: it is a directory")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=_TMP_SUFFIX, dir=self.folder)
            os.close(fd)
        except OSError as err:
            raise output_error(final, err) from None
        self._staged.append((Path(tmp), final))
        return Path(tmp)

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Stages `data` as the folder's file `name`; returns its final path."""
        tmp = self.path(name)
        try:
            _write_all(tmp, data)
        except OSError as err:
            raise output_error(self.folder / name, err) from None
        return self.folder / name

    def write_text(self, name: str, text: str) -> Path:
        """Stages UTF-8 `text` as the folder's file `name`; returns its final path."""
        return self.write_bytes(name, text.encode("utf-8"))

    def final(self, tmp: Path) -> Path:
        """Returns where a staged temporary file will land."""
        return next(final for staged, final in self._staged if staged == tmp)

    def _commit(self) -> None:
        mask = _umask()
        for tmp, final in self._staged:
            os.chmod(tmp, final.stat().st_mode & 0o7777 if final.exists() else 0o666 & ~mask)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        for tmp, final in self._staged:  # every file is whole before the first one is renamed
            os.replace(tmp, final)
        fsync_dir(self.folder)

    def _discard(self) -> None:
        for tmp, _ in self._staged:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass


@contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Staging]:
    """Yields a Staging for files that belong together in `folder` (created if missing). On a clean exit
    every staged file is renamed into place; on any failure the staged files are removed, and so is the
    folder when this call created it. Files already in the folder that are not staged are left alone."""
    folder = Path(folder)
    created = make_folder(folder)
    stage = Staging(folder)
    try:
        try:
            yield stage
            stage._commit()
        except OSError as err:
            raise output_error(folder, err) from None
    except BaseException:
        stage._discard()
        for made in created:
            shutil.rmtree(made, ignore_errors=True)
        raise


def make_folder(folder: Path) -> list[Path]:
    """Creates `folder` and its missing parents; returns the topmost folder it created (or [])."""
    if folder.is_dir():
        return []
    if folder.exists():
        raise OutputError(f"cannot write into {folder}: it exists and is not a folder")
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    try:
        folder.mkdir(parents=True)
    except OSError as err:
        raise output_error(folder, err) from None
    return [missing[-1]]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b) or a.resolve() == b.resolve()
    except OSError:
        return False


def _probe(folder: Path, target: Path, flag: str) -> None:
    """Raises unless a file can be created in `folder` (root ignores permission bits; a probe does not)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".banpick-probe.", suffix=_TMP_SUFFIX, dir=folder)
    except OSError as err:
        raise OutputError(f"{flag} {target}: {_reason(err)}") from None
    os.close(fd)
    os.unlink(probe)


def check_output(
    path: str | os.PathLike,
    *,
    kind: str = "file",
    inputs: Iterable[str | os.PathLike] = (),
    flag: str = "--out",
) -> Path:
    """Raises a one-line OutputError unless `path` can be written as a `kind` ("file" or "folder"); run it
    before long work. A file's folder must exist and be writable, the path must not be a folder nor one
    of `inputs`; a folder must be a folder (or creatable under a writable one). Returns the path."""
    target = Path(path)
    for source in inputs:
        if _same_file(target, Path(source)):
            raise OutputError(f"{flag} {target} is also an input; write to another file")
    if kind == "file":
        if target.is_dir():
            raise OutputError(f"{flag} {target}: it is a directory; give a file path")
        if not target.parent.is_dir():
            raise OutputError(f"{flag} {target}: folder {target.parent} does not exist")
        _probe(target.parent, target, flag)
    elif kind == "folder":
        if target.exists() and not target.is_dir():
            raise OutputError(f"{flag} {target}: exists and is not a folder")
        existing = next(p for p in [target, *target.parents] if p.exists())
        if not existing.is_dir():
            raise OutputError(f"{flag} {target}: {existing} is not a folder")
        _probe(existing, target, flag)
    else:
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    return target
