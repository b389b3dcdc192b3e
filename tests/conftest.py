from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import FAMILIES, build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny random model per supported family, plus a dense llama."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: build_model(family, root / family) for family in [*FAMILIES, "llama"]}


@pytest.fixture(autouse=True)
def _leaves_no_files_in_tree():
    """Fails a test that creates files in the working tree (tests write under tmp_path only).

    Set BANPICK_SHARED_TREE=1 while other people edit the same checkout during a run.
    """
    if os.environ.get("BANPICK_SHARED_TREE") == "1":
        yield
        return
    before = _untracked()
    yield
    after = _untracked()
    new = sorted(after - before)
    assert not new, f"test left files in the working tree: {new[:5]}"


def _untracked() -> set[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--ignored=no"], cwd=REPO,
                         capture_output=True, text=True).stdout
    return {line[3:] for line in out.splitlines() if line.startswith("??")}
