"""The shipped demo model shows the paper's routing phenomena, measured with banpick's own stages.

The model card's "Routing phenomena" section quotes larger runs of the same stages (`make demo`);
these run on fewer texts so they take seconds, with thresholds the card's numbers clear by a margin.
"""

from __future__ import annotations

import pytest
import torch

from banpick_cli.stages.kl_scan import KLScanSettings, run_kl_scan
from banpick_cli.stages.layer_sensitivity import LayerSensitivitySettings, run_layer_sensitivity
from banpick_cli.stages.profile import ProfileSettings, run_profile
from banpick_cli.models.loading import load_model


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo-routing") / "p.safetensors"
    loaded = load_model("demo", device="cpu", dtype="float32")
    run_profile(ProfileSettings(domain="math", samples=128, seq_len=128), out=path, loaded=loaded)
    kl = run_kl_scan(KLScanSettings(domain="math", samples=32, seq_len=96), profile=path, loaded=loaded)
    layers = run_layer_sensitivity(LayerSensitivitySettings(domain="math", samples=32, seq_len=96), profile=path, loaded=loaded)
    return kl, layers


def test_pruning_the_top_kl_expert_moves_the_output_10x_more_than_the_median_candidate(scanned):
    kl = scanned[0].kl
    values = kl[~kl.isnan()]
    assert len(values) >= 5
    assert values.max() >= 10 * values.median()


def test_layer_sensitivity_spreads_at_least_3x(scanned):
    w = scanned[1].profile.ban.layer_kl
    assert torch.all(w > 0) and w.max() >= 3 * w.min()
