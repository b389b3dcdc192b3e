"""Plain progress lines for logs: one every `every` seconds with done/total, rate, tokens/s and ETA."""

from __future__ import annotations

from banpick_cli.progress import PlainProgress, ProgressEvent


def test_plain_progress_prints_every_interval_and_at_the_end():
    now = [0.0]
    lines: list[str] = []
    bar = PlainProgress(lines.append, label="profile", every=30, clock=lambda: now[0])
    for done in range(0, 101):
        now[0] = done * 1.5  # 1.5 s a batch, 40 tokens a batch
        bar(ProgressEvent("math", done, 100, tokens=40 * done))
    # t=0 starts the clock; lines at t=30, 60, 90, 120 and the final batch at 150
    assert len(lines) == 5
    assert lines[0] == "profile math: 20/100 (20%), 0.67/s, 27 tok/s, elapsed 30s, eta 2m00s"
    assert lines[-1] == "profile math: 100/100 (100%), 0.67/s, 27 tok/s, elapsed 2m30s"


def test_plain_progress_tracks_tasks_apart():
    now = [0.0]
    lines: list[str] = []
    bar = PlainProgress(lines.append, every=10, clock=lambda: now[0])
    bar(ProgressEvent("layer 1", 0, 4))
    bar(ProgressEvent("layer 2", 0, 2, note="stack 2"))
    now[0] = 11.0
    bar(ProgressEvent("layer 2", 1, 2, note="stack 2"))
    bar(ProgressEvent("layer 1", 4, 4))
    assert lines == ["layer 2: 1/2 (50%), 0.09/s, elapsed 11s, eta 11s [stack 2]", "layer 1: 4/4 (100%), 0.36/s, elapsed 11s"]


def test_a_task_that_starts_over_is_timed_afresh():
    now = [0.0]
    lines: list[str] = []
    progress = PlainProgress(lines.append, label="eval", every=30.0, clock=lambda: now[0])
    for run_seconds in (1.0, 10.0):  # the same task name twice (eval generates once per method)
        progress(ProgressEvent("generate", 0, 10))
        now[0] += run_seconds
        progress(ProgressEvent("generate", 10, 10))
    assert "elapsed 1s" in lines[0] and "elapsed 10s" in lines[1] and "1.00/s" in lines[1], lines


def _wait_for(condition, seconds: float = 30.0) -> bool:
    """Polls `condition` until it holds or `seconds` pass (a bound for a loaded machine, not a timing)."""
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_timer_prints_the_last_known_state_while_no_event_comes():
    lines: list[str] = []
    with PlainProgress(lines.append, label="profile", every=0.05) as progress:
        progress(ProgressEvent("math", 3, 10, note="resumed"))  # the start: nothing printed
        progress(ProgressEvent("math", 4, 10, tokens=40))  # too soon after the start to print
        # No further event (a slow batch): the timer prints the last state, again and again.
        assert _wait_for(lambda: len(lines) >= 3), lines
        assert all(line.startswith("profile math: 4/10 (40%), ") and "elapsed" in line for line in lines), lines
        progress(ProgressEvent("math", 10, 10, tokens=400))  # finished: printed once, then the timer says nothing
        finished = len(lines)
        assert lines[-1].startswith("profile math: 10/10 (100%)")
    assert len(lines) == finished  # the thread stopped at exit


def test_the_timer_runs_only_inside_with():
    lines: list[str] = []
    progress = PlainProgress(lines.append, every=0.01)
    progress(ProgressEvent("math", 0, 10))
    import time

    time.sleep(0.1)  # an upper bound is not asserted: without the thread nothing can print
    assert lines == []
