"""`banpick export`: a serving bundle from a profile (compact runtime profile, manifest, README, Dockerfile lines).

The bundle's profile is a valid v1 profile holding only what inference reads (key experts of the
chosen domains, the Ban tensors, their settings) plus `settings["runtime"]`: the method, domain,
hyperparameters and expected experts per token per layer. The manifest records the same with the
model fingerprint, banpick version and the profile's sha256; runtimes check it on load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from banpick_cli import __version__
from banpick_cli.errors import BadSetting, BanpickError, ProfileError
from banpick_cli.profile.format import RoutingProfile, new_profile, read_profile, write_profile

from banpick_cli.runtime.bundle import BUNDLE_FORMAT, BUNDLE_VERSION, MANIFEST, PROFILE, sha256_of
from banpick_cli.runtime.expect import expected_k, max_experts
from banpick_cli.runtime.methods import DOMAIN_METHODS, ENGINE_METHODS
from banpick_cli.runtime.plan import AUTO, RoutingPlan, build_plan

TARGETS = ("vllm", "sglang", "hf")
BAN_TENSORS = ("layer_sensitivity", "ratio_min", "ratio_max", "ratio_hist")  # what serving needs of Ban
# The serving images the Dockerfile lines start from: the engine versions the plugins target.
BASE_IMAGES = {"vllm": "vllm/vllm-openai:v0.33.0", "sglang": "lmsysorg/sglang:v0.5.23",
               "hf": "python:3.11.7-slim"}


@dataclass(frozen=True)
class ExportResult:
    """What export wrote."""

    out: Path
    profile: Path
    manifest: dict[str, Any]
    files: list[Path]


def export_bundle(
    profile_path: str | os.PathLike,
    target: str,
    out: str | os.PathLike,
    *,
    method: str | None = None,
    domain: str | None = None,
    overrides: dict[str, Any] | None = None,
    model: str | None = None,
) -> ExportResult:
    """Writes a serving bundle for `target` into `out`; returns what it wrote.

    With `method` (and `domain` for pick/banpick) the bundle serves that routing; without, it keeps
    every domain's key experts and the Ban tensors, and the method is chosen at serve time
    (BANPICK_METHOD / BANPICK_DOMAIN, or apply(..., method=, domain=)). Raises ProfileError naming
    the stage to run when the profile lacks what the method needs.
    """
    if target not in TARGETS:
        raise BadSetting(f"unknown target '{target}'; known targets: {', '.join(TARGETS)}")
    overrides = dict(overrides or {})
    source = read_profile(profile_path)
    if not source.fingerprint.startswith("sha256:") or len(source.fingerprint) != 71:
        raise ProfileError(f"{profile_path} has no model fingerprint: re-create it with `banpick profile`")
    if target != "hf" and method is not None and method not in ENGINE_METHODS:
        raise BadSetting(f"method '{method}' runs in the HF runtime only; --target {target} serves: {', '.join(ENGINE_METHODS)}")
    if domain == AUTO and target != "hf":
        raise BadSetting("--domain auto runs in the HF runtime only (it needs a per-request signature pass)")
    specs = source.model.router_specs()
    plans = _plans(source, specs, method, domain, overrides)
    domains = sorted({p.domain for p in plans.values() if p.domain} | (_auto_domains(source) if domain == AUTO else set()))
    keep_usage = domain == AUTO or (method is None and target == "hf")
    runtime = _runtime_settings(source, plans, method, domain, overrides, target)
    compact = _compact(source, domains if (method or domain) else source.key_domains(), keep_usage,
                       with_ban=any(p.method in ("ban", "banpick") for p in plans.values()), runtime=runtime)
    target_dir = Path(out)
    target_dir.mkdir(parents=True, exist_ok=True)
    profile_file = write_profile(compact, target_dir / PROFILE)
    profile_file.chmod(0o644)  # written through a private temp file; the serving user must read it
    manifest = _manifest(source, compact, profile_file, profile_path, target, method, domain, overrides, runtime, model)
    (target_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    files = [profile_file, target_dir / MANIFEST, *_write_snippets(target_dir, manifest)]
    return ExportResult(target_dir, profile_file, manifest, files)


def _plans(profile: RoutingProfile, specs, method, domain, overrides) -> dict[str, RoutingPlan]:
    """Returns the plans the bundle serves, keyed "method" or "method/domain"; validates the profile."""
    if method is not None:
        if domain == AUTO:
            if method not in DOMAIN_METHODS:
                raise BadSetting(f"domain 'auto' applies to methods that read key experts ({', '.join(DOMAIN_METHODS)})")
            return {f"{method}/{d}": build_plan(profile, specs, method, d, **overrides) for d in _auto_domains(profile)} or \
                _raise(ProfileError("domain auto needs key experts and usage counts of a domain: run `banpick profile` and `banpick kl-scan`"))
        plan = build_plan(profile, specs, method, domain, **overrides)
        return {method if plan.domain is None else f"{method}/{plan.domain}": plan}
    # Serve-time choice: every method the profile can serve, each domain with key experts.
    plans: dict[str, RoutingPlan] = {}
    for candidate in ("ban", "pick", "banpick"):
        for d in (profile.key_domains() if candidate in DOMAIN_METHODS else [None]):
            try:
                plans[candidate if d is None else f"{candidate}/{d}"] = build_plan(profile, specs, candidate, d, **{
                    k: v for k, v in overrides.items()})
            except BanpickError:
                continue
    if not plans:
        build_plan(profile, specs, "ban")  # raises, naming the stage to run first
    return plans


def _runtime_settings(profile, plans, method, domain, overrides, target) -> dict[str, Any]:
    served = {}
    for name, plan in plans.items():
        expected = expected_k(plan, profile)
        served[name] = {"method": plan.method, "domain": plan.domain, "hyperparameters": plan.params,
                        "changed_layers": sorted(plan.rules), "engine_slots": max_experts(plan),
                        "expected_avg_experts": expected.to_dict()}
    return {"target": target, "method": method, "domain": domain, "overrides": _jsonable(overrides),
            "k_base": profile.model.k_base, "served": served}


def _compact(source: RoutingProfile, domains, keep_usage: bool, *, with_ban: bool, runtime: dict) -> RoutingProfile:
    compact = new_profile(source.model, source.fingerprint)
    for d in domains:
        here, there = compact.domain(d), source.domain(d)
        here.put("key_experts", there.key_experts)
        if keep_usage and there.has("expert_counts"):
            for part in ("expert_counts", "token_counts", "candidates"):
                here.put(part, there.get(part))
        if there.recorded_pick():
            here.set_pick(there.recorded_pick())
    if with_ban:
        for part in BAN_TENSORS:
            if source.ban.has(part):
                compact.ban.put(part, source.ban.get(part))
        if source.ban.settings:
            compact.ban.set_settings(source.ban.settings)
    compact.settings["runtime"] = runtime
    compact.provenance = dict(source.provenance)
    return compact


def _manifest(source, compact, profile_file: Path, source_path, target, method, domain, overrides, runtime, model) -> dict:
    chosen = next(iter(runtime["served"].values())) if method is not None and domain != AUTO else None
    return {
        "format": BUNDLE_FORMAT,
        "bundle_version": BUNDLE_VERSION,
        "banpick_version": __version__,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "target": target,
        "model": {**source.model.to_dict(), "fingerprint": source.fingerprint, "serve_as": model or source.model.name_or_path},
        "method": method,
        "domain": domain,
        "overrides": _jsonable(overrides),
        "hyperparameters": chosen["hyperparameters"] if chosen else None,
        "expected_avg_experts": chosen["expected_avg_experts"] if chosen else None,
        "engine_slots": max(s["engine_slots"] for s in runtime["served"].values()),
        "served": runtime["served"],
        "profile": {"file": profile_file.name, "sha256": sha256_of(profile_file), "bytes": profile_file.stat().st_size,
                    "tensors": sorted(compact.tensors)},
        "source_profile": {"path": str(source_path), "sha256": sha256_of(source_path)},
    }


def _write_snippets(out: Path, manifest: dict) -> list[Path]:
    from banpick_cli.runtime.snippets import dockerfile, readme, serve_env

    files = {"README.md": readme(manifest, out.name), "Dockerfile.banpick": dockerfile(manifest), "serve.env": serve_env(manifest)}
    written = []
    for name, text in files.items():
        (out / name).write_text(text)
        written.append(out / name)
    return written


def _auto_domains(profile: RoutingProfile) -> set[str]:
    return {d for d in profile.key_domains() if profile.domain(d).has("expert_counts")}


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    try:
        json.dumps(values)
    except TypeError:
        raise BadSetting("export hyperparameters must be plain values (numbers, strings, lists)") from None
    return values


def _raise(err: Exception):
    raise err
