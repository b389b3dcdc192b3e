"""`banpick export`: a serving bundle from a profile (compact runtime profile, manifest, README, Dockerfile lines).

The bundle's profile is a valid v1 profile holding only what inference reads (key experts of the
chosen domains, the Ban tensors, their settings) plus `settings["runtime"]`: the method, domain,
hyperparameters and expected experts per token per layer. The manifest records the same with the
model fingerprint, banpick version and the profile's sha256; runtimes check it on load.

An engine bundle (vllm, sglang) also carries the banpick it needs, as `wheels/banpick-<v>-py3-none-any.whl`
built from this source tree (or the wheel this banpick was installed from), and its Dockerfile installs
that file with `--no-deps --no-index`: nothing of the engine image moves. The bundle is built in a
temporary folder beside `out` and renamed into place, so a failure leaves nothing partial.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from banpick_cli import __version__
from banpick_cli.errors import BadSetting, BanpickError, OutputError, ProfileError
from banpick_cli.outputs import check_output, fsync_dir, make_folder, output_error
from banpick_cli.profile.format import RoutingProfile, new_profile, read_profile, write_profile

from banpick_cli.runtime.bundle import BUNDLE_FORMAT, BUNDLE_VERSION, MANIFEST, PROFILE, sha256_of
from banpick_cli.runtime.expect import expected_k, max_experts
from banpick_cli.runtime.methods import get_method, names
from banpick_cli.runtime.plan import AUTO, RoutingPlan, build_plan

from banpick_cli.export.snippets import TARGETS, WHEELS, dockerfile, readme, serve_env

BAN_TENSORS = ("layer_sensitivity", "ratio_min", "ratio_max", "ratio_hist")  # what serving needs of Ban


class ExportError(BanpickError):
    """The bundle cannot carry banpick (no source tree or wheel to put in it, or the wheel build failed)."""


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
    source.check_values()  # a corrupt stage result is refused, not left out of the bundle
    if not source.fingerprint.startswith("sha256:") or len(source.fingerprint) != 71:
        raise ProfileError(f"{profile_path} has no model fingerprint: re-create it with `banpick profile`")
    if method is not None and target != "hf" and not get_method(method).engines:  # get_method: unknown is one line
        raise BadSetting(f"method '{method}' runs in the HF runtime only; --target {target} serves: "
                         f"{', '.join(names(lambda m: m.engines))}")
    if domain == AUTO and target != "hf":
        raise BadSetting("--domain auto runs in the HF runtime only (it needs a per-request signature pass)")
    specs = source.model.router_specs()
    batch = overrides.pop("batch_aware", False)  # the batch-aware step: its resolved bound goes in the manifest
    if batch and domain == AUTO:
        raise BadSetting("batch-aware routing with domain auto is not supported (choose a domain)")
    plans = _plans(source, specs, method, domain, overrides, batch)
    domains = sorted({p.domain for p in plans.values() if p.domain} | (_auto_domains(source) if domain == AUTO else set()))
    keep_usage = domain == AUTO or (method is None and target == "hf")
    runtime = _runtime_settings(source, plans, method, domain, overrides, target)
    compact = _compact(source, domains if (method or domain) else source.key_domains(), keep_usage,
                       with_ban=any(get_method(p.method).prunes_by_token for p in plans.values()), runtime=runtime)
    target_dir = check_output(out, kind="folder", inputs=[profile_path])
    _check_replaceable(target_dir)
    with _staged_folder(target_dir) as stage:
        wheel = _bundle_wheel(stage / WHEELS)  # every bundle carries its banpick: no index holds it
        staged_profile = write_profile(compact, stage / PROFILE)
        manifest = _manifest(source, compact, staged_profile, profile_path, target, method, domain, overrides, runtime,
                             model, wheel=wheel)
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        written = [PROFILE, MANIFEST, *_write_snippets(stage, manifest, target_dir.name)]
        if wheel is not None:
            written.append(manifest["wheel"]["file"])
    files = [target_dir / name for name in written]
    return ExportResult(target_dir, target_dir / PROFILE, manifest, files)


# --- the bundle's folder: staged beside the target, renamed into place ------------------------------
def _check_replaceable(target: Path) -> None:
    """Raises unless `target` is missing, empty, or an earlier bundle (which the new one replaces whole)."""
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not (target / MANIFEST).is_file() or _manifest_format(target / MANIFEST) != BUNDLE_FORMAT:
        raise OutputError(f"--out {target}: the folder holds files that are not a banpick bundle; give a new or empty "
                          "folder (an earlier bundle there is replaced)")


def _manifest_format(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None


@contextmanager
def _staged_folder(target: Path) -> Iterator[Path]:
    """Yields a temporary folder beside `target`; on a clean exit its files are made readable by every user
    (0644, folders 0755: the serving user is rarely the one who exported), synced, and the folder is renamed
    onto `target` (an earlier bundle there is swapped out and removed). On any failure nothing is left:
    the temporary folder and any parent folders this call created are removed; OSErrors are one line."""
    created = make_folder(target.parent)
    stage: Path | None = None
    try:
        try:
            stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
            yield stage
            _publish(stage, target)
        except OSError as err:
            raise output_error(target, err, what="bundle") from None
        except OutputError as err:  # a staged write (write_profile) names its temporary path: name the bundle
            raise OutputError(str(err).replace(str(stage), str(target))) from None
    except BaseException:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        for folder in created:
            shutil.rmtree(folder, ignore_errors=True)
        raise



def _publish(stage: Path, target: Path) -> None:
    for root, folders, files in os.walk(stage):
        for name in files:
            path = Path(root) / name
            os.chmod(path, 0o644)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        for name in folders:
            os.chmod(Path(root) / name, 0o755)
    os.chmod(stage, 0o755)
    fsync_dir(stage)
    if target.is_dir() and any(target.iterdir()):  # an earlier bundle (checked): swap it out, then drop it
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", suffix=".tmp", dir=target.parent))
        os.replace(target, old)
        try:
            os.replace(stage, target)
        except OSError:
            os.replace(old, target)  # put the earlier bundle back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, target)  # onto a missing or empty folder
    fsync_dir(target.parent)



# --- the banpick the bundle installs ----------------------------------------------------------------
def wheel_name(version: str = __version__) -> str:
    """Returns the file name of banpick's pure-Python wheel."""
    return f"banpick-{version}-py3-none-any.whl"


def source_tree() -> Path | None:
    """Returns the source checkout of this banpick, or None: the folder it runs from (a checkout or an
    editable install), else the local folder pip installed it from, if that still holds its pyproject.toml."""
    here = Path(__file__).resolve().parents[2]
    recorded = _installed_from()
    for root in (here, recorded if recorded is not None and recorded.is_dir() else None):
        if root is not None and _is_banpick_source(root):
            return root
    return None


def _is_banpick_source(root: Path) -> bool:
    try:
        text = (root / "pyproject.toml").read_text()
    except OSError:
        return False
    return '\nname = "banpick"' in text and (root / "banpick_cli" / "__init__.py").is_file()


def installed_wheel() -> Path | None:
    """Returns the wheel file this banpick was installed from, if pip recorded it and it is still there."""
    path = _installed_from()
    return path if path is not None and path.name == wheel_name() and path.is_file() else None


def _installed_from() -> Path | None:
    """Returns the local file or folder pip installed banpick from (its direct_url.json), or None."""
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    try:
        record = metadata.distribution("banpick").read_text("direct_url.json")
        url = json.loads(record or "{}").get("url", "")
    except (metadata.PackageNotFoundError, ValueError, AttributeError):
        return None
    parsed = urlparse(url)
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else None


def _bundle_wheel(folder: Path) -> dict[str, str]:
    """Puts banpick's wheel into `folder`; returns how it got there. Raises ExportError when it cannot."""
    folder.mkdir()
    source = source_tree()
    if source is None:
        found = installed_wheel()
        if found is None:
            raise ExportError(f"cannot put banpick {__version__} into the bundle: it was installed without its source "
                              "tree or a wheel file pip recorded; install it from a source checkout (pip install -e .) "
                              "or from a wheel file, then export again")
        shutil.copyfile(found, folder / found.name)
        return {"file": f"{WHEELS}/{found.name}", "sha256": sha256_of(folder / found.name), "from": f"copied {found}"}
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
               *(["--no-build-isolation"] if _has_build_backend() else []), "--wheel-dir", str(folder), str(source)]
    run = subprocess.run(command, capture_output=True, text=True)
    built = sorted(p.name for p in folder.iterdir())
    if run.returncode != 0 and "No space left on device" in run.stderr + run.stdout:  # the bundle's disk, not the build
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
    if run.returncode != 0 or built != [wheel_name()]:
        last = (run.stderr.strip().splitlines() or ["no output"])[-1][:200]
        what = f"it built {built}" if run.returncode == 0 else f"pip wheel exited {run.returncode}: {last}"
        raise ExportError(f"cannot build banpick {__version__}'s wheel from {source} ({what})")
    return {"file": f"{WHEELS}/{wheel_name()}", "sha256": sha256_of(folder / wheel_name()), "from": f"built from {source}"}


def _has_build_backend() -> bool:
    """Returns whether this environment holds the setuptools pyproject.toml asks for (then no isolated build env,
    which would need an index)."""
    from importlib import metadata

    try:
        major = int(metadata.version("setuptools").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return major >= 77


def _plans(profile: RoutingProfile, specs, method, domain, overrides, batch=False) -> dict[str, RoutingPlan]:
    """Returns the plans the bundle serves, keyed "method" or "method/domain"; validates the profile."""
    if method is not None:
        if domain == AUTO:
            if not get_method(method).takes_domain:
                raise BadSetting(f"domain 'auto' applies to methods that read key experts "
                                 f"({', '.join(names(lambda m: m.takes_domain))})")
            return {f"{method}/{d}": build_plan(profile, specs, method, d, batch_aware=batch, **overrides) for d in _auto_domains(profile)} or \
                _raise(ProfileError("domain auto needs key experts and usage counts of a domain: run `banpick profile` and `banpick kl-scan`"))
        plan = build_plan(profile, specs, method, domain, batch_aware=batch, **overrides)
        return {method if plan.domain is None else f"{method}/{plan.domain}": plan}
    # Serve-time choice: every served method that reads the profile and that it can serve, each domain with key
    # experts. Each gets the overrides it accepts; one no served method accepts, or a bad value, is refused.
    served = names(lambda m: m.engines and m.needs_profile)
    accepted = {name: set(get_method(name).params()) for name in served}
    unknown = sorted(set(overrides) - set().union(*accepted.values()))
    if unknown:
        raise BadSetting(f"--param {', '.join(unknown)}: no method the bundle serves has this hyperparameter ("
                         + "; ".join(f"{n}: {', '.join(sorted(a)) or 'none'}" for n, a in accepted.items()) + ")")
    plans: dict[str, RoutingPlan] = {}
    for candidate in served:
        for d in (profile.key_domains() if get_method(candidate).takes_domain else [None]):
            try:
                plans[candidate if d is None else f"{candidate}/{d}"] = build_plan(profile, specs, candidate, d, batch_aware=batch, **{
                    k: v for k, v in overrides.items() if k in accepted[candidate]})
            except ProfileError:  # the profile lacks what this method reads: the bundle serves the others
                continue
    if not plans:
        build_plan(profile, specs, names(lambda m: m.engines and m.prunes_by_token)[0])  # raises, naming the stage to run first
        raise ProfileError("the profile holds nothing a served method reads: run `banpick layer-sensitivity` or `kl-scan`")
    return plans


def _runtime_settings(profile, plans, method, domain, overrides, target) -> dict[str, Any]:
    served = {}
    for name, plan in plans.items():
        expected = expected_k(plan, profile)
        served[name] = {"method": plan.method, "domain": plan.domain, "hyperparameters": plan.params,
                        "changed_layers": sorted(plan.rules), "engine_slots": max_experts(plan),
                        "graph_safe": plan.graph_safe, "batch_aware": plan.batch,
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
    if source.batch.settings:  # the calibrated bound, for a runtime that turns the batch-aware step on itself
        compact.batch.set_settings(source.batch.settings)
    compact.settings["runtime"] = runtime
    compact.provenance = dict(source.provenance)
    return compact


def _manifest(source, compact, profile_file: Path, source_path, target, method, domain, overrides, runtime, model, *,
              wheel: dict[str, str] | None) -> dict:
    chosen = next(iter(runtime["served"].values())) if method is not None and domain != AUTO else None
    manifest = {
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
    batch = next((s.get("batch_aware") for s in runtime["served"].values() if s.get("batch_aware")), None)
    if batch is not None:  # the bound resolved at export (given, calibrated or top-2k), pinned for every runtime
        manifest["batch_aware"] = {k: batch[k] for k in ("candidates", "anchor")}
    if wheel is not None:
        manifest["wheel"] = wheel
    return manifest


def _write_snippets(stage: Path, manifest: dict, bundle_name: str) -> list[str]:

    files = {"README.md": readme(manifest, bundle_name), "Dockerfile.banpick": dockerfile(manifest),
             "serve.env": serve_env(manifest)}
    for name, text in files.items():
        (stage / name).write_text(text)
    return list(files)


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
