"""Runs untrusted Python (model-written code plus its unit tests) in an isolated, limited process.

The kernel isolates each program, as bubblewrap and nsjail do, with nothing but Python and its
ctypes: a launcher (`python -I -B -c _LAUNCHER`) calls `unshare(2)` for new user, mount, PID,
network, IPC, UTS and cgroup namespaces and forks an init, PID 1 of the new PID namespace; the init
builds the file-system view, drops its capabilities and forks the program (PID 2), which compiles
and runs `main.py` in that same interpreter (no second interpreter start: ~0-5 ms over the old
sandbox per program). It works as root and as a normal user where user namespaces are allowed.

- Files: every mount is read-only (`mount_setattr(AT_RECURSIVE, MOUNT_ATTR_RDONLY)`, or a remount of
  each mount on kernels before 5.12). `/tmp` is a private tmpfs (64 MiB, 4096 inodes) that holds the
  program's run directory, its cwd; `/dev/shm` is a private tmpfs; `/run` is an empty read-only
  tmpfs (no host sockets); `/dev` is a read-only tmpfs with only null, zero, full, random, urandom.
  Everything the program writes vanishes with it; the host keeps nothing of it but its output.
- Processes: the program sees only its own PID namespace (a fresh read-only `/proc`). It cannot
  signal, trace or even name the evaluator or the launcher (its own session, pid numbers that mean
  nothing outside). When the init exits, the kernel kills everything left in the namespace
  (`setsid` and double forks included) before the run returns.
- Privileges: no capability, no_new_privs, and a user id that is not 0 inside (1000 when run as
  root), so it cannot undo the mounts or gain privileges through setuid files. Run as root, its
  file accesses are still checked as the host's uid 0 without capabilities: it reads what root's
  owner bits allow.
- Network: an empty network namespace (a down loopback only), so every connect fails.
- Limits: wall-clock timeout (the launcher kills the init from outside, which takes the namespace
  down), RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE (1 MiB per file, stdout and stderr included),
  RLIMIT_NOFILE, RLIMIT_NPROC (which the kernel does not enforce for root; on Linux 6.14+ the
  namespace's own pid_max caps it near 300 processes instead).
- stdin, stdout and stderr are unlinked temporary files the program cannot remove; stdin is empty.

Not isolated: reading. The program can read whatever the evaluator's user can (as root, almost
everything, home directories included); with no network it can leak that only through its stderr
tail. It shares the kernel (no seccomp filter); the tmpfs pages it writes count against no rlimit
(80 MiB at most). Where the kernel refuses user namespaces (sysctls such as
kernel.unprivileged_userns_clone=0, AppArmor's restrict_unprivileged_userns, some container seccomp
profiles), code tasks refuse to run (`SandboxUnavailable`) unless the caller opts in with
`allow_unsafe=True` (the CLI's `--allow-unsafe-code`) or `BANPICK_ALLOW_UNSAFE_CODE=1`; that
best-effort path is a `python -I` in a temporary directory with the same rlimits, an attempt at a
network namespace plus a socket guard, and a kill of its process group: it confines no write, and
`setsid` children outlive it.
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

# The launcher, run as `python -I -B -c _LAUNCHER timeout_s memory_mb nproc name report_fd legacy` with
# the program on stdin and stdout/stderr already the host's output files. It is source text, not an
# import of this package, which would cost tens of milliseconds per program. It writes one line to
# report_fd: "exit N" (N < 0: killed by signal -N), "timeout" or "error WHY".
_LAUNCHER = r'''
import ctypes, os, select, signal, sys
timeout_s, memory_mb, nproc, name, report_fd, legacy = sys.argv[1:]
timeout_s, memory_mb, nproc, report_fd = float(timeout_s), int(memory_mb), int(nproc), int(report_fd)
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18

def check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))

def mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), "mount %s" % target)

def write(path, text):
    with open(path, "w") as f:
        f.write(text)

def read_only(path, recursive):
    # mount_setattr(2) (Linux 5.12, syscall 442 on every architecture) keeps each mount's other flags,
    # which a user namespace may not change (they are locked); before it, remount one mount at a time.
    if legacy != "1":
        attr = (ctypes.c_uint64 * 4)(1, 0, 0, 0)  # attr_set = MOUNT_ATTR_RDONLY
        flags = 0x8000 if recursive else 0  # AT_RECURSIVE
        libc.syscall.restype = ctypes.c_long
        if libc.syscall(ctypes.c_long(442), ctypes.c_int(-100), path.encode(), ctypes.c_uint(flags),
                        ctypes.byref(attr), ctypes.c_size_t(32)) == 0:
            return
        if ctypes.get_errno() not in (38, 22):  # ENOSYS, EINVAL: an older kernel
            check(-1, "mount_setattr %s" % path)
    points = [path]
    if recursive:
        import re
        with open("/proc/self/mountinfo", "rb") as f:
            points = [l.split()[4] for l in f]
        octal = lambda m: bytes([int(m.group(1), 8)])  # mountinfo writes a space as \040
        points = [os.fsdecode(re.sub(rb"\\([0-7]{3})", octal, p)) for p in points]
        points = [p for p in points if p == path or p.startswith(path.rstrip("/") + "/")]
    keep = {2: NOSUID, 4: NODEV, 8: NOEXEC, 1024: 1024, 2048: 2048, 4096: 1 << 21}  # ST_* -> MS_*
    for point in points:
        try:
            flag = os.statvfs(point).f_flag
        except OSError:
            continue  # hidden under another mount, so out of reach
        extra = sum(ms for st, ms in keep.items() if flag & st)
        mount(None, point, None, REMOUNT | BIND | RDONLY | extra)

def init(source, status_w, life_r):
    # PID 1 of the new namespace, still holding every capability inside it: builds the file-system
    # view, drops its capabilities, then forks the program and waits for it.
    check(libc.prctl(1, signal.SIGKILL, 0, 0, 0), "prctl")  # PR_SET_PDEATHSIG: dies with the launcher
    if select.select([life_r], [], [], 0)[0]:
        os._exit(1)  # the launcher died before the line above
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as init, the program cannot signal us
    os.setsid()
    mount(None, "/", None, REC | PRIVATE)
    devices = {d: os.open("/dev/" + d, os.O_PATH) for d in ("null", "zero", "full", "random", "urandom")}
    read_only("/", True)
    mount("tmpfs", "/tmp", "tmpfs", NOSUID | NODEV, "size=64m,nr_inodes=4096,mode=1777")
    home = "/tmp/" + name
    os.mkdir(home, 0o700)
    with open(home + "/main.py", "wb") as f:
        f.write(source)
    mount("tmpfs", "/dev", "tmpfs", NOSUID | NOEXEC, "size=64k,nr_inodes=64,mode=755")
    for dev, fd in devices.items():
        os.close(os.open("/dev/" + dev, os.O_CREAT | os.O_WRONLY, 0o666))
        mount("/proc/self/fd/%d" % fd, "/dev/" + dev, None, BIND)
        os.close(fd)
    for link, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, "/dev/" + link)
    os.mkdir("/dev/shm")
    mount("tmpfs", "/dev/shm", "tmpfs", NOSUID | NODEV, "size=16m,nr_inodes=256,mode=1777")
    mount(None, "/dev", None, REMOUNT | BIND | RDONLY | NOSUID | NOEXEC)
    for run in ("/run", "/var/run"):
        if os.path.isdir(run) and not os.path.islink(run):
            mount("tmpfs", run, "tmpfs", RDONLY | NOSUID | NODEV | NOEXEC, "size=4k,nr_inodes=8,mode=755")
    try:  # a fresh /proc shows only this namespace; containers that mask /proc refuse it
        mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC)
        try:
            write("/proc/sys/kernel/pid_max", "301")  # per namespace since Linux 6.14: ~300 processes
        except OSError:
            pass
        read_only("/proc", False)
    except OSError:
        pass  # the host's /proc, read-only: other pids are visible but cannot be signalled
    os.chdir(home)
    check(libc.prctl(38, 1, 0, 0, 0), "prctl")  # PR_SET_NO_NEW_PRIVS
    header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
    check(libc.capset(header, data), "capset")  # keep no capability in the namespace either
    child = os.fork()
    if child == 0:
        return home + "/main.py"  # the program's process: back to the top level, which runs it
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(1)
        if pid == child:
            break
    os.write(status_w, b"exit %d" % os.waitstatus_to_exitcode(status))
    os._exit(0)  # the kernel now kills whatever the program left behind

def become_program():
    # Still the launcher's interpreter, now without capabilities: limit it, then hand it the program.
    os.setsid()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import resource as r
    r.setrlimit(r.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    cpu = max(1, int(timeout_s) + 1)
    r.setrlimit(r.RLIMIT_CPU, (cpu, cpu + 1))
    r.setrlimit(r.RLIMIT_FSIZE, (__OUTPUT__, __OUTPUT__))
    r.setrlimit(r.RLIMIT_NOFILE, (64, 64))
    r.setrlimit(r.RLIMIT_CORE, (0, 0))
    r.setrlimit(r.RLIMIT_NPROC, (nproc, nproc))
    os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
    os.closerange(3, 1 << 16)

def report(line):
    os.write(report_fd, line.encode("utf-8", "replace"))
    os._exit(0)  # no interpreter shutdown: it costs milliseconds and nothing needs it

try:
    chunks = []
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    source = b"".join(chunks)
    uid, gid = os.geteuid(), os.getegid()
    # USER | NS | PID | NET | IPC | UTS | CGROUP
    check(libc.unshare(0x10000000 | 0x20000 | 0x20000000 | 0x40000000 | 0x08000000 | 0x04000000 | 0x02000000),
          "unshare")
    write("/proc/self/setgroups", "deny")
    # a non-zero uid inside, so that execve leaves the program no capability
    write("/proc/self/uid_map", "%d %d 1" % (uid or 1000, uid))
    write("/proc/self/gid_map", "%d %d 1" % (gid or 1000, gid))
    status_r, status_w = os.pipe()
    life_r, life_w = os.pipe()
    child = os.fork()
except OSError as e:
    report("error %s" % e)
if child == 0:
    try:
        os.close(status_r)
        os.close(life_w)
        os.close(report_fd)
        path = init(source, status_w, life_r)
    except BaseException as e:
        os.write(status_w, ("error %s" % e).encode("utf-8", "replace"))
        os._exit(1)
    try:
        become_program()
    except BaseException as e:
        os.write(2, ("sandbox: cannot start the program: %s\n" % e).encode())
        os._exit(127)
    import types
    main = types.ModuleType("__main__")
    main.__file__, main.__builtins__ = path, __builtins__
    sys.modules["__main__"], sys.argv = main, [path]
    del init, become_program, report, libc, chunks, chunk, source
    code = 0
    try:
        exec(compile(open(path, "rb").read(), path, "exec"), main.__dict__)
    except SystemExit as e:  # as the interpreter maps it to an exit status
        code = e.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException as e:  # printed as the interpreter would, without this launcher's frame
        e.__traceback__ = e.__traceback__.tb_next if e.__traceback__ else None
        sys.excepthook(type(e), e, e.__traceback__)
        code = 1
    # The interpreter's exit, less its module teardown (milliseconds that no test result depends on).
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        import atexit
        atexit._run_exitfuncs()
    except BaseException:
        code = code or 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            code = code or 120
    os._exit(code & 0xFF)
os.close(status_w)

class Deadline(Exception):
    pass

def on_alarm(signum, frame):
    raise Deadline

signal.signal(signal.SIGALRM, on_alarm)
timed_out = False
try:
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    os.waitpid(child, 0)
    signal.setitimer(signal.ITIMER_REAL, 0)
except Deadline:
    timed_out = True
    try:
        os.kill(child, signal.SIGKILL)  # from outside the namespace, so even its init dies
        os.waitpid(child, 0)  # returns once the whole namespace is gone
    except (ProcessLookupError, ChildProcessError):
        pass
chunks = []
while True:
    chunk = os.read(status_r, 4096)
    if not chunk:
        break
    chunks.append(chunk)
status = b"".join(chunks).decode("utf-8", "replace")
report("timeout" if timed_out else status or "error the sandbox's init died")
'''.replace("__OUTPUT__", str(OUTPUT_LIMIT)).replace("__ENV__", repr(_ENV))


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
    with _temp_file(source.encode("utf-8")) as stdin, _temp_file() as stdout, _temp_file() as stderr:
        report_r, report_w = os.pipe()
        name = "banpick-sandbox-" + secrets.token_hex(6)
        args = [sys.executable, "-I", "-B", "-c", _LAUNCHER, repr(float(timeout_s)), str(int(memory_mb)),
                str(PROCESS_LIMIT), name, str(report_w), "1" if legacy_remount else "0"]
        try:
            proc = subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=stderr, pass_fds=(report_w,),
                                    start_new_session=True, env=_ENV)
        except OSError as err:
            os.close(report_r)
            return SandboxResult("failed", None, f"sandbox: cannot start the launcher: {err}")
        finally:
            os.close(report_w)
        with open(report_r, "rb") as report_file:
            # Wait on the report, not with Popen.wait(timeout), which polls in steps of up to 50 ms.
            poll = select.poll()
            poll.register(report_r, select.POLLIN)
            if not poll.poll((timeout_s + _GRACE_S) * 1000):
                _kill_group(proc)
            report = report_file.read().decode("utf-8", "replace")  # the launcher exits right after
            proc.wait()
        tail = _tail(stderr)
    if report.startswith("exit ") and report[5:].lstrip("-").isdigit():
        code = int(report[5:])
        return SandboxResult("passed" if code == 0 else "failed", code, tail)
    if report == "timeout" or not report and proc.returncode == -signal.SIGKILL:
        return SandboxResult("timeout", None, tail)
    why = report.removeprefix("error ") or f"the launcher exited with {proc.returncode}"
    return SandboxResult("failed", None, (tail + f"\nsandbox: {why}")[-_TAIL:])


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
