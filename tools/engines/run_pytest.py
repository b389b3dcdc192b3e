"""Runs pytest inside an engine's virtualenv without installing it there: pytest's folder comes after
site-packages on sys.path, so every package the engine installed wins over pytest's own dependencies."""

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2] / ".cache" / "engines" / "pytest"))

import pytest  # noqa: E402

sys.exit(pytest.main(sys.argv[1:]))
