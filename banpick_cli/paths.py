"""Where the project's shipped artifacts live (the embedded demo model and data)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "artifacts"
DEMO_MODEL_DIR = ARTIFACTS / "demo-moe"
DEMO_DATA_DIR = ARTIFACTS / "data"
# `--model demo` (the default of every command) means the shipped model.
DEMO_MODEL_NAME = "demo"
