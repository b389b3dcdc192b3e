"""Merge profiles of the same model: add usage counts from data shards, union domains."""

from __future__ import annotations

import os
from copy import deepcopy
from pathlib import Path

from banpick_cli.errors import BadSetting, ProfileError
from banpick_cli.profile.format import RoutingProfile, check_fingerprint
from banpick_cli.profile.stats import candidate_mask

ADDITIVE = ("expert_counts", "token_counts")


def merge_profiles(profiles: list[RoutingProfile], *, names: list[str] | None = None) -> RoutingProfile:
    """Returns one profile: counts of shared domains added, candidates recomputed, other domains copied.

    Stage results that are not plain sums (KL, gains, key experts, layer sensitivity) are kept when
    only one input has them and refused when two disagree, since they cannot be added.
    """
    if not profiles:
        raise ProfileError("nothing to merge")
    names = names or [f"profile {i + 1}" for i in range(len(profiles))]
    merged = deepcopy(profiles[0])
    for i, (other, name) in enumerate(zip(profiles[1:], names[1:]), start=1):
        check_fingerprint(other, merged.fingerprint, path=name)
        shared = set(merged.domains()) & set(other.domains())
        for domain in sorted(shared):
            _check_shard(merged, other, domain, names[:i], name)
        for key, tensor in other.tensors.items():
            parts = key.split("/")
            if parts[0] == "domain" and parts[1] in shared and parts[2] in ADDITIVE:
                merged.tensors[key] = merged.tensors[key] + tensor
            elif parts[0] == "domain" and parts[1] in shared and parts[2] == "candidates":
                continue
            elif key in merged.tensors and not _same(merged.tensors[key], tensor):
                raise ProfileError(f"cannot merge '{key}': both profiles hold different values; rerun its stage on the merged profile")
            else:
                merged.tensors[key] = tensor.clone()
        for domain in shared:
            view = merged.domain(domain)
            view.put("candidates", candidate_mask(view.expert_counts, view.token_counts, view.candidate_rule()))
        for key, record in other.provenance.items():
            if key in merged.provenance:
                merged.provenance[key] = {"merged": _as_list(merged.provenance[key]) + _as_list(record)}
            else:
                merged.provenance[key] = record
        for key, value in other.settings.items():
            merged.settings.setdefault(key, value)
    return merged


def _check_shard(merged: RoutingProfile, other: RoutingProfile, domain: str, before: list[str], name: str) -> None:
    """Raises unless `other`'s counts of `domain` are a new shard: not a run already in `merged` (which
    would count its tokens twice), and made with the same candidate rule (else one would be dropped)."""
    key = f"profile/{domain}"
    seen = _as_list(merged.provenance.get(key, {})) if key in merged.provenance else []
    for record in _as_list(other.provenance[key]) if key in other.provenance else []:
        if "finished_utc" in record and record in seen:  # a record stamps one run: command, time, tokens
            first = ", ".join(before) if len(before) == 1 else "an earlier input"
            raise ProfileError(f"{name} holds the same '{domain}' run as {first} (finished {record.get('finished_utc', '?')}): "
                               "merging it would count its tokens twice")
    mine = merged.domain(domain).candidate_rule()
    theirs = other.domain(domain).candidate_rule()
    if mine != theirs:
        raise ProfileError(f"cannot merge domain '{domain}': {name} marks candidates with ratio {theirs.min_ratio:g}, "
                           f"top {theirs.top_n}, the others with ratio {mine.min_ratio:g}, top {mine.top_n}; "
                           "profile every shard with the same --candidate-ratio and --candidate-top")



def merge_files(inputs: list[str | os.PathLike], out: str | os.PathLike) -> RoutingProfile:
    """Merges the profiles at `inputs` into `out` (written atomically); returns the merged profile.

    `out` is checked before anything is read: it may not be one of the inputs (the same path twice
    is refused too), and its folder must be writable.
    """
    from banpick_cli.outputs import check_output
    from banpick_cli.profile.format import read_profile, write_profile

    if len(inputs) < 2:
        raise BadSetting("merge needs at least two profiles")
    paths = [Path(p) for p in inputs]
    for i, path in enumerate(paths):
        for earlier in paths[:i]:
            if path.resolve() == earlier.resolve() or (path.exists() and earlier.exists() and os.path.samefile(path, earlier)):
                raise BadSetting(f"{path} is given twice: merging it with itself would count its tokens twice")
    check_output(out, kind="file", inputs=paths, flag="--out")
    merged = merge_profiles([read_profile(p) for p in paths], names=[str(p) for p in paths])
    write_profile(merged, out)
    return merged


def _same(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a != a) & (b != b)).all())


def _as_list(record: dict) -> list:
    return record["merged"] if set(record) == {"merged"} else [record]
