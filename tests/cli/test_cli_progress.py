"""Progress in a log (stderr not a terminal): lines arrive on a timer while a window runs, through the real CLI."""

from __future__ import annotations

import time

from typer.testing import CliRunner

from banpick_cli.cli.app import app
from banpick_cli.passes import usage_pass
from banpick_cli.progress import PlainProgress

runner = CliRunner()


def test_profile_prints_progress_lines_during_one_window(tiny_models, data_file, tmp_path, monkeypatch):
    # One window of 5 batches (--checkpoint-every 0): the pass used to report only when a window ended, so a
    # long run printed nothing for its whole window (340 s on a real model). Each batch here waits until the
    # log shows the state before it, so every state must be printed while the window runs.
    printed: list[str] = []
    line = PlainProgress.line
    monkeypatch.setattr(PlainProgress, "line", lambda self, event, now: printed.append(line(self, event, now)) or printed[-1])
    waited_out = []
    real_batch = usage_pass._batch

    def slow_batch(loaded, texts, index, **kwargs):
        deadline = time.monotonic() + 10  # a bound for a loaded machine; the timer prints within ~0.05 s
        while not any(f": {index}/5 (" in text for text in printed):
            if time.monotonic() > deadline:
                waited_out.append(index)
                break
            time.sleep(0.01)
        return real_batch(loaded, texts, index, **kwargs)

    monkeypatch.setattr(usage_pass, "_batch", slow_batch)
    monkeypatch.setenv("BANPICK_PROGRESS_EVERY", "0.05")
    out = tmp_path / "p.safetensors"
    result = runner.invoke(app, [str(a) for a in ("profile", "--model", tiny_models["qwen3_moe"], "--domain", "math",
                                                  "--data", data_file, "--samples", 5, "--seq-len", 8, "--batch-size", 1,
                                                  "--checkpoint-every", 0, "--device", "cpu", "--out", out)])
    assert result.exit_code == 0, result.output
    assert waited_out == []
    for done in range(5):  # every state of the window reached the log (stderr), before the next batch ran
        assert f"profile: {done}/5 ({done * 20}%)" in result.stderr, result.stderr
    assert "profile: 5/5 (100%)" in result.stderr
