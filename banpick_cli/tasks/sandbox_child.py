"""The sandbox's launcher, its init and the program's process: run as a file by `tasks/sandbox.py`.

Executed as `python -I -B sandbox_child.py TIMEOUT MEMORY_MB NPROC NAME REPORT_FD TOKEN_FD VERDICT_FD LEGACY
CGROUP_PROCS` with the program on stdin (the standard library only: importing this package would cost tens of
milliseconds per program). Importable for its checks and tests; `main()` runs only as a script.

The launcher joins the memory cgroup the host made (if any), unshares user, mount, PID, network, IPC, UTS and
cgroup namespaces and forks the init (PID 1 inside). The init builds a new root on a tmpfs holding only the
interpreter's prefix and the system's library folders (read-only), a private /tmp with the program's folder and
a minimal /dev; it mounts no /proc or /sys, pivots into that root, detaches the host's tree, makes itself
non-dumpable, drops every capability and forks the program (PID 2). The program's process arms the verdict
(`arm_verdict`), limits itself and runs `main.py` in the same interpreter.

The verdict: the host hands a random token through a pipe that only the program's process reads, before the
program starts, into the constants of a function no Python code can inspect (`emit`). It writes the token to
the verdict pipe only when called by the verdict hook for the event that `run_to_end` raises after the
program's code returned, from that very frame, in the program's first process. An exit status, `os._exit`,
an atexit handler, a signal or a fork cannot produce it. An audit hook (which Python cannot remove) refuses
what could reach the token: ctypes, gc's object walks, tracing and profiling, code objects built by hand,
marshal (imports compile from source), `emit`'s attributes.
"""

from __future__ import annotations

import ctypes
import os
import platform
import select
import signal
import sys

RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
# USER | NS | PID | NET | IPC | UTS | CGROUP
NAMESPACES = 0x10000000 | 0x20000 | 0x20000000 | 0x40000000 | 0x08000000 | 0x04000000 | 0x02000000
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
FINISHED_EVENT = "banpick.sandbox.finished"
OUTPUT_LIMIT = 1 << 20  # bytes each of stdout/stderr (and any file) may grow to; tasks/sandbox.py says the same
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
DEVICES = ("null", "zero", "full", "random", "urandom")
# audit events the program may not raise: native memory access, reaching objects it was not given, new bytecode
REFUSED_EVENTS = frozenset({
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile",
    "sys.monitoring.register_callback", "marshal.load", "marshal.loads", "sys._current_frames",
})
REFUSED_IMPORTS = ("ctypes", "_ctypes", "_test", "_xx")

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.syscall.restype = ctypes.c_long


class NamespacesCapped(OSError):
    """The kernel's cap on user namespaces (user.max_user_namespaces) is reached: unshare said ENOSPC."""


def check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        if what == "unshare" and err == 28:  # ENOSPC: the per-user namespace count is at its cap
            raise NamespacesCapped(err, "user namespaces are capped (user.max_user_namespaces)")
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(s):
        return None if s is None else s.encode()

    check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def read_only(path: str, recursive: bool, legacy: bool) -> None:
    """Makes the mount at `path` (and those under it) read-only, keeping each one's locked flags."""
    # mount_setattr(2) (Linux 5.12, syscall 442 on every architecture) keeps each mount's other flags, which a
    # user namespace may not change (they are locked); before it, remount one mount at a time.
    if not legacy:
        attr = (ctypes.c_uint64 * 4)(1, 0, 0, 0)  # attr_set = MOUNT_ATTR_RDONLY
        flags = 0x8000 if recursive else 0  # AT_RECURSIVE
        if libc.syscall(ctypes.c_long(442), ctypes.c_int(-100), path.encode(), ctypes.c_uint(flags),
                        ctypes.byref(attr), ctypes.c_size_t(32)) == 0:
            return
        if ctypes.get_errno() not in (38, 22):  # ENOSYS, EINVAL: an older kernel
            check(-1, f"mount_setattr {path}")
    points = [path]
    if recursive:
        import re

        with open("/proc/self/mountinfo", "rb") as f:
            raw = [line.split()[4] for line in f]
        points = [os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), p)) for p in raw]
        points = [p for p in points if p == path or p.startswith(path.rstrip("/") + "/")]
    keep = {2: NOSUID, 4: NODEV, 8: NOEXEC, 1024: 1024, 2048: 2048, 4096: 1 << 21}  # ST_* -> MS_*
    for point in points:
        try:
            flag = os.statvfs(point).f_flag
        except OSError:
            continue  # hidden under another mount, so out of reach
        extra = sum(ms for st, ms in keep.items() if flag & st)
        mount(None, point, None, REMOUNT | BIND | RDONLY | extra)


def visible_tree() -> list[tuple[str, str | None]]:
    """Returns what the new root shows of the host: (path, symlink target or None for a read-only bind)."""
    prefix = os.path.realpath(sys.base_prefix)
    entries: list[tuple[str, str | None]] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            entries.append((path, os.readlink(path)))
        elif os.path.isdir(path):
            entries.append((path, None))
    if not any(prefix == p or prefix.startswith(p + "/") for p, link in entries if link is None):
        entries.append((prefix, None))
    if os.path.isfile("/etc/ld.so.cache"):  # the dynamic loader's index: the libraries' multiarch folders
        entries.append(("/etc/ld.so.cache", None))
    return entries


def build_root(name: str, source: bytes, legacy: bool) -> str:
    """Builds the program's root on a tmpfs at /tmp and pivots into it; returns the program's path inside."""
    entries = visible_tree()
    sources = {path: os.open(path, os.O_PATH) for path, link in entries if link is None}
    devices = {d: os.open("/dev/" + d, os.O_PATH) for d in DEVICES}
    root = "/tmp"
    mount("tmpfs", root, "tmpfs", NOSUID | NODEV, "size=1m,nr_inodes=256,mode=755")
    for path, link in entries:
        os.makedirs(os.path.dirname(root + path), 0o755, exist_ok=True)
        if link is not None:
            os.symlink(link, root + path)
            continue
        if os.path.isdir(f"/proc/self/fd/{sources[path]}"):
            os.makedirs(root + path, 0o755, exist_ok=True)
        else:
            os.close(os.open(root + path, os.O_CREAT | os.O_WRONLY, 0o644))
        mount(f"/proc/self/fd/{sources[path]}", root + path, None, BIND | REC)
        os.close(sources[path])
    for folder in ("tmp", "dev", "proc"):
        os.mkdir(f"{root}/{folder}", 0o755)
    mount("tmpfs", root + "/dev", "tmpfs", NOSUID | NOEXEC, "size=64k,nr_inodes=64,mode=755")
    for dev, fd in devices.items():
        os.close(os.open(f"{root}/dev/{dev}", os.O_CREAT | os.O_WRONLY, 0o666))
        mount(f"/proc/self/fd/{fd}", f"{root}/dev/{dev}", None, BIND)
        os.close(fd)
    os.mkdir(root + "/dev/shm")
    limit_processes(root + "/proc")
    read_only(root, True, legacy)
    # the only writable places: the program's /tmp (its folder, its cwd) and /dev/shm, both small and noexec
    mount("tmpfs", root + "/tmp", "tmpfs", NOSUID | NODEV | NOEXEC, "size=64m,nr_inodes=4096,mode=1777")
    mount("tmpfs", root + "/dev/shm", "tmpfs", NOSUID | NODEV | NOEXEC, "size=16m,nr_inodes=256,mode=1777")
    home = "/tmp/" + name
    os.mkdir(root + home, 0o700)
    with open(f"{root}{home}/main.py", "wb") as f:
        f.write(source)
    enter(root)
    return home + "/main.py"


def limit_processes(proc: str) -> None:
    # A proc mount of this PID namespace, only long enough to cap its pid_max (per namespace since Linux 6.14:
    # ~300 processes even for root, whom RLIMIT_NPROC does not bind); the program gets no /proc.
    try:
        mount("proc", proc, "proc", NOSUID | NODEV | NOEXEC)
    except OSError:
        return  # containers that mask /proc refuse a new one
    try:
        write(proc + "/sys/kernel/pid_max", "301")
    except OSError:
        pass
    check(libc.umount2(proc.encode(), MNT_DETACH), "umount /proc")


def enter(root: str) -> None:
    """Makes `root` the file-system root and drops the host's tree from this mount namespace."""
    os.chdir(root)
    number = PIVOT_ROOT.get(platform.machine())
    if number is not None and libc.syscall(ctypes.c_long(number), b".", b".") == 0:
        check(libc.umount2(b".", MNT_DETACH), "umount the host's root")  # the old root, stacked under "."
    else:  # a rootfs that cannot be pivoted: chroot, which a process without capabilities cannot leave
        os.chroot(".")
    os.chdir("/")


def init(source: bytes, name: str, legacy: bool, status_w: int, life_r: int) -> str:
    """PID 1 of the new namespace: builds the program's root, forks the program and reports its exit status;
    returns (in the program's process only) the program's path."""
    check(libc.prctl(1, signal.SIGKILL, 0, 0, 0), "prctl")  # PR_SET_PDEATHSIG: dies with the launcher
    if select.select([life_r], [], [], 0)[0]:
        os._exit(1)  # the launcher died before the line above
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as init, the program cannot signal us
    os.setsid()
    mount(None, "/", None, REC | PRIVATE)
    path = build_root(name, source, legacy)
    os.chdir(os.path.dirname(path))
    check(libc.prctl(4, 0, 0, 0, 0), "prctl")  # PR_SET_DUMPABLE 0: no ptrace or /proc/1/mem without a capability
    check(libc.prctl(38, 1, 0, 0, 0), "prctl")  # PR_SET_NO_NEW_PRIVS
    header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
    check(libc.capset(header, data), "capset")  # keep no capability in the namespace either
    child = os.fork()
    if child == 0:
        return path
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(1)
        if pid == child:
            break
    os.write(status_w, b"exit %d" % os.waitstatus_to_exitcode(status))
    os._exit(0)  # the kernel now kills whatever the program left behind


def limit(timeout_s: float, memory_mb: int, nproc: int) -> None:
    """Limits this process (the program's, without capabilities) and what it starts."""
    import resource as r

    os.setsid()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    r.setrlimit(r.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    cpu = max(1, int(timeout_s) + 1)
    r.setrlimit(r.RLIMIT_CPU, (cpu, cpu + 1))
    r.setrlimit(r.RLIMIT_FSIZE, (OUTPUT_LIMIT, OUTPUT_LIMIT))
    r.setrlimit(r.RLIMIT_NOFILE, (64, 64))
    r.setrlimit(r.RLIMIT_CORE, (0, 0))
    r.setrlimit(r.RLIMIT_NPROC, (nproc, nproc))
    os.dup2(os.open("/dev/null", os.O_RDONLY), 0)


def arm_verdict(token_fd: int, verdict_fd: int) -> None:
    """Installs the audit hooks that guard the token and write it for `run_to_end`'s frame (the caller's)."""
    import types
    import warnings

    runner = sys._getframe(1)  # the frame that runs the program: only it can finish
    pid = os.getpid()
    token = os.read(token_fd, 256)
    os.close(token_fd)
    os.set_inheritable(verdict_fd, False)  # no program it starts with exec gets the channel
    # emit() uses no name, default or closure: everything is a constant of its code, which no hook lets out
    with warnings.catch_warnings():  # "'str' object is not callable": each string stands for a constant
        warnings.simplefilter("ignore")
        module = compile('lambda: "GF"(2) is "RUNNER" and "GF"(1).f_code is "HOOK" and "PID"() == "MYPID" '
                         'and "WRITE"("FD", "TOKEN")', "<banpick verdict>", "eval")
    template = next(c for c in module.co_consts if isinstance(c, types.CodeType))
    emit_holder: list = []

    def verdict(event, args):
        if event == FINISHED_EVENT and emit_holder:
            emit_holder[0]()

    values = {"GF": sys._getframe, "RUNNER": runner, "HOOK": verdict.__code__, "PID": os.getpid, "MYPID": pid,
              "WRITE": os.write, "FD": verdict_fd, "TOKEN": token}
    consts = tuple(values[c] if isinstance(c, str) and c in values else c for c in template.co_consts)
    emit = types.FunctionType(template.replace(co_consts=consts), {"__builtins__": {}})
    emit_holder.append(emit)
    stdlib_types = types.__file__
    del token, values, consts, template, module

    def guard(event, args):
        if event in REFUSED_EVENTS or event.startswith("ctypes."):
            raise PermissionError(f"{event} is not allowed in the banpick sandbox")
        if event in ("object.__getattr__", "object.__setattr__", "object.__delattr__") and args[0] is emit:
            raise PermissionError("the sandbox's verdict is not the program's")
        if event == "import" and type(args[0]) is str and args[0].startswith(REFUSED_IMPORTS):
            raise PermissionError(f"importing {args[0]} is not allowed in the banpick sandbox")
        if event == "code.__new__" and sys._getframe(1).f_code.co_filename != stdlib_types:
            raise PermissionError("building code objects is not allowed in the banpick sandbox")  # types.coroutine may

    sys.addaudithook(guard)
    sys.addaudithook(verdict)
    # no cached bytecode from here on (marshal is refused): imports compile their source
    sys.pycache_prefix = "/nonexistent"
    import importlib.machinery as m

    sys.path_hooks[:] = [h for h in sys.path_hooks if "FileFinder" not in getattr(h, "__qualname__", "")]
    sys.path_hooks.append(m.FileFinder.path_hook(
        (m.ExtensionFileLoader, m.EXTENSION_SUFFIXES), (m.SourceFileLoader, m.SOURCE_SUFFIXES)))
    sys.path_importer_cache.clear()
    for loaded in [m for m in sys.modules if m.startswith(REFUSED_IMPORTS)]:
        del sys.modules[loaded]  # this module's own ctypes: the program imports it anew, which is refused


def run_to_end(code, namespace: dict, token_fd: int, verdict_fd: int) -> None:
    """Runs the program's code; the audit event from this frame after it returned is the only way to a pass."""
    finished = sys.audit  # taken before the program can replace it
    arm_verdict(token_fd, verdict_fd)
    exec(code, namespace)
    finished(FINISHED_EVENT)


def become_program(path: str, timeout_s: float, memory_mb: int, nproc: int, token_fd: int, verdict_fd: int) -> int:
    """Runs the program in this (the program's) process; returns its exit status as python would."""
    import types

    limit(timeout_s, memory_mb, nproc)
    os.closerange(3, min(token_fd, verdict_fd))
    os.closerange(max(token_fd, verdict_fd) + 1, 1 << 16)
    main = types.ModuleType("__main__")
    main.__file__, main.__builtins__ = path, __builtins__
    sys.modules["__main__"], sys.argv = main, [path]
    with open(path, "rb") as f:
        source = f.read()
    code = 0
    try:
        compiled = compile(source, path, "exec")
        run_to_end(compiled, main.__dict__, token_fd, verdict_fd)
    except SystemExit as e:  # as the interpreter maps it to an exit status
        code = e.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException as e:  # printed as the interpreter would, without this module's frames
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != path:
            tb = tb.tb_next
        sys.excepthook(type(e), e.with_traceback(tb), tb)
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
    return code & 0xFF


def report(report_fd: int, line: str) -> None:
    os.write(report_fd, line.encode("utf-8", "replace"))
    os._exit(0)  # no interpreter shutdown: it costs milliseconds and nothing needs it


def main(argv: list[str]) -> None:
    timeout_s, memory_mb, nproc = float(argv[0]), int(argv[1]), int(argv[2])
    name, report_fd, token_fd, verdict_fd = argv[3], int(argv[4]), int(argv[5]), int(argv[6])
    legacy, cgroup_procs = argv[7] == "1", argv[8]
    try:
        chunks = []
        while chunk := os.read(0, 1 << 16):
            chunks.append(chunk)
        source = b"".join(chunks)
        if cgroup_procs:
            write(cgroup_procs, str(os.getpid()))  # this launcher and all it starts: the program's whole tree
        uid, gid = os.geteuid(), os.getegid()
        check(libc.unshare(NAMESPACES), "unshare")
        write("/proc/self/setgroups", "deny")
        # a non-zero uid inside, so that execve leaves the program no capability
        write("/proc/self/uid_map", f"{uid or 1000} {uid} 1")
        write("/proc/self/gid_map", f"{gid or 1000} {gid} 1")
        status_r, status_w = os.pipe()
        life_r, life_w = os.pipe()
        child = os.fork()
    except OSError as e:
        report(report_fd, f"error {e.strerror if isinstance(e, NamespacesCapped) else e}")
    if child == 0:
        try:
            os.close(status_r)
            os.close(life_w)
            os.close(report_fd)
            path = init(source, name, legacy, status_w, life_r)
        except BaseException as e:
            os.write(status_w, f"error {e}".encode("utf-8", "replace"))
            os._exit(1)
        try:
            os.close(status_w)
            os.close(life_r)
            code = become_program(path, timeout_s, memory_mb, nproc, token_fd, verdict_fd)
        except BaseException as e:
            os.write(2, f"sandbox: cannot start the program: {e}\n".encode())
            os._exit(127)
        os._exit(code)
    os.close(status_w)
    os.close(token_fd)
    os.close(verdict_fd)
    report(report_fd, wait_for(child, timeout_s, status_r))


def wait_for(child: int, timeout_s: float, status_r: int) -> str:
    """Returns the init's report: "exit N" (N < 0: killed by signal -N), "timeout" or "error WHY"."""

    class Deadline(Exception):
        pass

    def on_alarm(signum, frame):
        raise Deadline

    signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        os.waitpid(child, 0)
        signal.setitimer(signal.ITIMER_REAL, 0)
    except Deadline:
        try:
            os.kill(child, signal.SIGKILL)  # from outside the namespace, so even its init dies
            os.waitpid(child, 0)  # returns once the whole namespace is gone
        except (ProcessLookupError, ChildProcessError):
            pass
        return "timeout"
    chunks = []
    while chunk := os.read(status_r, 4096):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace") or "error the sandbox's init died"


if __name__ == "__main__":
    main(sys.argv[1:])
