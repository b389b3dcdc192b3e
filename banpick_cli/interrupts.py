"""Ctrl-C and SIGTERM, one way everywhere: both raise KeyboardInterrupt inside `terminate_as_interrupt`.

The CLI wraps every command in it (`cli/render.handle_errors`); a stage turns the interrupt into
`Interrupted` saying exactly what was saved (`stages/common.lifecycle`); anything else is reported as
"nothing of this run was saved". Exit code 3 in every case.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (a scheduler's or `kill`'s stop) raises KeyboardInterrupt like Ctrl-C.

    Nested blocks keep the outer handler's behaviour; outside the main thread (where signals cannot be
    handled) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
