"""End-to-end engine runs: only where a GPU and the engine are installed (bench/engine_e2e.py does the work)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "engine_e2e.py"


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_engine_end_to_end(engine, tiny_models, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if importlib.util.find_spec(engine) is None:
        pytest.skip(f"{engine} is not installed")
    group = "vllm.general_plugins" if engine == "vllm" else "sglang.srt.plugins"
    if not any(ep.name == "banpick" for ep in importlib.metadata.entry_points(group=group)):
        pytest.skip("banpick is not installed with its engine entry points (pip install -e . again)")
    out = tmp_path / "e2e.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--engine", engine, "--model", str(tiny_models["qwen3_moe"]),
                          "--synthetic-ban", "--prompts", "8", "--max-tokens", "16", "--max-model-len", "128",
                          "--out", str(out)], capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    configs = json.loads(out.read_text())["configs"]
    assert configs["empty"]["identical_sequences"] == "8/8"
    assert any("method=ban" in line for line in configs["ban"]["banpick_log"])


def test_bench_profiles_are_valid_for_the_model(tiny_models, tmp_path):
    """The script's CPU half: an empty profile and a synthetic Ban profile of the model, fingerprinted."""
    sys.path.insert(0, str(SCRIPT.parent))
    from engine_e2e import make_profiles

    from banpick_cli.models.loading import load_model
    from banpick_cli.profile.format import read_profile

    paths = make_profiles(str(tiny_models["olmoe"]), None, True, tmp_path)
    fingerprint = load_model(str(tiny_models["olmoe"]), device="cpu").fingerprint
    assert read_profile(paths["empty"], fingerprint=fingerprint).tensors == {}
    assert "ban/layer_sensitivity" in read_profile(paths["ban"], fingerprint=fingerprint).tensors
