"""banpick's wheel: one version, the demo model and its data inside, `--model demo` from any folder.

The wheel is built the way `make wheel` builds it (pip wheel --no-deps; here without build isolation, so no
index is needed), from a copy of the tree so the build leaves nothing in the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from banpick_cli import __version__
from banpick_cli.paths import DEMO_DATA_DIR, DEMO_MODEL_DIR

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json", "README.md", "train_report.json")
DEMO_DATA_FILES = tuple(f"{d}/{f}" for d in ("math", "code", "general") for f in ("calib.jsonl", "tasks.jsonl"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "banpick_cli", src / "banpick_cli", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "--disable-pip-version-check", "--wheel-dir", str(root / "dist"), str(src)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    built = sorted((root / "dist").iterdir())
    assert [p.name for p in built] == [f"banpick-{__version__}-py3-none-any.whl"]  # the version is __version__
    return built[0]


def test_the_wheel_carries_the_demo_model_and_its_data(wheel):
    with zipfile.ZipFile(wheel) as zf:
        sizes = {info.filename: info.file_size for info in zf.infolist()}
    for name in DEMO_MODEL_FILES:
        packed = f"banpick_cli/artifacts/demo-moe/{name}"
        assert sizes.get(packed) == (DEMO_MODEL_DIR / name).stat().st_size, packed
    for name in DEMO_DATA_FILES:
        packed = f"banpick_cli/artifacts/data/{name}"
        assert sizes.get(packed) == (DEMO_DATA_DIR / name).stat().st_size, packed
    assert "banpick_cli/data/domains/math.toml" in sizes
    # Nothing of the checkout but the package: no tests, tools or bench in site-packages.
    assert {name.split("/")[0] for name in sizes} == {"banpick_cli", f"banpick-{__version__}.dist-info"}


def test_the_installed_wheel_runs_the_demo_model_from_an_empty_folder(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:  # a pure-Python wheel installs as its unpacked files
        zf.extractall(site)
    here = tmp_path / "empty"
    here.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import banpick_cli.paths as p; print(p.DEMO_MODEL_DIR)"],
                           cwd=here, env=env, capture_output=True, text=True)
    assert Path(where.stdout.strip()) == site / "banpick_cli" / "artifacts" / "demo-moe", where.stderr
    run = subprocess.run([sys.executable, "-m", "banpick_cli", "profile", "--model", "demo", "--domain", "math",
                          "--samples", "8", "--seq-len", "32", "--out", "demo.safetensors", "--no-progress", "--json"],
                         cwd=here, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (here / "demo.safetensors").is_file()
    assert '"samples": 8' in run.stdout
