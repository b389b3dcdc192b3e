"""`banpick profile`: count expert usage on a domain's calibration text and mark its candidates."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Unpack

import torch

from banpick_cli.passes.resume import Sidecar, run_fingerprint, texts_digest
from banpick_cli.stages.common import CandidateKnobs, ModelArgs, TextSettings, check_model_first, lifecycle, store, load_domain_text, open_for_update, provenance
from banpick_cli.passes.distributed import Dist, init_from_env
from banpick_cli.passes.usage import UsageCounts
from banpick_cli.passes.usage_pass import RunOptions, count_usage_pass
from banpick_cli.data import CalibrationText, Domain
from banpick_cli.errors import BadSetting
from banpick_cli.models.loading import LoadedModel, load_model, resolve_device
from banpick_cli.paths import DEMO_MODEL_NAME
from banpick_cli.profile.format import RoutingProfile, ensure_writable
from banpick_cli.progress import ProgressFn, silent

# Stage results computed from a domain's usage; stale once its counts change.


@dataclass(frozen=True)
class ProfileSettings(CandidateKnobs, TextSettings):
    """Settings of one `profile` run; recorded verbatim in the profile's provenance."""

    samples: int = 256
    seq_len: int = 512
    candidate_ratio: float = 2.0
    candidate_top: int = 0


@dataclass
class ProfileResult:
    """What a `profile` run produced: the updated profile, its counts, and how fast it ran."""

    profile: RoutingProfile
    path: Path
    domain: str
    usage: UsageCounts
    wall_s: float
    dropped: list[str]
    rank: int = 0  # under torchrun only rank 0 holds (and wrote) the profile
    world: int = 1
    resumed_batches: int = 0  # batches taken from a checkpoint sidecar instead of recomputed
    stale_sidecar: bool = False  # a sidecar of another run (other settings, data or model) was discarded
    notes: tuple[str, ...] = ()  # what the user should know (fewer texts than asked for)
    layer_loads: int = 0  # decoder layers this rank read from the checkpoint (--stream) or moved (--sequential)

    @property
    def tokens_per_s(self) -> float:
        return self.usage.tokens / self.wall_s if self.wall_s > 0 else 0.0



def store_usage(
    profile: RoutingProfile,
    loaded: LoadedModel,
    settings: ProfileSettings,
    domain: Domain,
    text: CalibrationText,
    usage: UsageCounts,
    wall: float,
    **facts: Any,
) -> list[str]:
    """Stores a domain's counts, candidates and provenance in `profile`; returns the stale tensors it dropped."""
    name = domain.name
    dropped = profile.domain(name).store_usage(usage.expert_counts, usage.token_counts, settings.rule)
    profile.record("profile", name, provenance(
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
        **facts,
    ))
    return dropped


def run_profile(settings: ProfileSettings, *, out: str | Path, progress: ProgressFn = silent,
                options: RunOptions = RunOptions(), **args: Unpack[ModelArgs]) -> ProfileResult:
    """Loads the model, profiles one domain, and writes (or updates) the profile at `out` atomically.

    Everything that can fail on bad input (output path, domain, data) is checked before the model loads.
    Under torchrun every rank counts its shard of the batches and rank 0 writes the summed profile;
    with `options.checkpoint_every`, partial counts go to a sidecar next to `out` and a rerun resumes.
    """
    out = Path(out)
    model, loaded = args.get("model", DEMO_MODEL_NAME), args.get("loaded")
    device, dtype = args.get("device", "auto"), args.get("dtype", "auto")
    dist = init_from_env()
    try:
        if options.device_map and dist.active and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise BadSetting("--device-map spreads one model over all of a machine's GPUs: under torchrun use it with "
                             "--nproc-per-node 1 (one rank per machine), or drop it and let each rank take one GPU")
        if dist.is_main:
            ensure_writable(out)
        check_model_first(model, loaded)
        domain, text = load_domain_text(settings, model=loaded.identity.name_or_path if loaded else model)
        run_device = _run_device(device, dist)
        if loaded is None and options.stream:
            # Weights stay on disk; each decoder layer is read when it runs (passes/streaming.py).
            from banpick_cli.passes.streaming import load_streaming

            loaded = load_streaming(model, device=str(run_device), dtype=_dtype_for(dtype, run_device))
        elif loaded is None and options.sequential:
            # The model stays in CPU memory; its layers visit `run_device` one at a time.
            loaded = load_model(model, device="cpu", dtype=_dtype_for(dtype, run_device))
        elif loaded is None:
            loaded = load_model(model, device=str(run_device), dtype=dtype, device_map=options.device_map)
        if not options.sequential:
            run_device = loaded.device
        if settings.candidate_top >= loaded.routing.num_experts:
            raise BadSetting(f"--candidate-top {settings.candidate_top} would mark every used expert: this model has "
                             f"{loaded.routing.num_experts} per layer (give fewer, or 0 for the ratio rule alone)")
        profile = open_for_update(out, loaded) if dist.is_main else None
        sidecar = _sidecar(out, loaded, settings, domain, text, dist) if options.checkpoint_every else None
        start = time.perf_counter()
        with lifecycle("profile", out, lambda: f"{sidecar.saved} batches" if sidecar is not None and sidecar.saved else None):
            done = count_usage_pass(loaded, text.texts, seq_len=settings.seq_len, batch_size=settings.batch_size,
                                    device=run_device, options=options, sidecar=sidecar, dist=dist, progress=progress)
        if run_device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        dropped: list[str] = []
        if profile is not None:
            facts = {"world_size": dist.world, "resumed_batches": done.resumed_batches}
            if options.sequential or options.stream:
                facts.update(sequential=options.sequential, stream=options.stream, run_device=str(run_device),
                             layer_loads=done.layer_loads)
            if options.device_map:
                facts["device_map"] = options.device_map
            profile = store(out, profile, loaded,
                            lambda p: dropped.extend(store_usage(p, loaded, settings, domain, text, done.usage, wall, **facts)),
                            domain=domain.name, writes_usage=True)
        dist.barrier()  # every rank's sidecar stays until the profile is safely written
        if sidecar is not None:
            sidecar.remove()
        return ProfileResult(profile, out, domain.name, done.usage, wall, dropped, rank=dist.rank, world=dist.world,
                             resumed_batches=done.resumed_batches, stale_sidecar=bool(sidecar and sidecar.stale),
                             notes=text.notes, layer_loads=done.layer_loads)
    finally:
        dist.close()


def _run_device(device: str, dist: Dist) -> torch.device:
    """Returns the device batches run on; under torchrun each rank takes the GPU of its local rank."""
    resolved = resolve_device(device)
    if resolved.type == "cuda" and dist.active and resolved.index is None:
        return torch.device("cuda", dist.local_rank)
    return resolved


def _dtype_for(dtype: str, run_device: torch.device) -> str:
    """Returns the dtype name for a model loaded on the CPU that will run on `run_device`."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if run_device.type == "cuda" else "float32"


def _sidecar(out: Path, loaded: LoadedModel, settings: ProfileSettings, domain: Domain, text: CalibrationText, dist: Dist) -> Sidecar:
    """Returns this run's checkpoint sidecar, stamped with everything that decides its counts."""
    tag = domain.name + (f".rank{dist.rank}of{dist.world}" if dist.active else "")
    fingerprint = run_fingerprint(
        model=loaded.fingerprint,
        data=texts_digest(text.texts),
        settings=asdict(settings),
        dtype=str(next(loaded.model.parameters()).dtype),
        world=dist.world,
        rank=dist.rank,
    )
    return Sidecar(out, "profile", tag, fingerprint)
