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


def duration(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class PlainProgress:
    """A progress callback for logs (no terminal): one plain line per task every `every` seconds, and when a
    task finishes: "profile math: 120/400 (30%), 2.1/s, 1,234 tok/s, elapsed 57s, eta 2m13s".

    `write` receives each line (the CLI passes stderr's writer); `clock` is injectable for tests. A 10-hour
    calibration in CI thus shows it is alive without a redrawn bar flooding the log.
    """

    def __init__(self, write: Callable[[str], None], *, label: str = "", every: float = 30.0,
                 clock: Callable[[], float] | None = None):
        import time

        self.write = write
        self.label = label
        self.every = every
        self.clock = clock or time.monotonic
        self._start: dict[str, tuple[float, int, int]] = {}  # task -> (time, done, tokens) at its first event
        self._last: dict[str, float] = {}
        self._done: dict[str, int] = {}  # task -> done at its latest event

    def __call__(self, event: ProgressEvent) -> None:
        now = self.clock()
        # A task counting from the start again (eval generates once per method) is a new run: new rates.
        if event.task not in self._start or event.done < self._done.get(event.task, 0):
            self._start[event.task] = (now, event.done, event.tokens)
            self._last[event.task] = now
            self._done[event.task] = event.done
            return
        self._done[event.task] = event.done
        finished = event.total > 0 and event.done >= event.total
        if not finished and now - self._last[event.task] < self.every:
            return
        self._last[event.task] = now
        self.write(self.line(event, now))

    def line(self, event: ProgressEvent, now: float) -> str:
        """Returns the progress line of `event` at time `now`."""
        started, done0, tokens0 = self._start[event.task]
        elapsed = now - started
        rate = (event.done - done0) / elapsed if elapsed > 0 else 0.0
        parts = [f"{event.done}/{event.total}" + (f" ({event.done / event.total:.0%})" if event.total else "")]
        if rate > 0:
            parts.append(f"{rate:,.2f}/s" if rate < 10 else f"{rate:,.0f}/s")
        if event.tokens and elapsed > 0:
            parts.append(f"{(event.tokens - tokens0) / elapsed:,.0f} tok/s")
        parts.append(f"elapsed {duration(elapsed)}")
        if event.total and event.done < event.total:
            parts.append(f"eta {duration((event.total - event.done) / rate)}" if rate > 0 else "eta ?")
        name = " ".join(x for x in (self.label, event.task) if x)
        note = f" [{event.note}]" if event.note else ""
        return f"{name}: {', '.join(parts)}{note}"
