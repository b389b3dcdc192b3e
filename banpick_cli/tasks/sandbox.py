"""Runs untrusted Python (model-written code plus its unit tests) in an isolated, limited process.

The kernel isolates each program, as bubblewrap and nsjail do, with nothing but Python and its ctypes: the
host starts `python -I -B tasks/sandbox_child.py` (a module of its own, run as a file), which joins a memory
cgroup made for this program where one can be made, unshares user, mount, PID, network, IPC, UTS and
cgroup namespaces and forks an init (PID 1 inside); the init builds the program's root, makes itself
non-dumpable, drops its capabilities and forks the program (PID 2), which runs `main.py` in that same
interpreter. It works as root and as a normal user where user namespaces are allowed.

What is isolated (each a test in tests/tasks/test_sandbox*.py, as root and as user nobody):
- Files: the program's root is a tmpfs it was pivoted into (`pivot_root`, the host's tree detached):
  the base interpreter's prefix, /usr, /lib*, /bin, /sbin and /etc/ld.so.cache, read-only; a private /tmp
  (64 MiB, 4096 inodes, noexec) holding its folder, its cwd; a read-only /dev with null, zero, full,
  random, urandom and a private /dev/shm. No /etc beyond that, no /home, /root, /var, /run, /proc, /sys,
  no checkout: the host's unix sockets, secrets and profiles are not there to open or connect to.
- Processes: its own PID namespace and no /proc; it cannot signal or name the evaluator. The init and the
  program are non-dumpable and nothing inside holds a capability, so ptrace (PTRACE_ATTACH on pid 1 or 2)
  and reading their memory fail. When the init exits, the kernel kills everything left in the namespace.
- Privileges: no capability, no_new_privs, a user id that is not 0 inside (1000 when run as root).
- Network: an empty network namespace (a down loopback only), so every connect fails.
- Verdict: "passed" only when the program's code ran to its end: the host sends a random token through a
  pipe into the program's process before the program starts; only the frame that ran the program can have
  it written to the verdict pipe, after the code returned (sandbox_child.py says how). The exit status is
  reported (`returncode`) but decides nothing: `os._exit(0)`, `sys.exit(0)`, an atexit handler, a signal
  or a fork grade a run failed.
- Limits: wall-clock timeout (the launcher kills the init from outside, which takes the namespace down);
  memory: a cgroup (`sandbox_cgroup.py`) caps the whole tree at `memory_mb` where one can be made (root
  with cgroup v1's memory hierarchy or a delegated cgroup v2), else RLIMIT_AS per process times
  RLIMIT_NPROC (`memory_bound()` says which, in words); RLIMIT_CPU, RLIMIT_FSIZE (1 MiB per file, stdout
  and stderr included), RLIMIT_NOFILE, RLIMIT_NPROC (which the kernel does not enforce for root; on Linux
  6.14+ the namespace's own pid_max caps it near 300 processes instead).
- stdin, stdout and stderr are unlinked temporary files the program cannot remove; stdin is empty.

Not isolated: the kernel is shared (no seccomp filter); /usr and the interpreter's prefix are readable; a
program can still make its asserts true by what it returns (an object equal to everything). The verdict
holds against Python code; inside the program's process an audit hook refuses ctypes, gc's object walks,
tracing, marshal and hand-built code objects, the routes to the token in memory; a native extension
module that the interpreter's own prefix ships could still read it. The isolated path costs ~50 ms per
program over a bare `python -I` (docs/benchmarks.md). Where the kernel refuses user namespaces (sysctls such
as kernel.unprivileged_userns_clone=0 or a reached user.max_user_namespaces, AppArmor's
restrict_unprivileged_userns, some container seccomp profiles), code tasks refuse to run
(`SandboxUnavailable`) unless the caller opts in with `allow_unsafe=True` (the CLI's
`--allow-unsafe-code`) or `BANPICK_ALLOW_UNSAFE_CODE=1`; that best-effort path is a `python -I` in a
temporary directory with the same rlimits, an attempt at a network namespace plus a socket guard, and a
kill of its process group: it confines no write and no read, `setsid` children outlive it, and its verdict
is the exit status.
"""

from __future__ import annotations

import ctypes
import os
import resource
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

from banpick_cli.errors import SandboxUnavailable
from banpick_cli.tasks.sandbox_cgroup import cgroup_parent, memory_cgroup, remove_cgroup

OUTPUT_LIMIT = 1 << 20  # bytes each of stdout/stderr (and any file) may grow to (RLIMIT_FSIZE)
PROCESS_LIMIT = 64  # RLIMIT_NPROC of the program (per user; the kernel exempts root)
ALLOW_UNSAFE_ENV = "BANPICK_ALLOW_UNSAFE_CODE"
_TAIL = 2000  # characters of stderr kept in a result
_GRACE_S = 5.0  # how long past the timeout we wait for the launcher before killing it ourselves
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
_CLONE_NEWNET, _CLONE_NEWUSER = 0x40000000, 0x10000000
# Prepended to every program on the unsafe path: the fallback when no network namespace could be made.
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

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
# The base interpreter, not a virtual environment's link to it: the program's root holds its prefix only.
_INTERPRETER = os.path.realpath(sys.executable)


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended: `status` is "passed", "failed" (non-zero exit) or "timeout"."""

    status: str
    returncode: int | None
    stderr_tail: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The probe: a program that passes only when it is PID 2 under our init and cannot write outside /tmp.
_PROBE = (
    "import os\n"
    "assert os.getpid() == 2 and os.getppid() == 1, 'no PID namespace'\n"
    "try:\n"
    "    open(os.path.join(os.path.dirname(os.__file__), 'banpick-sandbox-probe'), 'w')\n"
    "except OSError:\n"
    "    pass\n"
    "else:\n"
    "    raise SystemExit('the file system is writable')\n"
    "open('probe', 'w').write('ok')\n"
)
_probe_lock = threading.Lock()
_probe_result: tuple[bool, str] | None = None


def isolation_available() -> tuple[bool, str]:
    """Returns whether this system runs programs isolated, and why not; probed once per process."""
    global _probe_result
    with _probe_lock:
        if _probe_result is None:
            result = _run_isolated(_PROBE, timeout_s=10.0, memory_mb=512)
            reason = result.stderr_tail.strip().splitlines()[-1:] or [result.status]
            _probe_result = (result.passed, "" if result.passed else reason[0])
        return _probe_result


def _run_isolated(source: str, *, timeout_s: float, memory_mb: int, legacy_remount: bool = False) -> SandboxResult:
    token = secrets.token_hex(16).encode()
    token_r, token_w = os.pipe()
    os.write(token_w, token)  # 32 bytes: the pipe holds them until the program's process reads them
    os.close(token_w)
    verdict_r, verdict_w = os.pipe()
    report_r, report_w = os.pipe()
    cgroup = memory_cgroup(memory_mb)
    try:
        with _temp_file(source.encode("utf-8")) as stdin, _temp_file() as stdout, _temp_file() as stderr:
            name = "banpick-sandbox-" + secrets.token_hex(6)
            args = [_INTERPRETER, "-I", "-B", _CHILD, repr(float(timeout_s)), str(int(memory_mb)), str(PROCESS_LIMIT),
                    name, str(report_w), str(token_r), str(verdict_w), "1" if legacy_remount else "0",
                    os.path.join(cgroup, "cgroup.procs") if cgroup else ""]
            try:
                proc = subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=stderr, env=_ENV,
                                        pass_fds=(report_w, token_r, verdict_w), start_new_session=True)
            except OSError as err:
                return SandboxResult("failed", None, f"sandbox: cannot start the launcher: {err}")
            finally:
                for fd in (report_w, token_r, verdict_w):
                    os.close(fd)
            with open(report_r, "rb") as report_file, open(verdict_r, "rb") as verdict_file:
                report_r = verdict_r = -1  # closed by the with
                # Wait on the report, not with Popen.wait(timeout), which polls in steps of up to 50 ms.
                poll = select.poll()
                poll.register(report_file.fileno(), select.POLLIN)
                if not poll.poll((timeout_s + _GRACE_S) * 1000):
                    _kill_group(proc)
                report = report_file.read().decode("utf-8", "replace")  # the launcher exits right after
                proc.wait()
                os.set_blocking(verdict_file.fileno(), False)
                verdict = verdict_file.read(len(token) + 1) or b""  # every writer is gone with the namespace
            tail = _tail(stderr)
    finally:
        for fd in (report_r, verdict_r):
            if fd >= 0:
                os.close(fd)
        out_of_memory = remove_cgroup(cgroup) if cgroup else False
    code = int(report[5:]) if report.startswith("exit ") and report[5:].lstrip("-").isdigit() else None
    if out_of_memory:
        note = f"sandbox: the program's processes used more than {memory_mb} MiB together and were killed"
        return SandboxResult("failed", code, (tail + "\n" + note)[-_TAIL:])
    if code is not None:
        # Only the token says the program ran to its end: an exit status of 0 is not a pass.
        return SandboxResult("passed" if verdict == token else "failed", code, tail)
    if report == "timeout" or not report and proc.returncode == -signal.SIGKILL:
        return SandboxResult("timeout", None, tail)
    why = report.removeprefix("error ") or f"the launcher exited with {proc.returncode}"
    return SandboxResult("failed", None, (tail + f"\nsandbox: {why}")[-_TAIL:])



def memory_bound(memory_mb: int = 512) -> str:
    """Returns, in words, what bounds the memory of one program's whole tree of processes on this machine."""
    if cgroup_parent() is not None:
        return f"{memory_mb} MiB for the program and all its processes together (a memory cgroup)"
    return (f"{memory_mb} MiB of address space per process (RLIMIT_AS) times at most {PROCESS_LIMIT} processes "
            f"(RLIMIT_NPROC; about 300 for root, the namespace's pid_max): no cgroup can be made here")


def _run_unsafe(source: str, *, timeout_s: float, memory_mb: int) -> SandboxResult:
    # Today's best effort, for systems without user namespaces, and only when the caller opted in.
    tmp = tempfile.mkdtemp(prefix=f"banpick-sandbox-{os.getpid()}-")  # the pid says whose a leftover would be
    try:
        with open(os.path.join(tmp, "main.py"), "w", encoding="utf-8") as script:
            script.write(NETWORK_GUARD + source)
        with _temp_file() as stdout, _temp_file() as stderr:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-B", "main.py"], cwd=tmp, stdin=subprocess.DEVNULL, stdout=stdout,
                    stderr=stderr, env=_ENV, start_new_session=True,
                    preexec_fn=lambda: _limits(memory_mb, max(1, int(timeout_s) + 1)),  # noqa: PLW1509 (opt-in path)
                )
            except OSError as err:
                return SandboxResult("failed", None, f"sandbox: cannot start the program: {err}")
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                _kill_group(proc)  # the child may have spawned helpers in its session
            tail = _tail(stderr)
    finally:
        _remove_tree(tmp)
    if code is None:
        return SandboxResult("timeout", None, tail)
    return SandboxResult("passed" if code == 0 else "failed", code, tail)


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


def _temp_file(data: bytes = b""):
    # Unlinked at once: the program can truncate its output but not delete it, and nothing stays in /tmp.
    f = tempfile.TemporaryFile()  # noqa: SIM115 (the caller closes it)
    if data:
        f.write(data)
        f.seek(0)
    return f


def _tail(f) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - 4 * _TAIL))
    return f.read().decode("utf-8", "replace")[-_TAIL:]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _remove_tree(path: str) -> None:
    # The program may have made parts of its directory unreadable or unwritable: give them back first.
    def grant(func, p, exc_info):
        for q in (os.path.dirname(p), p):
            try:
                os.chmod(q, stat.S_IRWXU)
            except OSError:
                pass
        try:
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=grant)
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)


def unsafe_allowed(allow_unsafe: bool = False) -> bool:
    """Returns whether model-written code may run without isolation (the argument or the environment)."""
    return allow_unsafe or os.environ.get(ALLOW_UNSAFE_ENV, "") == "1"


def require_sandbox(allow_unsafe: bool = False) -> bool:
    """Returns True when programs will run isolated, False when unsafely by the caller's opt-in; raises
    `SandboxUnavailable` when neither (callers check before a long run, not at its first code task)."""
    available, reason = isolation_available()
    if available:
        return True
    if not unsafe_allowed(allow_unsafe):
        raise SandboxUnavailable(
            f"cannot isolate model-written code here ({reason}); pass --allow-unsafe-code "
            f"(or set {ALLOW_UNSAFE_ENV}=1) to run it without a sandbox"
        )
    return False


def run_python(
    source: str, *, timeout_s: float = 5.0, memory_mb: int = 512, allow_unsafe: bool = False,
) -> SandboxResult:
    """Returns how `source` ended when run as a script in a fresh, isolated and limited interpreter.

    Isolated wherever the kernel allows it. Elsewhere raises `SandboxUnavailable`, unless `allow_unsafe`
    (or BANPICK_ALLOW_UNSAFE_CODE=1) permits the best-effort path. Never raises for what the program does.
    """
    if require_sandbox(allow_unsafe):
        return _run_isolated(source, timeout_s=timeout_s, memory_mb=memory_mb)
    return _run_unsafe(source, timeout_s=timeout_s, memory_mb=memory_mb)


def run_tests(
    program: str, *, timeout_s: float = 5.0, memory_mb: int = 512, allow_unsafe: bool = False,
) -> SandboxResult:
    """Returns the result of running a program whose asserts are its unit tests (exit 0 means all passed)."""
    return run_python(program, timeout_s=timeout_s, memory_mb=memory_mb, allow_unsafe=allow_unsafe)
