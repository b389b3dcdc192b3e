"""The code sandbox: verdicts, limits, no network, nothing left behind."""

from __future__ import annotations

import glob
import os
import tempfile

from banpick_cli.tasks.sandbox import run_python, run_tests


def _sandbox_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "banpick-sandbox-*")))


def test_verdicts_and_cleanup():
    before = _sandbox_dirs()
    assert run_tests("def f(x):\n    return x + 1\n\nassert f(1) == 2\n").status == "passed"
    failed = run_tests("def f(x):\n    return x\n\nassert f(1) == 2\n")
    assert failed.status == "failed" and "AssertionError" in failed.stderr_tail
    assert run_python("def f(:\n").status == "failed"  # a syntax error is a failure, not a crash of ours
    assert not _sandbox_dirs() - before  # none of ours left (others may come and go meanwhile)


def test_time_and_memory_limits():
    assert run_python("while True:\n    pass\n", timeout_s=1).status == "timeout"
    hog = run_python("x = bytearray(1 << 31)\n", memory_mb=256)
    assert hog.status == "failed" and "MemoryError" in hog.stderr_tail


def test_no_environment_and_own_directory(tmp_path):
    os.environ["BANPICK_SECRET_FOR_TEST"] = "1"
    try:
        result = run_python(
            "import os, sys\n"
            "assert 'BANPICK_SECRET_FOR_TEST' not in os.environ\n"
            "assert os.path.basename(os.getcwd()).startswith('banpick-sandbox-')\n"
            "assert sys.stdin.read() == ''\n"
        )
    finally:
        del os.environ["BANPICK_SECRET_FOR_TEST"]
    assert result.status == "passed", result.stderr_tail


def test_no_network():
    blocked = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n")
    assert blocked.status == "failed" and "network access is disabled" in blocked.stderr_tail
    # Beneath the socket guard: where the kernel allows it, the child has its own empty network
    # namespace, so its interface list holds no device but the loopback.
    namespace = run_python(
        "lines = open('/proc/net/dev').read().splitlines()[2:]\n"
        "names = sorted(l.split(':')[0].strip() for l in lines)\n"
        "import sys; sys.exit(0 if names == ['lo'] else 3)\n"
    )
    host = set(l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:])
    if host != {"lo"}:
        assert namespace.status == "passed" or namespace.returncode == 3
