"""Every command of README.md's bash blocks runs as written, from an empty folder, except the ones listed
in SKIPPED with why; a new README command that is neither run nor listed fails this test."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Command prefix -> why this test does not run it.
SKIPPED = {
    "make demo": "runs tools/demo.sh, which tests/package/test_demo_script.py runs",
    "make test": "the suite this test belongs to",
    "make wheel": "tests/package/test_wheel.py builds the same wheel (pip wheel --no-deps) and runs it",
    "pip install": "installs into the environment running the tests; tests/package/test_wheel.py installs the wheel",
    "P=": "the hub-model block: Qwen3-30B-A3B is a 60 GB download",
}
HUB = ("$M", "$P")  # the hub-model block's variables


def readme_commands() -> list[str]:
    """Returns the commands of README.md's ```bash blocks, comments and continuation-free lines only."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            command = line.split("  #")[0].strip()  # a comment starts after two spaces
            if command and not command.startswith("#"):
                found.append(" ".join(command.split()))
    return found


def _skip_reason(command: str) -> str | None:
    if any(var in command for var in HUB):
        return SKIPPED["P="]
    return next((why for prefix, why in SKIPPED.items() if command.startswith(prefix)), None)


def test_every_readme_command_runs_as_written(tmp_path):
    commands = readme_commands()
    run = [c for c in commands if _skip_reason(c) is None]
    assert all(c.startswith("banpick ") for c in run), [c for c in run if not c.startswith("banpick ")]
    assert len(run) >= 9  # the demo block: profile through --help
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for command in run:
        argv = [sys.executable, "-m", "banpick_cli", *shlex.split(command)[1:]]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}: {done.stderr[-1500:]}"
    made = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert made == ["bundle", "demo.safetensors", "report"], made
