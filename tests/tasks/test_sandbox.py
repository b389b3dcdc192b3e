"""The code sandbox: verdicts, limits, isolation against the attacks that got out of the old one."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from banpick_cli.errors import SandboxUnavailable
from banpick_cli.tasks import sandbox
from banpick_cli.tasks.sandbox import run_python, run_tests
from sandbox_helpers import run_as_nobody

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_opt_in(monkeypatch):
    # Every attack below must meet the isolated path, never the best-effort one.
    monkeypatch.delenv(sandbox.ALLOW_UNSAFE_ENV, raising=False)


@pytest.fixture(scope="module")
def isolated():
    available, reason = sandbox.isolation_available()
    if not available:
        pytest.skip(f"the kernel refuses the sandbox's namespaces here: {reason}")


def _sandbox_dirs() -> set[str]:
    """Returns this process's sandbox folders on the host (another test run on the machine has its own pid)."""
    return set(glob.glob(os.path.join(tempfile.gettempdir(), f"banpick-sandbox-{os.getpid()}-*")))


def _marker(where: Path | str) -> Path:
    return Path(where, f"banpick-escape-{uuid.uuid4().hex}")


def _processes_naming(text: str) -> list[int]:
    pids = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            if text.encode() in Path(cmdline).read_bytes():
                pids.append(int(cmdline.split("/")[2]))
        except OSError:
            pass
    return [p for p in pids if p != os.getpid()]


def _decoy(marker: str) -> subprocess.Popen:
    """A process of the test's user that a program could find by scanning /proc for `marker`."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])


def test_verdicts_and_cleanup(isolated):
    before = _sandbox_dirs()
    assert run_tests("def f(x):\n    return x + 1\n\nassert f(1) == 2\n").status == "passed"
    failed = run_tests("def f(x):\n    return x\n\nassert f(1) == 2\n")
    assert failed.status == "failed" and failed.returncode == 1 and "AssertionError" in failed.stderr_tail
    assert "<string>" not in failed.stderr_tail  # the traceback is the program's alone, as python prints it
    syntax = run_python("def f(:\n")  # a syntax error is a failure, not a crash of ours
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr_tail
    assert run_python("import sys\nsys.exit(7)\n").returncode == 7
    assert run_python("raise SystemExit('bye')\n").stderr_tail == "bye\n"
    assert not _sandbox_dirs() - before  # none of ours left (others may come and go meanwhile)


def test_concurrent_runs_from_threads(isolated):
    # The scorer runs programs from a thread pool.
    from concurrent.futures import ThreadPoolExecutor

    programs = [f"import sys\nsys.exit({i % 3})\n" for i in range(6)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        codes = [r.returncode for r in pool.map(run_python, programs)]
    assert codes == [0, 1, 2, 0, 1, 2]


def test_time_memory_and_output_limits(isolated):
    start = time.monotonic()
    assert run_python("while True:\n    pass\n", timeout_s=1).status == "timeout"
    assert time.monotonic() - start < 4
    hog = run_python("x = bytearray(1 << 31)\n", memory_mb=256)
    assert hog.status == "failed" and "MemoryError" in hog.stderr_tail
    huge = run_python("x = bytearray(20 << 30)\n")
    assert huge.status == "failed" and "MemoryError" in huge.stderr_tail
    for stream in ("stdout", "stderr"):
        loud = run_python(f"import sys\nsys.{stream}.write('x' * (5 << 20))\n")
        assert loud.status == "failed" and len(loud.stderr_tail) <= 2000
    assert "File too large" in run_python("import sys\nsys.stdout.write('x' * (5 << 20))\n").stderr_tail


def test_no_environment_and_own_directory(isolated):
    os.environ["BANPICK_SECRET_FOR_TEST"] = "1"
    try:
        result = run_python(
            "import os, sys\n"
            "assert 'BANPICK_SECRET_FOR_TEST' not in os.environ\n"
            "assert os.path.basename(os.getcwd()).startswith('banpick-sandbox-')\n"
            "assert sys.stdin.read() == ''\n"
            "open('scratch.txt', 'w').write('its own directory is writable')\n"
            "import tempfile\n"
            "with tempfile.NamedTemporaryFile() as f:\n"  # and so is its private /tmp
            "    f.write(b'x')\n"
        )
    finally:
        del os.environ["BANPICK_SECRET_FOR_TEST"]
    assert result.status == "passed", result.stderr_tail


def test_no_network(isolated):
    blocked = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n")
    assert blocked.status == "failed" and "OSError" in blocked.stderr_tail
    # The raw _socket module, which got past the old socket guard, finds no network either.
    raw = run_python("import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('1.1.1.1', 53))\n")
    assert raw.status == "failed" and "unreachable" in raw.stderr_tail
    # Its own network namespace: no interface but the loopback, and that one down.
    namespace = run_python(
        "import socket\n"
        "assert [name for _, name in socket.if_nameindex()] == ['lo']\n"
        "try:\n"
        "    socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
        "except OSError as e:\n"
        "    assert 'unreachable' in str(e), e\n"
    )
    assert namespace.status == "passed", namespace.stderr_tail


def _refused(stderr: str) -> bool:
    """Returns whether a host write was refused: absent (the program's root holds no checkout, no home and not
    the host's /tmp) or read-only (the interpreter's folders)."""
    return "No such file or directory" in stderr or "Read-only file system" in stderr


def test_cannot_write_outside_its_directory(isolated):
    targets = [_marker(tempfile.gettempdir()), _marker(REPO), _marker(Path.home()), _marker("/")]
    try:
        result = run_python(
            "written = []\n"
            f"for path in {[str(t) for t in targets]!r}:\n"
            "    try:\n"
            "        open(path, 'w').write('escaped')\n"
            "        written.append(path)\n"
            "    except OSError:\n"
            "        pass\n"
            f"assert written in ([], [{str(targets[0])!r}]), written  # its /tmp is its own\n"
        )
        assert result.status == "passed", result.stderr_tail
        assert not [t for t in targets if t.exists()]
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


def test_cannot_run_commands_that_write(isolated):
    shell, child = _marker(tempfile.gettempdir()), _marker(tempfile.gettempdir())
    try:
        result = run_python(
            "import os, subprocess\n"
            f"os.system('touch {shell}')\n"
            f"subprocess.run(['touch', '{child}'])\n"
        )
        assert result.status == "passed", result.stderr_tail  # the commands ran, and failed
        assert not shell.exists() and not child.exists()
    finally:
        shell.unlink(missing_ok=True)
        child.unlink(missing_ok=True)


def test_setsid_children_die_with_the_program(isolated):
    # The old sandbox killed its process group; a new session got out and wrote 10 s later.
    marker = _marker(tempfile.gettempdir())
    try:
        result = run_python(
            "import os, sys\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            "        os.execv(sys.executable, [sys.executable, '-c',\n"
            "                 'import sys, time; time.sleep(2); open(sys.argv[1], \"w\").write(\"late\")',\n"
            f"                 '{marker}'])\n"
            "    os._exit(0)\n"
            "os.wait()\n"
        )
        assert result.status == "passed", result.stderr_tail
        assert not _processes_naming(str(marker))  # already gone when run_python returns
        time.sleep(3)
        assert not marker.exists()
    finally:
        marker.unlink(missing_ok=True)


def test_cannot_signal_the_caller(isolated):
    decoy_name = f"banpick-decoy-{uuid.uuid4().hex}"
    decoy = _decoy(decoy_name)
    try:
        result = run_python(
            "import os, signal\n"
            "assert os.getppid() == 1  # its init; the caller has no pid in here\n"
            "for attack in (lambda: os.kill(os.getppid(), signal.SIGKILL),\n"
            "               lambda: os.killpg(os.getpgid(os.getppid()), signal.SIGKILL),\n"
            f"               lambda: os.kill({os.getpid()}, signal.SIGKILL)):  # the caller's pid, out here\n"
            "    try:\n"
            "        attack()\n"
            "    except OSError:\n"
            "        pass\n"
            "found = []\n"
            "for pid in os.listdir('/proc'):\n"
            "    try:\n"
            f"        if pid.isdigit() and b'{decoy_name}' in open(f'/proc/{{pid}}/cmdline', 'rb').read():\n"
            "            found.append(pid)\n"
            "            os.kill(int(pid), signal.SIGKILL)\n"
            "    except OSError:\n"
            "        pass\n"
            "assert not found, found\n"
            "assert not os.path.exists('/proc/1')  # no /proc at all: no pid to name, no memory to read\n"
        )
        assert result.status == "passed", result.stderr_tail  # its init ignored it; we never saw it
        assert decoy.poll() is None  # the decoy, a process of our user, is untouched
    finally:
        decoy.kill()
        decoy.wait()


def test_kill_everything_reaches_only_its_namespace(isolated):
    # kill(-1, SIGKILL) outside a PID namespace, as root, would kill every process on the machine:
    # the program checks that it is PID 2 under our init before it tries.
    decoy = _decoy(f"banpick-decoy-{uuid.uuid4().hex}")
    try:
        result = run_python(
            "import os, signal, time\n"
            "assert os.getpid() == 2 and os.getppid() == 1, 'not isolated: refusing to kill(-1)'\n"
            "if os.fork() == 0:\n"
            "    time.sleep(30)\n"
            "    os._exit(0)\n"
            "os.kill(-1, signal.SIGKILL)\n"
            "os.wait()\n"
        )
        assert result.status == "passed", result.stderr_tail
        assert decoy.poll() is None
    finally:
        decoy.kill()
        decoy.wait()


def test_deleting_its_own_files_yields_a_result(isolated):
    before = _sandbox_dirs()
    result = run_python(
        "import os, shutil, sys\n"
        "for name in ('stdout', 'stderr', 'main.py'):\n"
        "    try:\n"
        "        os.remove(name)\n"
        "    except OSError:\n"
        "        pass\n"
        "os.makedirs('locked/inner')\n"
        "os.chmod('locked/inner', 0)\n"
        "os.chmod('locked', 0)\n"
        "shutil.rmtree(os.getcwd(), ignore_errors=True)\n"
        "os.ftruncate(2, 0)\n"
        "sys.exit(4)\n"
    )
    assert result.status == "failed" and result.returncode == 4
    assert not _sandbox_dirs() - before


def test_fork_bomb_is_contained(isolated):
    name = f"bpbomb{uuid.uuid4().hex[:8]}"
    start = time.monotonic()
    result = run_python(
        "import os, time\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        f"            os.execv('/bin/sh', ['/bin/sh', '-c', 'sleep 60; :', '{name}'])  # named in its cmdline\n"
        "    except OSError:\n"
        "        time.sleep(0.01)\n",
        timeout_s=2,
    )
    assert result.status in ("timeout", "failed") and time.monotonic() - start < 6, result
    assert not _processes_naming(name)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def test_remount_one_mount_at_a_time_also_confines(isolated):
    # The path for kernels before mount_setattr(2) (5.12).
    target = _marker(REPO)
    try:
        result = sandbox._run_isolated(
            f"open('ok', 'w').write('x')\nopen('{target}', 'w').write('escaped')\n",
            timeout_s=5, memory_mb=512, legacy_remount=True,
        )
        assert result.status == "failed" and _refused(result.stderr_tail), result.stderr_tail
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


def test_refuses_without_isolation_unless_allowed(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "_probe_result", (False, "user namespaces are disabled"))
    with pytest.raises(SandboxUnavailable, match="--allow-unsafe-code") as err:
        run_tests("assert True\n")
    assert "\n" not in str(err.value)
    assert run_tests("assert True\n", allow_unsafe=True).status == "passed"
    monkeypatch.setenv(sandbox.ALLOW_UNSAFE_ENV, "1")
    assert run_python("assert True\n").status == "passed"


def test_best_effort_path_survives_what_it_cannot_stop(monkeypatch):
    # Where the opt-in is used: still a result for every program, and nothing left behind.
    monkeypatch.setattr(sandbox, "_probe_result", (False, "test"))
    before = _sandbox_dirs()
    gone = run_python(
        "import os\nos.makedirs('locked/inner')\nos.chmod('locked/inner', 0)\nos.chmod('locked', 0)\n"
        "os.chmod('.', 0o500)\nos.ftruncate(2, 0)\n",
        allow_unsafe=True,
    )
    assert gone.status == "passed", gone.stderr_tail
    assert run_python("while True:\n    pass\n", timeout_s=1, allow_unsafe=True).status == "timeout"
    guarded = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9))\n", allow_unsafe=True)
    assert guarded.status == "failed" and "network access is disabled" in guarded.stderr_tail
    assert not _sandbox_dirs() - before


def test_isolated_as_a_normal_user(tmp_path):
    """The same isolation for an unprivileged caller (an unprivileged user namespace)."""
    target = _marker(REPO)
    program = (
        "import os\n"
        "assert os.getuid() == 65534 and os.getpid() == 2\n"
        "os.kill(os.getppid(), 9)\n"
        f"open({str(target)!r}, 'w')\n"
    )
    check = (
        f"r = sandbox.run_python({program!r})\n"
        "assert r.status == 'failed' and 'No such file or directory' in r.stderr_tail, r\n"
        "print('OK')\n"
    )
    done = run_as_nobody(check, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "OK", done.stdout + done.stderr
    assert not target.exists()
