"""Rich rendering for the CLI: progress bars, error lines, profile tables. No math here."""

from __future__ import annotations

import errno
import functools
import os
import json
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from banpick_cli.errors import EXIT_INTERRUPTED, BanpickError

# Logs and pipes (CI) get 120 columns instead of Rich's 80, so the usage tables do not wrap.
console = Console() if sys.stdout.isatty() else Console(width=120)
err_console = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=120)


def handle_errors(func: Callable) -> Callable:
    """Turns BanpickError into one line on stderr and its exit code; Ctrl-C and SIGTERM into exit 3 (a stage
    says what it saved; elsewhere nothing of the run was)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from banpick_cli.interrupts import terminate_as_interrupt

        try:
            _quiet_libraries()
            with terminate_as_interrupt():
                return func(*args, **kwargs)
        except BanpickError as err:
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted before this run saved anything; rerun the same command")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except OSError as err:
            # A safety net for writes the library did not route through outputs.py: a full disk, a quota, a
            # read-only or forbidden folder is the user's to fix, and deserves one line, not a traceback.
            if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            where = f" {err.filename}" if err.filename else ""
            err_console.print(f"[bold red]error:[/] {escape(f'cannot write{where}: {err.strerror}')}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def say(text: str) -> None:
    """Prints a summary line (Rich markup allowed) that Rich never breaks: the terminal wraps it, so a path or
    a command in it is copied whole."""
    console.print(text, soft_wrap=True, highlight=False)


def commands(lead: str, lines: list[str], *, stderr: bool = False) -> None:
    """Prints `lead`, then each command on a line of its own, indented and never wrapped: copy a line, run it."""
    out = err_console if stderr else console
    out.print(lead, soft_wrap=True, highlight=False, markup=False)
    for line in lines:
        out.print(f"  {line}", soft_wrap=True, highlight=False, markup=False)


def note(text: str) -> None:
    """Prints one "note:" line on stderr (the text verbatim: brackets in it are not Rich markup)."""
    err_console.print(f"note: {escape(text)}", highlight=False, soft_wrap=True)


def _quiet_libraries() -> None:
    """Keeps transformers/datasets from printing their own bars and warnings into our output."""
    import logging
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    for name in ("datasets", "huggingface_hub", "filelock", "fsspec"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def progress_bar(enabled: bool, description: str) -> Iterator[Callable]:
    """Yields a library progress callback: a Rich bar with tokens/s and ETA on a terminal; in a log (CI, a
    pipe) a plain line about every 30 s (BANPICK_PROGRESS_EVERY seconds) on a timer, whether or not the pass
    reported meanwhile, so a long run shows it is alive; nothing when disabled (--no-progress, --json)."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from banpick_cli.progress import PlainProgress, ProgressEvent, duration, eta

    if not enabled:
        yield lambda event: None
        return
    if not sys.stderr.isatty() and not err_console.is_terminal:
        every = float(os.environ.get("BANPICK_PROGRESS_EVERY", "30"))
        with PlainProgress(lambda line: err_console.print(line, highlight=False, soft_wrap=True),
                           label=description, every=every) as plain:
            yield plain
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[eta]}"),
    )
    with Progress(*columns, console=err_console, transient=True) as bar:
        tasks: dict[str, Any] = {}
        # Per task: (start, units done at its first event). A resumed run's first event carries the
        # resumed units, which progress.py's eta() does not count as work done at this run's rate.
        started: dict[str, tuple[float, int]] = {}

        def update(event: ProgressEvent) -> None:
            if event.task not in tasks:
                tasks[event.task] = bar.add_task(f"{description} {event.task}", total=event.total, completed=event.done,
                                                 rate="", eta="")
                started[event.task] = (time.perf_counter(), event.done)
            task_id = tasks[event.task]
            elapsed = bar.tasks[task_id].elapsed or 0.0
            rate = f"{event.tokens / elapsed:,.0f} tok/s" if event.tokens and elapsed > 0 else event.note
            start, resumed = started[event.task]
            left = eta(event.done, event.total, start, resumed=resumed)
            bar.update(task_id, completed=event.done, total=event.total, rate=rate,
                       eta="" if left is None else f"eta {duration(left)}")

        yield update


def print_estimate(est: Any) -> None:
    """Prints a --dry-run estimate (stages/estimate.py RunEstimate): counts, then per mode loads, peak memory, time."""
    cost = est.cost
    gib = lambda n: f"{n / 2**30:,.2f} GiB"  # noqa: E731
    console.print(
        f"[bold]{est.command}[/] on {est.model} ({est.dtype}, {est.device}): up to {cost.batches} batches, "
        f"{cost.tokens:,} tokens, {cost.generated_tokens} generated; {cost.variants} variants in {cost.windows} "
        f"window{'s' if cost.windows != 1 else ''}; {est.forwards:,.1f} model forwards of a batch "
        f"({cost.layer_runs:,} decoder-layer runs, {cost.head_runs:,} LM-head runs); weights {gib(cost.shape.params * cost.shape.bytes_per_param)}",
        highlight=False, soft_wrap=True,
    )
    rows = []
    for mode in est.modes:
        peak = cost.peak_bytes[mode]
        seconds = est.seconds.get(mode)
        # The process's memory: the runtime measured here and the run's own (without an accelerator, one memory).
        memory = [gib(est.runtime + peak["cpu"] + peak["device"])] if est.cpu_only else [gib(est.runtime + peak["cpu"]), gib(peak["device"])]
        rows.append([{"whole": "whole model", "sequential": "--sequential", "stream": "--stream"}[mode], cost.layer_loads[mode],
                     *memory, "-" if seconds is None else f"{seconds:,.1f}", "yes" if est.fits.get(mode) else "no"])
    free = ", ".join(f"{k} {gib(v)}" for k, v in est.available.items())
    memory_columns = ["peak memory of the process (CPU, no GPU here)"] if est.cpu_only else ["peak CPU of the process", "peak device"]
    console.print(table(f"per mode (free now: {free}); nothing was run or written",
                        ["mode", "layer loads", *memory_columns, "est. s", "fits"], rows, justify_right_from=1))
    if est.timing is not None:
        console.print(f"est. s = {est.time_basis()}", highlight=False, soft_wrap=True, markup=False)
    if "stream" in est.modes:
        console.print(f"--stream peak of the process: {gib(est.stream_cpu_peak)} = {est.stream_basis()}",
                      highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    """Writes machine-readable output to stdout (for CI jobs)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def table(title: str, columns: list[str], rows: list[list[Any]], *, justify_right_from: int = 1):
    """Returns a Rich table under its title; numeric columns (from `justify_right_from`) are right-aligned.

    The title is a line of its own above the table, not the table's caption: a caption wraps at the table's
    width, so a long title over narrow columns broke mid-phrase."""
    from rich.console import Group
    from rich.text import Text

    out = Table(header_style="bold")
    for i, name in enumerate(columns):
        out.add_column(name, justify="right" if i >= justify_right_from else "left")
    for row in rows:
        out.add_row(*[str(cell) for cell in row])
    return Group(Text(title, style="italic"), out)
