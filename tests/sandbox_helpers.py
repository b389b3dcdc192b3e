"""Running a test's code as an unprivileged user (uid/gid 65534, "nobody") against this checkout's sandbox."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the code runs after: the sandbox imported, and a SKIP line when this user cannot isolate here.
PRELUDE = (
    "import json, os, sys\n"
    "from banpick_cli.tasks import sandbox\n"
    "ok, why = sandbox.isolation_available()\n"
    "if not ok:\n"
    "    print('SKIP', why)\n"
    "    sys.exit(0)\n"
)


def run_as_nobody(code: str, *, timeout: float) -> subprocess.CompletedProcess:
    """Returns the finished `python3 -c PRELUDE + code` run as nobody with this checkout on the path; skips the
    calling test where that cannot be done (not root, no setpriv, nobody cannot import or isolate)."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    if os.geteuid() != 0 or not shutil.which("setpriv") or python is None:
        pytest.skip("needs root (to become nobody), setpriv and a python3 that user nobody can run")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", PRELUDE + code],
                          check=False, cwd="/", env=env, capture_output=True, text=True, timeout=timeout)
    if "No module named" in done.stderr or done.stdout.startswith("SKIP"):
        pytest.skip(f"user nobody cannot run the sandbox here: {(done.stdout + done.stderr).strip()[-200:]}")
    return done
