"""What every stage shares: provenance records and opening the profile a stage updates."""

from __future__ import annotations

import shlex
import sys
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from banpick_cli.errors import BadSetting, ProfileError
from banpick_cli.routing import BETA, K_MIN, LAM, check_ban_params
from banpick_cli.models.loading import LoadedModel
from banpick_cli.profile.format import RoutingProfile, check_fingerprint, new_profile, read_metadata, read_profile


def check_ban_knobs(*, k_min: int = K_MIN, lam: float = LAM, beta: float = BETA, k_base: int | None = None) -> None:
    """Raises a one-line BadSetting unless Ban's knobs pass the routing core's own rule, the one check every
    command uses (K_min an integer in [1, K_base], lambda finite and >= 0, beta in [0, 1]). Without k_base
    (before the model is known) K_min is only checked to be >= 1."""
    upper = k_base if k_base is not None else (k_min if isinstance(k_min, int) and k_min >= 1 else 1)
    try:
        check_ban_params(k_base=upper, k_min=k_min, lam=lam, beta=beta)
    except ValueError as err:
        raise BadSetting(f"Ban setting: {err} (flags --k-min, --lambda, --beta)") from None


def command_line() -> str:
    """Returns the command line of this process, quoted so it can be pasted back."""
    return " ".join(shlex.quote(arg) for arg in [Path(sys.argv[0]).name, *sys.argv[1:]])


def provenance(stage: str, settings: Any, loaded: LoadedModel, **facts: Any) -> dict[str, Any]:
    """Returns the provenance record a stage stores: its settings, the run's facts, and when/how."""
    record: dict[str, Any] = {
        "stage": stage,
        "settings": asdict(settings) if is_dataclass(settings) else dict(settings),
        "device": str(loaded.device),
        "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
        "command": command_line(),
        "finished_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    record.update(facts)
    return record


def open_for_update(path: str | Path, loaded: LoadedModel) -> RoutingProfile:
    """Returns the profile at `path` for this model, or a new one when the file does not exist.

    An existing file that is not a profile, or a profile of another model, is refused rather than
    overwritten.
    """
    target = Path(path)
    if not target.exists():
        return new_profile(loaded.identity, loaded.fingerprint)
    if target.is_dir():
        raise ProfileError(f"{target} is a directory; give a profile file path")
    read_metadata(target)
    profile = read_profile(target)
    check_fingerprint(profile, loaded.fingerprint, path=target)
    return profile
