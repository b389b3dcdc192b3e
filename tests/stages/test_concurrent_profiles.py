"""Two `banpick profile` runs for different domains into one --out, overlapping in time: both domains land
(each run re-reads the profile under a lock beside it and adds its own domain before writing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


from banpick_cli.profile import read_profile

REPO = Path(__file__).resolve().parents[2]


def _slow_profile(model: Path, calib: Path, out: Path, domain: str) -> subprocess.Popen:
    code = (
        "import sys, time\n"
        "import banpick_cli.passes.usage_pass as up\n"
        "make = up._batch\n"
        "up._batch = lambda *a, **k: (time.sleep(0.3), make(*a, **k))[1]\n"
        "from banpick_cli.cli.app import main\n"
        f"sys.argv = ['banpick', 'profile', '--model', {str(model)!r}, '--domain', {domain!r}, '--data', {str(calib)!r},\n"
        "            '--samples', '8', '--seq-len', '16', '--batch-size', '2', '--device', 'cpu',\n"
        f"            '--out', {str(out)!r}, '--no-progress']\n"
        "main()\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_two_domains_into_one_profile_both_land(tiny_models, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": f"problem {i}: {i} + {i} = {2 * i}"}) + "\n" for i in range(8)))
    out = tmp_path / "p.safetensors"
    runs = [_slow_profile(tiny_models["qwen3_moe"], calib, out, d) for d in ("math", "code")]
    for run in runs:
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
    assert read_profile(out).domains() == ["code", "math"]
