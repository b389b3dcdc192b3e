"""The memory cgroup of one sandboxed program (tasks/sandbox.py): made, capped and removed by the host.

A new cgroup under this process's own memory cgroup caps the program's whole tree of processes at
`memory_mb` (cgroup v1's memory hierarchy, or a cgroup v2 with the memory controller delegated); where this
process may not make one (an unprivileged user, a read-only /sys/fs/cgroup, no memory controller) there is
none, and the sandbox's rlimits bound memory instead.
"""

from __future__ import annotations

import os
import secrets
import threading

_cgroup_root: list[str | None] = []  # [] until probed, then [the folder new cgroups go in, or None]
_cgroup_lock = threading.Lock()
_CGROUP_V1, _CGROUP_V2 = "/sys/fs/cgroup/memory", "/sys/fs/cgroup"


def cgroup_parent() -> str | None:
    """Returns the folder new cgroups go in, or None where this process may not make one; probed once per process."""
    with _cgroup_lock:
        if not _cgroup_root:
            _cgroup_root.append(_cgroup_parent())
    return _cgroup_root[0]


def memory_cgroup(memory_mb: int) -> str | None:
    """Returns a new memory cgroup capped at `memory_mb` for one program's whole tree, or None where this
    process may not make one (an unprivileged user, a read-only /sys/fs/cgroup, no memory controller)."""
    parent = cgroup_parent()
    if parent is None:
        return None
    path = os.path.join(parent, "banpick-sandbox-" + secrets.token_hex(6))
    try:
        os.mkdir(path)
    except OSError:
        return None
    limit = str(int(memory_mb) << 20)
    try:
        if os.path.exists(os.path.join(path, "memory.limit_in_bytes")):  # cgroup v1
            _write(os.path.join(path, "memory.limit_in_bytes"), limit)
            if os.path.exists(os.path.join(path, "memory.memsw.limit_in_bytes")):  # no swapping out of the cap
                _write(os.path.join(path, "memory.memsw.limit_in_bytes"), limit)
        else:
            _write(os.path.join(path, "memory.max"), limit)
            _write(os.path.join(path, "memory.swap.max"), "0")
    except OSError:
        remove_cgroup(path)
        return None
    return path


def _cgroup_parent() -> str | None:
    # This process's own memory cgroup: v1's memory hierarchy, else the unified one where memory is enabled.
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    for _, controllers, rel in lines:
        if "memory" in controllers.split(",") and os.path.isdir(_CGROUP_V1):
            return _usable(os.path.join(_CGROUP_V1, rel.lstrip("/")))
    for hierarchy, controllers, rel in lines:
        if hierarchy == "0" and not controllers:
            base = os.path.join(_CGROUP_V2, rel.lstrip("/"))
            try:
                with open(os.path.join(base, "cgroup.subtree_control")) as f:
                    enabled = "memory" in f.read().split()
            except OSError:
                return None
            return _usable(base) if enabled else None
    return None


def _usable(parent: str) -> str | None:
    return parent if os.path.isdir(parent) and os.access(parent, os.W_OK) else None


def remove_cgroup(path: str) -> bool:
    """Removes a program's cgroup once its processes are gone; returns whether the kernel killed one of them
    for memory."""
    killed = False
    for events in ("memory.oom_control", "memory.events"):
        try:
            with open(os.path.join(path, events)) as f:
                killed = killed or any(line.split()[:1] == ["oom_kill"] and line.split()[1] != "0" for line in f)
        except (OSError, IndexError):
            pass
    for _ in range(50):  # the last tasks may take a moment to leave once the namespace is gone
        try:
            os.rmdir(path)
            break
        except FileNotFoundError:
            break
        except OSError:
            threading.Event().wait(0.01)
    return killed


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)

