"""Hostile completions through the real entry point (`score_tasks` -> `run_tests`), as root and as user nobody.

Each completion answers the task wrongly (`f(1)` is 1, the tests want 2) unless its attack works: then it
answers 2, so an escape shows as a pass, and every case here must be graded failed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

from banpick_cli.evaluation.generate import score_tasks
from banpick_cli.tasks import sandbox
from banpick_cli.tasks.task import Task
from sandbox_helpers import run_as_nobody

REPO = Path(__file__).resolve().parents[2]


def _completion(attack: str) -> str:
    """Returns a completion that defines f after running `attack`, which sets `escaped` when it works."""
    return "escaped = False\n" + attack + "\n\ndef f(x):\n    return 2 if escaped else x\n"


def _attacks(socket_path: str, host_file: str) -> dict[str, str]:
    return {
        # a host service on a unix socket outside /tmp (read-only bind mounts do not stop connect())
        "unix socket outside /tmp": (
            "import socket\n"
            "try:\n"
            "    s = socket.socket(socket.AF_UNIX)\n"
            f"    s.connect({socket_path!r})\n"
            "    s.sendall(b'pwned')\n"
            "    escaped = True\n"
            "except OSError:\n"
            "    pass"
        ),
        # host files: a secret, the checkout with its profiles, a file of the host's /tmp
        "host files": (
            "import os\n"
            f"for path in ('/etc/shadow', {str(REPO / 'pyproject.toml')!r}, {host_file!r}, '/root/.bashrc'):\n"
            "    try:\n"
            "        open(path, 'rb').read(1)\n"
            "        escaped = True\n"
            "    except OSError:\n"
            "        pass"
        ),
        # ptrace of the sandbox's init (pid 1) and of the program itself, from a process it starts
        "ptrace": (
            "import subprocess, sys\n"
            "probe = ('import ctypes, sys; libc = ctypes.CDLL(None); '\n"
            "         'sys.exit(0 if 0 in (libc.ptrace(16, 1, 0, 0), libc.ptrace(16, 2, 0, 0)) else 1)')\n"
            "escaped = subprocess.run([sys.executable, '-c', probe]).returncode == 0"
        ),
        # a forged pass: the exit status says 0 after the tests failed, or before they ran
        "atexit os._exit(0)": "import atexit, os\natexit.register(lambda: os._exit(0))",
        "os._exit(0) before the tests": "import os\nos._exit(0)",
        "sys.exit(0) before the tests": "import sys\nsys.exit(0)",
        "a fake verdict on every descriptor": (
            "import os\n"
            "for fd in range(3, 64):\n"
            "    try:\n"
            "        os.write(fd, b'0' * 32)\n"
            "    except OSError:\n"
            "        pass\n"
            "os._exit(0)"
        ),
        "the verdict's own function": (
            "import sys\n"
            "frame = sys._getframe(0)\n"
            "while frame.f_back:\n"
            "    frame = frame.f_back\n"
            "try:\n"
            "    import gc\n"
            "    for o in gc.get_objects():\n"
            "        if getattr(o, '__name__', '') == '<lambda>':\n"
            "            o()\n"
            "except Exception:\n"
            "    pass\n"
            "import os\n"
            "os._exit(0)"
        ),
        "ctypes on its own memory": (
            "try:\n"
            "    import ctypes\n"
            "    escaped = True\n"
            "except Exception:\n"
            "    pass"
        ),
    }


def _tasks(attacks: dict[str, str]) -> tuple[list[Task], list[str]]:
    tasks = [Task(name, "code", "code", "def f(x):\n", "", tests="assert f(1) == 2\n", entry_point="f")
             for name in attacks]
    return tasks, [_completion(a) for a in attacks.values()]


class _Listener:
    """A host service on a unix socket; records whatever reaches it."""

    def __init__(self, path: str):
        self.path, self.received = path, []
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(path)
        os.chmod(path, 0o777)
        self.server.listen()
        self.server.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            self.received.append(conn.recv(64))
            conn.close()

    def close(self):
        self.stop.set()
        self.thread.join()
        self.server.close()
        os.unlink(self.path)


@pytest.fixture
def host(tmp_path):
    """A unix socket under /var/tmp (else the host's temp folder) and a file in the host's temp folder."""
    folder = "/var/tmp" if os.access("/var/tmp", os.W_OK) else tempfile.gettempdir()
    listener = _Listener(os.path.join(folder, f"banpick-host-{uuid.uuid4().hex[:12]}.sock"))
    host_file = tmp_path / "host-secret"
    host_file.write_text("secret")
    os.chmod(tmp_path, 0o755)
    host_file.chmod(0o644)
    yield listener, str(host_file)
    listener.close()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    monkeypatch.delenv(sandbox.ALLOW_UNSAFE_ENV, raising=False)
    available, reason = sandbox.isolation_available()
    if not available:
        pytest.skip(f"the kernel refuses the sandbox's namespaces here: {reason}")


def test_hostile_completions_are_graded_failed(host):
    listener, host_file = host
    attacks = _attacks(listener.path, host_file)
    tasks, completions = _tasks(attacks)
    outcomes = score_tasks(tasks, completions, code_timeout_s=10)
    graded = {o.task_id: o.prediction for o in outcomes}
    assert graded == {name: "failed" for name in attacks}, graded
    assert listener.received == []
    # and the same program without its attack's effect passes when right: the grading is not "always failed"
    honest = score_tasks(tasks[:1], ["def f(x):\n    return x + 1\n"])
    assert honest[0].correct


def test_the_whole_program_tree_shares_one_memory_cap():
    # 6 processes of 400 MB each: under RLIMIT_AS (per process) all succeed; a cgroup caps their sum
    if "cgroup" not in sandbox.memory_bound():
        pytest.skip(f"no memory cgroup can be made here; the bound is {sandbox.memory_bound()}")
    attack = (
        "import os\n"
        "children = []\n"
        "for _ in range(6):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        block = bytearray(400 << 20)\n"
        "        block[::4096] = b'x' * len(block[::4096])\n"
        "        os._exit(0)\n"
        "    children.append(pid)\n"
        "escaped = all(os.waitpid(pid, 0)[1] == 0 for pid in children)"
    )
    tasks, completions = _tasks({"memory": attack})
    [outcome] = score_tasks(tasks, completions, code_timeout_s=20)
    assert outcome.prediction == "failed"
    result = sandbox.run_tests(completions[0] + "\nassert f(1) == 2\n", timeout_s=20)
    assert "MiB together" in result.stderr_tail or "MemoryError" in result.stderr_tail, result


def test_hostile_completions_as_user_nobody(host, tmp_path):
    listener, host_file = host
    attacks = _attacks(listener.path, host_file)
    check = (
        "from banpick_cli.evaluation.generate import score_tasks\n"
        "from banpick_cli.tasks.task import Task\n"
        f"attacks = json.loads({json.dumps(json.dumps(attacks))})\n"
        "tasks = [Task(n, 'code', 'code', 'def f(x):\\n', '', tests='assert f(1) == 2\\n', entry_point='f') for n in attacks]\n"
        "completions = ['escaped = False\\n' + a + '\\n\\ndef f(x):\\n    return 2 if escaped else x\\n' for a in attacks.values()]\n"
        "print(json.dumps({o.task_id: o.prediction for o in score_tasks(tasks, completions, code_timeout_s=10)}))\n"
    )
    done = run_as_nobody(check, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {name: "failed" for name in attacks}
    assert listener.received == []


def test_capped_user_namespaces_are_named_not_enospc(tmp_path):
    """Where user.max_user_namespaces is reached, unshare says ENOSPC: the refusal says what that means."""
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1)")
    check = (
        "from banpick_cli.tasks import sandbox\n"
        "try:\n"
        "    sandbox.require_sandbox()\n"
        "except sandbox.SandboxUnavailable as e:\n"
        "    print(e)\n"
    )
    script = f"echo 0 > /proc/sys/user/max_user_namespaces && exec {sys.executable} -c \"$0\""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", script, check], check=False,
                          env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    if done.returncode != 0:
        pytest.skip(f"cannot cap user namespaces in a nested one here: {done.stderr.strip()[-200:]}")
    message = done.stdout.strip()
    assert "user namespaces are capped" in message and "--allow-unsafe-code" in message, message
    assert "No space left" not in message and "\n" not in message
