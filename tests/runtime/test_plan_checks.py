"""Ban's knobs pass the routing core's one rule against the model's K_base wherever a plan is built
(eval, export for every target, the HF runtime), whether they come from flags or from the profile."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthetic import synthetic_profile  # noqa: E402

from banpick_cli.errors import BadSetting  # noqa: E402
from banpick_cli.profile import write_profile  # noqa: E402
from banpick_cli.runtime import build_plan  # noqa: E402
from banpick_cli.export.writer import export_bundle  # noqa: E402


@pytest.mark.parametrize("override, message", [({"lam": math.inf}, "finite"), ({"lam": math.nan}, "finite"),
                                               ({"k_min": 20}, r"k_min must be an integer in \[1, k_base=8\], got 20"),
                                               ({"k_min": 0}, "k_min"), ({"beta": 2.0}, "beta")])
def test_bad_ban_knobs_are_refused_everywhere(tmp_path, override, message):
    prof = synthetic_profile()
    specs = prof.model.router_specs()
    for method, domain in (("ban", None), ("banpick", "math")):
        with pytest.raises(BadSetting, match=message):
            build_plan(prof, specs, method, domain, **override)
    path = write_profile(prof, tmp_path / "p.safetensors")
    for target in ("vllm", "sglang", "hf"):
        with pytest.raises(BadSetting, match=message):
            export_bundle(path, target, tmp_path / target, method="ban", overrides=override)
        assert not (tmp_path / target).exists()


def test_a_stored_infinite_lambda_is_refused_not_dropped(tmp_path):
    prof = synthetic_profile()
    prof.ban.set_settings({**prof.ban.settings, "lam": math.inf})
    with pytest.raises(BadSetting, match="finite"):
        build_plan(prof, prof.model.router_specs(), "ban", None)
