"""Errors a user can cause. Each carries a one-line message; the CLI maps them to exit codes."""

from __future__ import annotations

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 3


class BanpickError(Exception):
    """Base class: a problem with the user's input, not a bug. `str(err)` is one line."""

    exit_code = EXIT_USER_ERROR


class BadSetting(BanpickError):
    """A flag or config value is out of range or of the wrong type."""


class ModelError(BanpickError):
    """The model cannot be found, loaded, or is not a supported MoE architecture."""


class UnsupportedArchitecture(ModelError):
    """No adapter is registered for this model family."""


class DataError(BanpickError):
    """Calibration or task data is missing, empty or unreadable."""


class ProfileError(BanpickError):
    """A routing profile is missing, corrupt, of a newer schema, or lacks what a stage needs."""


class FingerprintMismatch(ProfileError):
    """The profile was made for another checkpoint."""


class OutputError(BanpickError):
    """An output cannot be written: its folder is missing or read-only, the disk is full, or it is an input."""


class Interrupted(BanpickError):
    """A stage stopped early; what finished is saved and a rerun resumes."""

    exit_code = EXIT_INTERRUPTED


class SandboxUnavailable(BanpickError):
    """The system refuses the namespaces that isolate model-written code, and unsafe runs were not allowed."""


class MissingExtra(BanpickError):
    """An optional dependency is not installed; the message names the pip install that adds it."""


def import_extra(module: str, extra: str, purpose: str):
    """Returns the imported module, or raises MissingExtra naming `pip install 'banpick[<extra>]'`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{purpose} needs the '{module.split('.')[0]}' package: pip install 'banpick[{extra}]'") from None
