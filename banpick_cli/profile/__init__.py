"""The routing-profile format: schema, read/validate/write, fingerprint check, merge."""

from banpick_cli.profile.format import (
    FORMAT_NAME,
    SCHEMA_VERSION,
    RoutingProfile,
    check_fingerprint,
    new_profile,
    read_metadata,
    read_profile,
    write_profile,
)
from banpick_cli.profile.merge import merge_profiles
from banpick_cli.profile.stats import CandidateRule, candidate_mask, usage_frequency, usage_ratio

__all__ = [
    "FORMAT_NAME",
    "SCHEMA_VERSION",
    "CandidateRule",
    "RoutingProfile",
    "candidate_mask",
    "check_fingerprint",
    "merge_profiles",
    "new_profile",
    "read_metadata",
    "read_profile",
    "usage_frequency",
    "usage_ratio",
    "write_profile",
]
