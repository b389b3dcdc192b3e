"""`banpick profile`: count expert usage on a domain's calibration text and mark its candidates."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from banpick_cli.calibrate.common import open_for_update, provenance
from banpick_cli.calibrate.usage import UsageCounts, count_usage
from banpick_cli.data import CalibrationText, Domain, get_domain, load_calibration_text
from banpick_cli.errors import BadSetting
from banpick_cli.models.loading import LoadedModel, load_model
from banpick_cli.paths import DEMO_MODEL_NAME
from banpick_cli.profile.format import RoutingProfile, ensure_writable, write_profile
from banpick_cli.profile.stats import CandidateRule, candidate_mask
from banpick_cli.progress import ProgressFn, silent

# Stage results computed from a domain's usage; stale once its counts change.
DEPENDENT_ON_USAGE = ("kl", "accuracy_gain", "key_experts")


@dataclass(frozen=True)
class ProfileSettings:
    """Settings of one `profile` run; recorded verbatim in the profile's provenance."""

    domain: str
    data: str | None = None
    text_field: str | None = None
    samples: int = 256
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    candidate_ratio: float = 2.0
    candidate_top: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise BadSetting(f"--samples must be >= 1, got {self.samples}")
        if self.seq_len < 2:
            raise BadSetting(f"--seq-len must be >= 2, got {self.seq_len}")
        if self.batch_size < 1:
            raise BadSetting(f"--batch-size must be >= 1, got {self.batch_size}")
        self.rule  # validates the candidate knobs

    @property
    def rule(self) -> CandidateRule:
        return CandidateRule(self.candidate_ratio, self.candidate_top)


@dataclass
class ProfileResult:
    """What a `profile` run produced: the updated profile, its counts, and how fast it ran."""

    profile: RoutingProfile
    path: Path
    domain: str
    usage: UsageCounts
    wall_s: float
    dropped: list[str]

    @property
    def tokens_per_s(self) -> float:
        return self.usage.tokens / self.wall_s if self.wall_s > 0 else 0.0


def load_domain_text(settings: ProfileSettings, *, model: str) -> tuple[Domain, CalibrationText]:
    """Returns the domain and its calibration text (the demo model defaults to the embedded data)."""
    domain = get_domain(settings.domain)
    text = load_calibration_text(
        domain,
        settings.data,
        samples=settings.samples,
        seed=settings.seed,
        text_field=settings.text_field,
        use_embedded=model == DEMO_MODEL_NAME,
    )
    return domain, text


def profile_domain(
    loaded: LoadedModel,
    settings: ProfileSettings,
    profile: RoutingProfile,
    domain: Domain,
    text: CalibrationText,
    *,
    progress: ProgressFn = silent,
) -> tuple[UsageCounts, float, list[str]]:
    """Counts usage for one domain and stores it in `profile`; returns (counts, wall seconds, dropped tensors)."""
    start = time.perf_counter()
    usage = count_usage(loaded, text.texts, seq_len=settings.seq_len, batch_size=settings.batch_size, progress=progress)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    name = domain.name
    dropped = [f"domain/{name}/{part}" for part in DEPENDENT_ON_USAGE if f"domain/{name}/{part}" in profile.tensors]
    for key in dropped:
        del profile.tensors[key]
    profile.put(f"domain/{name}/expert_counts", usage.expert_counts)
    profile.put(f"domain/{name}/token_counts", usage.token_counts)
    profile.put(f"domain/{name}/candidates", candidate_mask(usage.expert_counts, usage.token_counts, settings.rule))
    profile.settings[f"domain/{name}"] = {"candidates": settings.rule.to_dict()}
    profile.provenance[f"profile/{name}"] = provenance(
        "profile",
        settings,
        loaded,
        dataset=text.source,
        split=text.split,
        samples=usage.samples,
        tokens=usage.tokens,
        seq_len=settings.seq_len,
        seed=settings.seed,
        wall_s=round(wall, 3),
    )
    return usage, wall, dropped


def run_profile(
    settings: ProfileSettings,
    *,
    out: str | Path,
    model: str = DEMO_MODEL_NAME,
    device: str = "auto",
    dtype: str = "auto",
    loaded: LoadedModel | None = None,
    progress: ProgressFn = silent,
) -> ProfileResult:
    """Loads the model, profiles one domain, and writes (or updates) the profile at `out` atomically.

    Everything that can fail on bad input (output path, domain, data) is checked before the model loads.
    """
    out = Path(out)
    ensure_writable(out)
    domain, text = load_domain_text(settings, model=loaded.identity.name_or_path if loaded else model)
    loaded = loaded or load_model(model, device=device, dtype=dtype)
    profile = open_for_update(out, loaded)
    usage, wall, dropped = profile_domain(loaded, settings, profile, domain, text, progress=progress)
    write_profile(profile, out)
    return ProfileResult(profile, out, domain.name, usage, wall, dropped)
