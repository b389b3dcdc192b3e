"""Reading what `banpick export` writes: a bundle folder (manifest.json + profile.safetensors) or a profile file."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from banpick_cli.errors import ProfileError
from banpick_cli.profile.format import RoutingProfile, read_profile

BUNDLE_FORMAT = "banpick.runtime_bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
PROFILE = "profile.safetensors"


def load_bundle(path: str | os.PathLike, *, fingerprint: str | None = None) -> tuple[RoutingProfile, dict[str, Any] | None]:
    """Returns (profile, manifest) from a bundle folder, or (profile, None) from a profile file.

    A bundle's profile must hash to the sha256 its manifest records (a swapped or truncated file
    is refused); with `fingerprint`, a profile of another model is refused too.
    """
    source = Path(path)
    if not source.is_dir():
        return read_profile(source, fingerprint=fingerprint), None
    manifest_path = source / MANIFEST
    if not manifest_path.is_file():
        raise ProfileError(f"{source} is a folder without {MANIFEST}: not a banpick bundle")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        raise ProfileError(f"{manifest_path} is unreadable ({err})") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise ProfileError(f"{manifest_path} is not a banpick bundle manifest (format {manifest.get('format')!r})")
    if int(manifest.get("bundle_version", 0)) > BUNDLE_VERSION:
        raise ProfileError(f"{source} is a v{manifest['bundle_version']} bundle, newer than this banpick reads; upgrade banpick")
    profile_path = source / manifest.get("profile", {}).get("file", PROFILE)
    if not profile_path.is_file():
        raise ProfileError(f"bundle {source} lacks its profile {profile_path.name}")
    want = manifest.get("profile", {}).get("sha256")
    if want and sha256_of(profile_path) != want:
        raise ProfileError(f"{profile_path} does not match the sha256 in {MANIFEST}: the bundle was altered; export it again")
    return read_profile(profile_path, fingerprint=fingerprint), manifest


def routing_choice(manifest: dict[str, Any] | None, *, method: str | None, domain: str | None,
                   overrides: dict[str, Any], batch_aware: Any = None) -> tuple[str, str | None, dict[str, Any], Any]:
    """Returns (method, domain, overrides, batch_aware) to route with: each the caller's, else the bundle
    manifest's, else baseline, no domain, no overrides, no batch-aware step; the caller's overrides win key by key.

    The one reading of a manifest's routing choice, for the HF runtime (`apply`) and the engine plugins.
    """
    manifest = manifest or {}
    return (method or manifest.get("method") or "baseline", domain or manifest.get("domain"),
            {**manifest.get("overrides", {}), **overrides}, batch_aware or manifest.get("batch_aware") or False)


def sha256_of(path: str | os.PathLike) -> str:
    """Returns the hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
