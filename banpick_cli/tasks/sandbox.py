"""Runs untrusted Python (model-written code plus its unit tests) in a separate, limited process.

Best effort, not a security boundary: a fresh `python -I` in a temporary directory that is removed
afterwards, with an empty environment, no stdin, CPU/memory/file-size/open-file limits set through
`resource`, and a wall-clock timeout that kills the whole process group.

No network: the child is moved into a new, empty network namespace (`unshare(CLONE_NEWNET)`, or with
a new user namespace where unprivileged user namespaces are allowed) before it runs; where the
kernel refuses both, a guard prepended to the program makes Python's socket constructors raise
(a determined program can get around that one). The child can still read the file system with
this user's rights; run untrusted models in a disposable box.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

OUTPUT_LIMIT = 1 << 20  # bytes each of stdout/stderr may grow to (RLIMIT_FSIZE kills past it)
_CLONE_NEWNET, _CLONE_NEWUSER = 0x40000000, 0x10000000
# Prepended to every program: the fallback when no network namespace could be made.
NETWORK_GUARD = (
    "import socket as _bp_s, _socket as _bp__s\n"
    "def _bp_no_network(*a, **k):\n"
    "    raise OSError('network access is disabled in the banpick sandbox')\n"
    "for _bp_m in (_bp_s, _bp__s):\n"
    "    for _bp_n in ('socket', 'create_connection', 'getaddrinfo', 'socketpair', 'fromfd', 'create_server'):\n"
    "        if hasattr(_bp_m, _bp_n):\n"
    "            setattr(_bp_m, _bp_n, _bp_no_network)\n"
    "del _bp_s, _bp__s, _bp_m, _bp_n\n"
)


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended: `status` is "passed", "failed" (non-zero exit) or "timeout"."""

    status: str
    returncode: int | None
    stderr_tail: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _no_network() -> None:
    # An empty network namespace: no interface but a down loopback, so every connect fails.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(_CLONE_NEWNET) != 0:
            libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET)
    except (OSError, AttributeError):
        pass  # the socket guard in the program still applies


def _limits(memory_mb: int, cpu_s: int) -> None:
    # Runs in the child between fork and exec: no Python objects shared with the parent are touched.
    _no_network()
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_LIMIT, OUTPUT_LIMIT))
    resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no fork (ignored for root)


def run_python(source: str, *, timeout_s: float = 5.0, memory_mb: int = 512) -> SandboxResult:
    """Returns how `source` ended when run as a script in a fresh, limited interpreter."""
    with tempfile.TemporaryDirectory(prefix="banpick-sandbox-") as tmp:
        script, out, err = Path(tmp, "main.py"), Path(tmp, "stdout"), Path(tmp, "stderr")
        script.write_text(NETWORK_GUARD + source, encoding="utf-8")
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", str(script)], cwd=tmp, stdin=subprocess.DEVNULL, stdout=stdout,
                stderr=stderr, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"},
                start_new_session=True, preexec_fn=lambda: _limits(memory_mb, max(1, int(timeout_s) + 1)),
            )
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                # the child may have spawned helpers; end its whole session either way
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        tail = err.read_bytes()[-2000:].decode("utf-8", "replace")
    if code is None:
        return SandboxResult("timeout", None, tail)
    return SandboxResult("passed" if code == 0 else "failed", code, tail)


def run_tests(program: str, *, timeout_s: float = 5.0, memory_mb: int = 512) -> SandboxResult:
    """Returns the result of running a program whose asserts are its unit tests (exit 0 means all passed)."""
    return run_python(program, timeout_s=timeout_s, memory_mb=memory_mb)
