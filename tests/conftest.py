from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import FAMILIES, build_model  # noqa: E402
from scan_helpers import TEXTS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny random model per supported family, plus a dense llama."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: build_model(family, root / family) for family in [*FAMILIES, "llama"]}


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Torch on one thread in every test: tiny models run faster so on a shared 2-core box (OpenMP threads
    spin-wait under load), and kernels pick the same reduction order on every run."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("scan-data") / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path



@pytest.fixture(scope="session")
def profiled(tiny_models, data_file, tmp_path_factory):
    """Returns family -> a profile of the domain 'math' on the test texts (read-only: copy before use)."""
    from banpick_cli.stages.profile import ProfileSettings, run_profile

    root = tmp_path_factory.mktemp("scan-profiles")
    cache = {}

    def make(family: str):
        if family not in cache:
            out = root / f"{family}.safetensors"
            settings = ProfileSettings(domain="math", data=str(data_file), samples=len(TEXTS), seq_len=16, candidate_ratio=1.2)
            run_profile(settings, out=out, model=str(tiny_models[family]), device="cpu")
            cache[family] = out
        return cache[family]

    return make


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
