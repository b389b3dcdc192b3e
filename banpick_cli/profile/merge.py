"""Merge profiles of the same model: add usage counts from data shards, union domains."""

from __future__ import annotations

from copy import deepcopy

from banpick_cli.errors import ProfileError
from banpick_cli.profile.format import RoutingProfile, check_fingerprint
from banpick_cli.profile.stats import CandidateRule, candidate_mask

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
    for other, name in zip(profiles[1:], names[1:]):
        check_fingerprint(other, merged.fingerprint, path=name)
        shared = set(merged.domains()) & set(other.domains())
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
            rule = CandidateRule(**merged.settings.get(f"domain/{domain}", {}).get("candidates", {}))
            merged.put(
                f"domain/{domain}/candidates",
                candidate_mask(merged.tensors[f"domain/{domain}/expert_counts"], merged.tensors[f"domain/{domain}/token_counts"], rule),
            )
        for key, record in other.provenance.items():
            if key in merged.provenance:
                merged.provenance[key] = {"merged": _as_list(merged.provenance[key]) + _as_list(record)}
            else:
                merged.provenance[key] = record
        for key, value in other.settings.items():
            merged.settings.setdefault(key, value)
    return merged


def _same(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a != a) & (b != b)).all())


def _as_list(record: dict) -> list:
    return record["merged"] if set(record) == {"merged"} else [record]
