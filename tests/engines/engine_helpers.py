"""Shared by the engine tests: the demo model and a profile of it."""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "banpick_cli" / "artifacts" / "demo-moe"


def demo_profile(path: Path, *, ban: bool = True) -> Path:
    """Writes a profile of the demo model (its identity and router fingerprint) with Ban tensors."""
    from banpick_cli.models.loading import load_model
    from banpick_cli.profile.format import new_profile, write_profile

    loaded = load_model(str(DEMO), device="cpu")
    m = len(loaded.layers)
    prof = new_profile(loaded.identity, loaded.fingerprint)
    if ban:  # sensitivity spread over [0, 1] and a typical R range: every layer prunes some slots
        prof.put("ban/layer_sensitivity", torch.linspace(0.0, 1.0, m))
        prof.put("ban/ratio_min", torch.full((m,), 0.35))
        prof.put("ban/ratio_max", torch.full((m,), 0.95))
        prof.settings["ban"] = {"k_min": 2, "lambda": 0.7, "beta": 0.5}
    return write_profile(prof, path)
