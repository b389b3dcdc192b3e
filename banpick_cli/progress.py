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


def eta(done: int, total: int, started: float, resumed: int = 0, now: float | None = None) -> float | None:
    """Returns the seconds left, from the speed of the work this process did (not what it resumed); None before
    any fresh work is done. `started` and `now` are time.perf_counter() values."""
    import time

    now = time.perf_counter() if now is None else now
    fresh = done - resumed
    if fresh <= 0 or now <= started:
        return None
    return (total - done) * (now - started) / fresh


class PlainProgress:
    """A progress callback for logs (no terminal): one plain line per task every `every` seconds, and when a
    task finishes: "profile math: 120/400 (30%), 2.1/s, 1,234 tok/s, elapsed 57s, eta 2m13s".

    Events print at most every `every` seconds per task. Used as a context manager it also runs a timer
    thread that, every `every` seconds, prints each unfinished task's last known state at the current time
    when nothing printed it meanwhile: a pass that reports rarely (a long window, one slow batch) still shows
    it is alive and how long it has run. `write` receives each line (the CLI passes stderr's writer); `clock`
    is injectable for tests (the timer thread runs only inside `with`).
    """

    def __init__(self, write: Callable[[str], None], *, label: str = "", every: float = 30.0,
                 clock: Callable[[], float] | None = None):
        import threading
        import time

        self.write = write
        self.label = label
        self.every = every
        self.clock = clock or time.monotonic
        self._start: dict[str, tuple[float, int, int]] = {}  # task -> (time, done, tokens) at its first event
        self._last: dict[str, float] = {}  # task -> when a line of it was last printed (or it started)
        self._event: dict[str, ProgressEvent] = {}  # task -> its latest event
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None

    def __call__(self, event: ProgressEvent) -> None:
        with self._lock:
            now = self.clock()
            last = self._event.get(event.task)
            # A task counting from the start again (eval generates once per method) is a new run: new rates.
            if last is None or event.done < last.done:
                self._start[event.task] = (now, event.done, event.tokens)
                self._last[event.task] = now
                self._event[event.task] = event
                return
            self._event[event.task] = event
            finished = event.total > 0 and event.done >= event.total
            if not finished and now - self._last[event.task] < self.every:
                return
            self._last[event.task] = now
            self.write(self.line(event, now))

    def beat(self) -> None:
        """Prints the last known state of each unfinished task that printed nothing for `every` seconds."""
        with self._lock:
            now = self.clock()
            for task, event in self._event.items():
                if event.total > 0 and event.done >= event.total:
                    continue
                if now - self._last[task] >= self.every:
                    self._last[task] = now
                    self.write(self.line(event, now))

    def __enter__(self) -> "PlainProgress":
        import threading

        def run() -> None:
            while not self._stop.wait(self.every):
                self.beat()

        self._stop.clear()
        self._timer = threading.Thread(target=run, name="banpick-progress", daemon=True)
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.join()
            self._timer = None

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
        name = " ".join(dict.fromkeys(x for x in (self.label, event.task) if x))  # "profile", not "profile profile"
        note = f" [{event.note}]" if event.note else ""
        return f"{name}: {', '.join(parts)}{note}"
