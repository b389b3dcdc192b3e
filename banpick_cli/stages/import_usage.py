"""Usage counts from what serving engines already record, so a team can profile production traffic.

Two sources, SGLang's expert distribution recorder and vLLM's routed experts (formats, versions and how
to record them: docs/import.md), read by `stages/usage_dumps.py`. The model is not run: its identity
comes from a weightless (meta) copy and its router fingerprint from the router tensors in its
checkpoint files, so importing for a 235B model is cheap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from banpick_cli.stages.common import CandidateKnobs, Origin, lifecycle, provenance, store
from banpick_cli.stages.usage_dumps import ImportedUsage, read_sglang, read_vllm
from banpick_cli.checks import domain_name, number, one_of
from banpick_cli.errors import BadSetting
from banpick_cli.profile.fingerprint import router_fingerprint
from banpick_cli.profile.identity import ModelIdentity
from banpick_cli.profile.format import RoutingProfile, check_fingerprint, ensure_writable, new_profile, read_profile

ENGINES = ("sglang", "vllm")


@dataclass(frozen=True)
class ImportSettings(CandidateKnobs):
    """Settings of one `import-usage` run; recorded verbatim in the profile's provenance."""

    engine: str
    domain: str
    files: tuple[str, ...]
    replicas: int = 1
    candidate_ratio: float = 2.0
    candidate_top: int = 0

    def __post_init__(self) -> None:
        one_of("--from", self.engine, ENGINES)
        domain_name(self.domain)
        if not self.files:
            raise BadSetting("give at least one dump file or folder")
        number("--replicas", self.replicas, low=1, integer=True)
        super().__post_init__()


@dataclass
class ImportResult:
    profile: RoutingProfile
    path: Path
    usage: ImportedUsage
    dropped: list[str]
    wall_s: float


# --- the model, without running it ------------------------------------------------------------------
def model_identity(name: str) -> tuple[ModelIdentity, str | None, Path | None]:
    """Returns (identity, router fingerprint or None, resolved local dir or None) without loading weights.

    The identity comes from a weightless (meta-device) model built from the config; the fingerprint
    from the router tensors in the local checkpoint's safetensors files, hashed exactly as
    `models.loading.fingerprint` hashes the loaded routers (None when the files are not local).
    """
    from transformers import AutoModelForCausalLM

    from banpick_cli.models.loading import identify, load_config
    from banpick_cli.models.registry import adapter_for

    resolved, config = load_config(name)
    adapter = adapter_for(config)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    layers, _, identity = identify(meta, adapter, name_or_path=name)
    local = Path(resolved) if Path(resolved).is_dir() else None
    fingerprint = _checkpoint_fingerprint(local, adapter, layers) if local else None
    return identity, fingerprint, local


def _checkpoint_fingerprint(folder: Path, adapter, layers) -> str | None:
    """Returns the router fingerprint read from the checkpoint's router tensors (checked shard headers, the
    streaming reader's), or None when the folder holds no safetensors or not these routers."""
    from banpick_cli.passes.checkpoint import Checkpoint

    if not ((folder / "model.safetensors.index.json").is_file() or (folder / "model.safetensors").is_file()):
        return None
    checkpoint = Checkpoint(folder)
    found = []
    for layer in layers:
        for name, meta in adapter.router_tensors(layer).items():
            # Checkpoints keep the original module names (Mixtral's block_sparse_moe), not the loaded ones.
            keys = [f"model.layers.{layer.layer_index}.{block}.gate.{name}" for block in adapter.block_names]
            key = next((k for k in keys if k in checkpoint.files), None)
            if key is None:
                return None
            values = checkpoint.read([key])[key].to(torch.bfloat16).contiguous()
            if tuple(values.shape) != tuple(meta.shape):
                return None
            found.append((layer.layer_index, name, values))
    return router_fingerprint(found)


# --- the stage -------------------------------------------------------------------------------------
def run_import(settings: ImportSettings, *, model: str, out: str | Path) -> ImportResult:
    """Reads serving dumps, counts usage of one domain, and writes (or updates) the profile at `out`."""
    start = time.perf_counter()
    out = Path(out)
    ensure_writable(out)
    identity, fingerprint, _ = model_identity(model)
    if out.exists():
        profile = read_profile(out)
        if fingerprint is not None:
            check_fingerprint(profile, fingerprint, path=out)
        elif profile.model.to_dict() | {"name_or_path": ""} != identity.to_dict() | {"name_or_path": ""}:
            raise BadSetting(f"{out} was made for {profile.model.name_or_path}, whose layout differs from {model}")
    else:
        if fingerprint is None:
            from banpick_cli.models.loading import load_model

            fingerprint = load_model(model, device="cpu").fingerprint  # not a local checkpoint: load it once
        profile = new_profile(identity, fingerprint)
    reader = read_sglang if settings.engine == "sglang" else read_vllm
    with lifecycle("import-usage"):
        usage = reader(settings.files, profile.model, replicas=settings.replicas)
    name = settings.domain
    dropped: list[str] = []
    wall = time.perf_counter() - start
    record = provenance(
        "import-usage", settings, None,
        dataset=f"{settings.engine} dump: " + ", ".join(Path(f).name for f in usage.files[:5])
                + (f" (+{len(usage.files) - 5} more)" if len(usage.files) > 5 else ""),
        split=None, samples=usage.sequences, tokens=int(usage.token_counts[0]) if len(usage.token_counts) else 0,
        tokens_exact=usage.tokens_exact, seq_len=None, seed=None, notes=usage.notes, wall_s=round(wall, 3),
        device="none (read from serving dumps)",
    )

    def change(p: RoutingProfile) -> None:
        dropped.extend(p.domain(name).store_usage(usage.expert_counts, usage.token_counts, settings.rule))
        p.record("profile", name, record)

    profile = store(out, profile, Origin(profile.model, profile.fingerprint), change, domain=name, writes_usage=True)
    return ImportResult(profile, out, usage, dropped, wall)
