"""The batch-aware step's candidate bound, calibrated on calibration logits, and where the profile keeps it."""

from __future__ import annotations

import pytest
import torch

from banpick_cli.errors import BadSetting
from banpick_cli.profile.format import new_profile, read_profile, write_profile
from banpick_cli.profile.identity import ModelIdentity
from banpick_cli.routing import RouterSpec, batch_share, distinct_experts, route
from banpick_cli.evaluation.batch_calib import calibrate_candidates
from banpick_cli.evaluation.budget import CalibrationLogits

SPEC = RouterSpec(64, 8, "softmax", True)


def sample(tokens=256, layers=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return CalibrationLogits(tuple(torch.randn(tokens, 64, generator=gen) * 1.5 for _ in range(layers)), "random")


def test_the_narrowest_bound_with_most_of_the_widest_reduction():
    calib = calibrate_candidates([SPEC, SPEC], sample(), batch_size=16, batches=4)
    assert sorted(calib.distinct) == list(range(8, 17))  # K_base .. 2 K_base
    gains = {n: calib.plain - d for n, d in calib.distinct.items()}
    best = max(gains.values())
    assert best > 0
    assert gains[calib.candidates] >= 0.9 * best
    assert all(gains[n] < 0.9 * best for n in gains if n < calib.candidates)
    assert calibrate_candidates([SPEC, SPEC], sample(), batch_size=16, batches=4) == calib  # seeded
    # the numbers are the routing core's: the first draw of layer 0, recomputed
    gen = torch.Generator().manual_seed(0)
    rows = torch.randperm(256, generator=gen)[:16]
    x = sample().logits[0][rows]
    one = calibrate_candidates([SPEC], CalibrationLogits((sample().logits[0],)), batch_size=16, batches=1)
    assert one.plain == float(distinct_experts(route(x, SPEC), 64))
    assert one.distinct[12] == float(distinct_experts(batch_share(x, SPEC, route(x, SPEC), candidates=12), 64))


def test_a_batch_that_cannot_share_gets_the_narrowest_bound():
    same = torch.randn(1, 64).expand(64, 64).contiguous()  # every token alike: nothing to move onto
    calib = calibrate_candidates([SPEC], CalibrationLogits((same,)), batch_size=8, batches=2)
    assert calib.candidates == 8 and calib.plain == 8.0 and set(calib.distinct.values()) == {8.0}


def test_refusals_are_one_line():
    with pytest.raises(BadSetting, match="batch size must be an integer >= 2"):
        calibrate_candidates([SPEC], sample(layers=1), batch_size=1)
    with pytest.raises(BadSetting, match="at least 16 calibration tokens, got 8"):
        calibrate_candidates([SPEC], sample(tokens=8, layers=1), batch_size=16)
    with pytest.raises(BadSetting, match="cover 2 MoE layers; the model has 1"):
        calibrate_candidates([SPEC], sample(), batch_size=16)


def test_the_profile_keeps_the_setting(tmp_path):
    ident = ModelIdentity(name_or_path="x", architecture="Qwen3MoeForCausalLM", model_type="qwen3_moe", num_layers=2,
                          moe_layers=(0, 1), vocab_size=100, router=SPEC)
    prof = new_profile(ident, "sha256:" + "0" * 64)
    assert prof.batch.candidates is None and prof.batch.settings == {}
    calib = calibrate_candidates([SPEC, SPEC], sample(), batch_size=16, batches=2)
    prof.batch.set_settings(calib.to_settings())
    write_profile(prof, tmp_path / "p.safetensors")
    back = read_profile(tmp_path / "p.safetensors")
    assert back.batch.candidates == calib.candidates
    assert back.batch.settings["batch_size"] == 16 and back.batch.settings["anchor"] == 1
