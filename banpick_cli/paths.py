"""Where the shipped demo model and its data live: inside the package (package data), so `--model demo` and
`--data embedded` work from any folder after any install (a wheel, an editable install, a checkout)."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# The repository root in a checkout (the folder above the package); in an installed wheel, site-packages.
REPO_ROOT = PACKAGE_DIR.parent
ARTIFACTS = PACKAGE_DIR / "artifacts"
DEMO_MODEL_DIR = ARTIFACTS / "demo-moe"
DEMO_DATA_DIR = ARTIFACTS / "data"
# `--model demo` (the default of every command) means the shipped model.
DEMO_MODEL_NAME = "demo"
