"""`make demo`'s first screen (tools/demo.sh): every command it prints is the command it ran, and each ran
(the script stops at the first failure); the screen names each idea once and its counts agree with its rows.

The demo is run for real on the shipped demo model (about a minute and a half on 2 cores) through a `banpick`
that records each call, so "printed" and "ran" are compared word for word.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    log = root / "calls.log"
    banpick = root / "banpick"
    banpick.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {shlex.quote(str(log))}\n'
                       f'exec {shlex.quote(sys.executable)} -m banpick_cli "$@"\n')
    banpick.chmod(0o755)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(["bash", str(REPO / "tools" / "demo.sh"), str(banpick), str(root / "out")], cwd=root,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr, log.read_text().splitlines(), banpick


def test_every_printed_command_is_the_one_that_ran(demo):
    screen, calls, banpick = demo
    printed = [line[2:] for line in screen.splitlines() if line.startswith("$ ")]
    assert len(printed) == len(calls) == 10
    for line, call in zip(printed, calls):
        argv = shlex.split(line)
        assert argv[0] == str(banpick) and argv[1:] == call.split(), (line, call)
    failure_probe = [shlex.split(line) for line in printed if " failure-probe " in line][0]
    assert "--domain" in failure_probe and "--task" in failure_probe


def test_the_first_screen_names_each_idea_once_and_counts_agree(demo):
    screen, _, _ = demo
    # kl-scan proposes high-KL candidates; only failure-probe's choice is called key experts.
    kl_section = screen.split("== kl-scan")[1].split("== layer-sensitivity")[0]
    assert "key expert" not in kl_section.replace("chooses the key experts", "")
    title = re.search(r"kl-scan 'math': (\d+) candidates by the KL .*?; the top (\d+) shown", kl_section)
    rows = re.findall(r"^│ \d+\s+│ L\dE\d+", kl_section, flags=re.M)
    assert title and int(title.group(2)) == len(rows) == 8 and int(title.group(1)) > len(rows)
    assert re.search(rf"KL of {title.group(1)} candidates in \d layers", kl_section)
    # One progress line per method row, each naming it and the task set.
    progress = re.findall(r"^eval (\S+) on math: 75/75", screen, flags=re.M)
    assert len(progress) == len(set(progress)) == 7 and progress[0] == "baseline"
    # The 64-wide demo experts: no speed column, one line saying why.
    header = [line for line in screen.splitlines() if "Avg-TopK" in line][0]
    assert "speed" not in header and "tok/s" not in header
    assert "speed: not shown: this model's experts are 64 wide" in screen
    # export says why its experts/token differs from eval's budget; inspect says which stage found what.
    assert "eval --target-avg-topk solves its own lambda" in screen
    found = screen.split("what each stage found")[1]
    for stage in ("profile", "kl-scan", "failure-probe", "Pick reads"):
        assert re.search(rf"^│ {stage}\s+│", found, flags=re.M), stage
