"""One rule per kind of setting, shared by every command's settings: each failure is one BadSetting line
that names the flag and the value."""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

from banpick_cli.errors import BadSetting

# A domain's name as a profile stores it (`domain/<name>/...`) and as every command accepts it.
DOMAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def number(flag: str, value: Any, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    """Raises unless `value` is a finite number (an integer when `integer`) within the given bounds."""
    is_number = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not is_number or not math.isfinite(value):
        raise BadSetting(f"{flag} must be {'an integer' if integer else 'a finite number'}, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        if low is not None and high is not None:
            where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            where = f"{'>' if low_open else '>='} {low:g}"
        else:
            where = f"{'<' if high_open else '<='} {high:g}"
        raise BadSetting(f"{flag} must be {where}, got {value!r}")


def at_least(checks: Iterable[tuple[str, Any, float]], *, integer: bool = True) -> None:
    """Raises for the first (flag, value, lowest) whose value is below its lowest (or not a number)."""
    for flag, value, low in checks:
        number(flag, value, low=low, integer=integer)


def one_of(flag: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise BadSetting(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def domain_name(value: Any, flag: str = "--domain") -> str:
    """Returns a valid domain name, or raises: letters, digits, '_', '-' or '.'."""
    if not isinstance(value, str) or not DOMAIN_NAME.fullmatch(value):
        raise BadSetting(f"{flag} must be a name of letters, digits, '_', '-' or '.', got {value!r}")
    return value


def expert_choice(flag: str, value: Any) -> str:
    """Returns a valid choice of experts to scan or probe: 'mask' (the profile's candidates), 'all', or 'top-N'."""
    if value not in ("mask", "all") and not (isinstance(value, str) and re.fullmatch(r"top-[1-9][0-9]*", value)):
        raise BadSetting(f"{flag} must be 'mask', 'all' or 'top-N' (N >= 1), got {value!r}")
    return value


def file_problem(path: Any) -> str | None:
    """Returns what keeps `path` from being read as a regular file ("not found", "is a folder", "is not a
    regular file (a FIFO)", "is a symlink loop", ...), or None when it is one."""
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        import errno

        if err.errno == errno.ELOOP:
            return "is a symlink loop"
        if os.path.islink(path):
            return "is a symlink to nothing (its target does not exist)"
        if err.errno in (errno.EACCES, errno.EPERM):
            return "cannot be read (permission denied)"
        return "not found"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    kind = next((name for test, name in kinds if test(mode)), "not a file")
    return f"is not a regular file ({kind})"


def missing_file(what: str, path: Any) -> str:
    """Returns the one-line reason a `what` ("data file", "profile") at `path` cannot be read, or "" when it
    is a regular file: "<what> not found: <path>" or "<what> <path> is a folder, not a file"."""
    problem = file_problem(path)
    if problem is None:
        return ""
    return f"{what} not found: {path}" if problem == "not found" else f"{what} {path} {problem}"
