"""The one progress channel from the library to whoever renders it (the CLI, or nothing)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a long task: `done` of `total` units, plus tokens processed so far."""

    task: str
    done: int
    total: int
    tokens: int = 0
    note: str = ""


class ProgressCallback(Protocol):
    def __call__(self, event: ProgressEvent) -> None: ...


def silent(event: ProgressEvent) -> None:
    """A callback that drops every event (library default)."""


ProgressFn = Callable[[ProgressEvent], None]
