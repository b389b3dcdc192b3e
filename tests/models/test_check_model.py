"""--model is checked from its config alone, before any data is fetched: one line per kind of mistake."""

from __future__ import annotations

import time

import pytest

from banpick_cli.errors import ModelError
from banpick_cli.models.loading import check_model


def test_check_model(tiny_models, tmp_path):
    resolved, config, adapter = check_model(str(tiny_models["qwen3_moe"]))
    assert config.model_type == "qwen3_moe" and resolved == str(tiny_models["qwen3_moe"])
    (tmp_path / "empty").mkdir()
    cases = [(tmp_path / "missing", "model not found"), (tmp_path / "empty", "has no config.json"),
             (tiny_models["llama"], "dense model")]
    for path, message in cases:
        start = time.perf_counter()
        with pytest.raises(ModelError, match=message) as err:
            check_model(str(path))
        assert "\n" not in str(err.value) and time.perf_counter() - start < 5
