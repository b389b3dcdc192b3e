"""The routing profile, format v1: one safetensors file that any runtime can read with safetensors alone.

Every key is documented in docs/profile-format.md; keep the two in step.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch

from banpick_cli import __version__
from banpick_cli.checks import missing_file
from banpick_cli.errors import FingerprintMismatch, OutputError, ProfileError
from banpick_cli.profile.identity import ModelIdentity
from banpick_cli.profile.views import BanView, BatchView, DomainView

FORMAT_NAME = "banpick.routing_profile"
SCHEMA_VERSION = 1

M, E, ANY = "moe_layers", "experts", "any"
# Tensor name pattern -> (dtype, shape in symbolic dims, the command that writes it).
TENSOR_SCHEMA: dict[str, tuple[torch.dtype, tuple[str, ...], str]] = {
    r"domain/(?P<d>[^/]+)/expert_counts": (torch.int64, (M, E), "profile"),
    r"domain/(?P<d>[^/]+)/token_counts": (torch.int64, (M,), "profile"),
    r"domain/(?P<d>[^/]+)/candidates": (torch.bool, (M, E), "profile"),
    r"domain/(?P<d>[^/]+)/kl": (torch.float32, (M, E), "kl-scan"),
    r"domain/(?P<d>[^/]+)/accuracy_gain": (torch.float32, (M, E), "failure-probe"),
    r"domain/(?P<d>[^/]+)/key_experts": (torch.bool, (M, E), "kl-scan"),
    r"ban/layer_kl": (torch.float32, (M,), "layer-sensitivity"),
    r"ban/layer_sensitivity": (torch.float32, (M,), "layer-sensitivity"),
    r"ban/ratio_min": (torch.float32, (M,), "layer-sensitivity"),
    r"ban/ratio_max": (torch.float32, (M,), "layer-sensitivity"),
    r"ban/ratio_hist": (torch.int64, (M, ANY), "layer-sensitivity"),
}
REQUIRED_PER_DOMAIN = ("expert_counts", "token_counts", "candidates")
_OLD_PARTIAL = "partial/"
COUNTS = ("expert_counts", "token_counts")
T = TypeVar("T")


@dataclass
class RoutingProfile:
    """A routing profile in memory: the model it belongs to, its tensors, and how they were made."""

    model: ModelIdentity
    fingerprint: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # stage key ("profile/math", "kl-scan/math", "layer-sensitivity") -> provenance record
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)
    # settings key ("domain/math", "ban", "pick/math", "batch") -> the knobs a stage chose
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    created_utc: str = ""
    banpick_version: str = __version__

    @property
    def shape(self) -> tuple[int, int]:
        """Returns (number of MoE layers, experts per layer): the shape of every per-expert tensor."""
        return len(self.model.moe_layers), self.model.num_experts

    def domains(self) -> list[str]:
        """Returns the domains this profile holds usage counts for, sorted."""
        found = {m.group(1) for name in self.tensors if (m := re.fullmatch(r"domain/([^/]+)/expert_counts", name))}
        return sorted(found)

    def domain(self, name: str) -> DomainView:
        """Returns typed access to one domain's tensors and settings (it need not exist yet)."""
        return DomainView(self, name)

    @property
    def ban(self) -> BanView:
        """Returns typed access to Ban's tensors and settings."""
        return BanView(self)

    @property
    def batch(self) -> BatchView:
        """Returns typed access to the batch-aware step's settings."""
        return BatchView(self)

    def key_domains(self) -> list[str]:
        """Returns the domains that have key experts, sorted."""
        found = {m.group(1) for name in self.tensors if (m := re.fullmatch(r"domain/([^/]+)/key_experts", name))}
        return sorted(found)

    def record(self, stage: str, domain: str | None, record: dict[str, Any]) -> None:
        """Stores how a stage made what it wrote (per domain for profile, kl-scan and failure-probe)."""
        self.provenance[stage_key(stage, domain)] = record

    def recorded(self, stage: str, domain: str | None = None) -> dict[str, Any]:
        """Returns a stage's provenance record, or {} when it has not run."""
        return self.provenance.get(stage_key(stage, domain), {})

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        """Returns a tensor, or raises a one-line error that names the stage to run first."""
        if name not in self.tensors:
            raise missing(name, self.domains())
        return self.tensors[name]

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Stores a tensor after checking its name, dtype and shape against the schema."""
        self.tensors[name] = _checked(name, tensor.detach().cpu().contiguous(), self.shape)

    def check_values(self, names: Iterable[str] | None = None) -> None:
        """Raises a one-line ProfileError naming the stage to rerun when a stage's results (`names`, default all)
        hold values no run writes: NaN or inf in Ban's tensors; inf in a domain's KL or gains, or no value at all
        (all NaN; a NaN there otherwise marks an expert that was not scanned). Export, report and the runtime
        refuse such a file; reading it still works, so inspect shows it and a rerun of the stage replaces it."""
        for name in sorted(self.tensors if names is None else names):
            tensor = self.tensors.get(name)
            if tensor is None or not tensor.is_floating_point():
                continue
            scan = name.startswith("domain/")
            bad = torch.isinf(tensor) if scan else ~torch.isfinite(tensor)
            empty = scan and bool(torch.isnan(tensor).all())
            if bool(bad.any()) or empty:
                rows = sorted({int(i) for i in bad.reshape(len(tensor), -1).any(-1).nonzero().flatten()})
                what = "no value (all NaN)" if not rows else f"{'inf' if scan else 'NaN/inf'} at MoE layer(s) {rows}"
                domain = name.split("/")[1] if scan else None
                hint = f" --domain {domain}" if domain else ""
                raise ProfileError(f"'{name}' holds {what}: the profile is corrupt; rerun `banpick {stage_of(name)}{hint}`")


def stage_key(stage: str, domain: str | None = None) -> str:
    """Returns the provenance key of a stage's run: "profile/math", "layer-sensitivity"."""
    return stage if domain is None else f"{stage}/{domain}"


def stage_of(name: str) -> str:
    """Returns the command that writes a tensor."""
    return _schema_for(name)[2]


def missing(name: str, domains: list[str] | None = None) -> ProfileError:
    """Returns the one-line error for a tensor a profile lacks (used by RoutingProfile.get): the stage to run
    first, which is `profile` for a domain the profile does not hold at all (`domains`: those it holds)."""
    domain = name.split("/")[1] if name.startswith("domain/") else None
    if domain is not None and domains is not None and domain not in domains:
        held = f"it holds {', '.join(domains)}" if domains else "it holds none"
        return ProfileError(f"the profile has no domain '{domain}' ({held}): run `banpick profile --domain {domain}` "
                            "first, or choose one it holds")
    hint = f" --domain {domain}" if domain else ""
    then = ""
    if name.endswith("/key_experts"):
        then = " (its high-KL candidates; `banpick failure-probe` then chooses key experts by accuracy gain)"
    return ProfileError(f"the profile has no '{name}': run `banpick {stage_of(name)}{hint}` first{then}")


def _schema_for(name: str) -> tuple[torch.dtype, tuple[str, ...], str]:
    for pattern, spec in TENSOR_SCHEMA.items():
        if re.fullmatch(pattern, name):
            return spec
    raise ProfileError(f"unknown tensor '{name}' in a v{SCHEMA_VERSION} profile")


def _checked(name: str, tensor: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    dtype, dims, _ = _schema_for(name)
    sizes = {M: shape[0], E: shape[1]}
    want = tuple(sizes.get(d, -1) for d in dims)
    got = tuple(tensor.shape)
    if len(got) != len(want) or any(w not in (-1, g) for w, g in zip(want, got)):
        raise ProfileError(f"tensor '{name}' has shape {list(got)}, expected {list(want)} ([{', '.join(dims)}])")
    if tensor.dtype != dtype:
        raise ProfileError(f"tensor '{name}' has dtype {tensor.dtype}, expected {dtype}")
    return tensor


def new_profile(model: ModelIdentity, fingerprint: str) -> RoutingProfile:
    """Returns an empty profile for a model."""
    return RoutingProfile(model=model, fingerprint=fingerprint)


def check_fingerprint(profile: RoutingProfile, fingerprint: str, *, path: str | os.PathLike = "profile") -> None:
    """Raises FingerprintMismatch unless the profile was made for the checkpoint with this fingerprint."""
    if profile.fingerprint != fingerprint:
        raise FingerprintMismatch(
            f"{path} was made for another model ({profile.model.name_or_path}, router fingerprint "
            f"{profile.fingerprint[7:19]}…), not this one ({fingerprint[7:19]}…)"
        )


def write_profile(profile: RoutingProfile, path: str | os.PathLike) -> Path:
    """Writes the profile atomically (temporary file in the same folder, then rename); returns the path.

    A failed write (full disk, read-only folder) leaves the previous file untouched and nothing else
    behind, and raises a one-line OutputError.
    """
    from safetensors.torch import save

    from banpick_cli.outputs import write_bytes_atomic

    target = Path(path)
    _validate(profile)
    if not target.parent.is_dir():
        raise OutputError(f"cannot write profile {target}: folder {target.parent} does not exist")
    profile.created_utc = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    profile.banpick_version = __version__
    metadata = {
        "format": FORMAT_NAME,
        "schema_version": str(SCHEMA_VERSION),
        "banpick_version": profile.banpick_version,
        "created_utc": profile.created_utc,
        "fingerprint": profile.fingerprint,
        "model": json.dumps(profile.model.to_dict(), sort_keys=True),
        "domains": json.dumps(profile.domains()),
        "provenance": json.dumps(profile.provenance, sort_keys=True),
        "settings": json.dumps(profile.settings, sort_keys=True),
    }
    # Serialised in memory (profiles are [layers, experts] tensors: megabytes), so every byte goes
    # through one write path whose errors are ours to report.
    data = save({k: v.contiguous() for k, v in sorted(profile.tensors.items())}, metadata=metadata)
    return write_bytes_atomic(target, data, what="profile")


def lock_path(path: str | os.PathLike) -> Path:
    """Returns the lock file that guards read-merge-write of the profile at `path` (beside it, hidden)."""
    target = Path(path)
    return target.with_name(f".{target.name}.lock")


@contextmanager
def profile_lock(path: str | os.PathLike) -> Iterator[None]:
    """Holds an exclusive lock on the profile at `path` (fcntl.flock on a lock file beside it) while the
    block runs, so writers of one profile take turns. Where flock is missing (Windows) it does nothing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    lock = lock_path(path)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        from banpick_cli.outputs import output_error

        raise output_error(path, err, what="profile") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def update_profile(
    path: str | os.PathLike,
    change: Callable[[RoutingProfile], T],
    *,
    model: ModelIdentity,
    fingerprint: str,
) -> tuple[RoutingProfile, T]:
    """Applies a stage's `change` to the profile at `path` under its lock and writes it atomically;
    returns (the written profile, what `change` returned).

    The file is read again under the lock (a new profile when missing), so entries other writers stored
    since this stage started (other domains, other stages) are kept: `change` sets only its own.
    An existing file that is not a profile, or a profile of another model, is refused, not overwritten.
    """
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"cannot write profile {target}: it is a directory; give a file path")
    with profile_lock(target):
        profile = read_profile(target, fingerprint=fingerprint) if target.exists() else new_profile(model, fingerprint)
        result = change(profile)
        write_profile(profile, target)
    return profile, result


def _validate(profile: RoutingProfile) -> None:
    for name, tensor in profile.tensors.items():
        _checked(name, tensor, profile.shape)
    for domain in profile.domains():
        for part in REQUIRED_PER_DOMAIN:
            if f"domain/{domain}/{part}" not in profile.tensors:
                raise ProfileError(f"domain '{domain}' lacks tensor 'domain/{domain}/{part}'")
        for part in COUNTS:
            if bool((profile.tensors[f"domain/{domain}/{part}"] < 0).any()):
                raise ProfileError(f"tensor 'domain/{domain}/{part}' holds negative counts: the profile is corrupt")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Returns the raw safetensors metadata, or raises if the file is not a banpick profile."""
    from safetensors import safe_open

    source = Path(path)
    problem = missing_file("profile", source)
    if problem:
        raise ProfileError(problem)
    try:
        with safe_open(str(source), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:  # safetensors raises several types for corrupt headers
        raise ProfileError(f"{source} is not a banpick profile (not a readable safetensors file)") from None
    if metadata.get("format") != FORMAT_NAME:
        raise ProfileError(f"{source} is not a banpick profile (format is {metadata.get('format')!r})")
    try:
        version = int(metadata.get("schema_version", ""))
    except ValueError:
        raise ProfileError(f"{source} has an unreadable schema_version") from None
    if version > SCHEMA_VERSION:
        raise ProfileError(
            f"{source} uses profile schema v{version}, newer than this banpick ({__version__}) reads (v{SCHEMA_VERSION}); upgrade banpick"
        )
    return metadata


def read_profile(path: str | os.PathLike, *, fingerprint: str | None = None) -> RoutingProfile:
    """Reads and validates a profile; with `fingerprint`, also refuses one made for another model."""
    from safetensors import safe_open

    metadata = read_metadata(path)
    try:
        model = ModelIdentity.from_dict(json.loads(metadata["model"]))
        profile = RoutingProfile(
            model=model,
            fingerprint=metadata["fingerprint"],
            provenance=json.loads(metadata.get("provenance", "{}")),
            settings=json.loads(metadata.get("settings", "{}")),
            created_utc=metadata.get("created_utc", ""),
            banpick_version=metadata.get("banpick_version", ""),
        )
        with safe_open(str(path), framework="pt") as handle:
            # Scans before 0.1.1 kept an interrupted run's rows under partial/: resuming now uses a sidecar.
            profile.tensors = {name: handle.get_tensor(name) for name in handle.keys() if not name.startswith(_OLD_PARTIAL)}
        profile.settings = {k: v for k, v in profile.settings.items() if not k.startswith(_OLD_PARTIAL)}
    except ProfileError:
        raise
    except Exception as err:
        raise ProfileError(f"{path} is a corrupt banpick profile ({type(err).__name__}: {str(err)[:100]})") from None
    _validate(profile)
    listed = json.loads(metadata.get("domains", "[]"))
    if sorted(listed) != profile.domains():
        raise ProfileError(f"{path} lists domains {listed} but holds tensors for {profile.domains()}")
    if fingerprint is not None:
        check_fingerprint(profile, fingerprint, path=path)
    return profile


def ensure_writable(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Raises before any work is done if a profile could not be written at `path` (or `path` is an input)."""
    from banpick_cli.outputs import check_output

    check_output(path, kind="file", inputs=inputs, flag="cannot write profile")
