"""Typed access to what a profile holds: a domain's tensors and settings, and Ban's.

Every tensor name and settings key of the format is spelled here and in format.py's schema, nowhere
else: stages, runtimes and reports read `profile.domain("math").kl` and `profile.ban.layer_sensitivity`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

from banpick_cli.checks import domain_name

if TYPE_CHECKING:
    from banpick_cli.profile.stats import CandidateRule


class Holder(Protocol):
    """What a view reads and writes of its profile (format.RoutingProfile, which builds the views)."""

    tensors: dict[str, torch.Tensor]
    settings: dict[str, Any]

    def get(self, name: str) -> torch.Tensor: ...

    def put(self, name: str, tensor: torch.Tensor) -> None: ...

DOMAIN_PARTS = ("expert_counts", "token_counts", "candidates", "kl", "accuracy_gain", "key_experts")
# What a new usage count makes stale: a domain's scans and key experts were computed on the old counts.
DEPENDENT_ON_USAGE = ("kl", "accuracy_gain", "key_experts")
BAN_PARTS = ("layer_kl", "layer_sensitivity", "ratio_min", "ratio_max", "ratio_hist")
BATCH = "batch"  # settings key of the batch-aware step (evaluation/batch_calib.py)


class _Group:
    """Tensors under one prefix of a profile (`domain/<name>/` or `ban/`)."""

    parts: tuple[str, ...] = ()

    def __init__(self, profile: Holder, prefix: str):
        self._profile, self._prefix = profile, prefix

    def name_of(self, part: str) -> str:
        """Returns the tensor name of `part` in the file (for messages and the schema)."""
        if part not in self.parts:
            raise KeyError(f"'{part}' is not one of {self.parts}")
        return self._prefix + part

    def has(self, part: str) -> bool:
        return self.name_of(part) in self._profile.tensors

    def get(self, part: str) -> torch.Tensor:
        """Returns the tensor, or raises a one-line error naming the stage that writes it."""
        return self._profile.get(self.name_of(part))

    def find(self, part: str) -> torch.Tensor | None:
        """Returns the tensor, or None when the profile does not hold it."""
        return self._profile.tensors.get(self.name_of(part))

    def put(self, part: str, tensor: torch.Tensor) -> None:
        self._profile.put(self.name_of(part), tensor)

    def drop(self, part: str) -> bool:
        """Removes the tensor; returns whether it was there."""
        return self._profile.tensors.pop(self.name_of(part), None) is not None

    def present(self) -> list[str]:
        """Returns the parts this profile holds, in schema order."""
        return [part for part in self.parts if self.has(part)]


class DomainView(_Group):
    """One domain: usage counts and candidates (profile), KL (kl-scan), gains (failure-probe), key experts."""

    parts = DOMAIN_PARTS

    def __init__(self, profile: Holder, name: str):
        super().__init__(profile, f"domain/{domain_name(name)}/")
        self.name = name

    expert_counts = property(lambda self: self.get("expert_counts"))  # int64 [M, E]
    token_counts = property(lambda self: self.get("token_counts"))  # int64 [M]
    candidates = property(lambda self: self.get("candidates"))  # bool [M, E]
    kl = property(lambda self: self.get("kl"))  # float32 [M, E], NaN where not scanned
    accuracy_gain = property(lambda self: self.get("accuracy_gain"))  # float32 [M, E]
    key_experts = property(lambda self: self.get("key_experts"))  # bool [M, E]

    @property
    def settings(self) -> dict[str, Any]:
        """Returns (creating it) the domain's settings record: its candidate rule and key-expert rule."""
        return self._profile.settings.setdefault(f"domain/{self.name}", {})

    def key_source(self) -> str | None:
        """Returns the stage whose rule chose the stored key experts: "failure-probe" (its key experts) or
        "kl-scan" (its high-KL candidates, which Pick reads until failure-probe runs); None when unrecorded."""
        return self._profile.settings.get(f"domain/{self.name}", {}).get("key_experts", {}).get("source")

    def recorded_pick(self) -> dict[str, Any]:
        """Returns the recorded Pick settings without creating an empty record."""
        return dict(self._profile.settings.get(f"pick/{self.name}", {}))

    def set_pick(self, record: dict[str, Any]) -> None:
        self._profile.settings[f"pick/{self.name}"] = record

    def store_usage(self, expert_counts: torch.Tensor, token_counts: torch.Tensor, rule: "CandidateRule") -> list[str]:
        """Stores new usage counts and their candidates; drops what the old counts made. Returns the dropped
        tensor names."""
        from banpick_cli.profile.stats import candidate_mask

        dropped = [self.name_of(part) for part in DEPENDENT_ON_USAGE if self.drop(part)]
        self.put("expert_counts", expert_counts)
        self.put("token_counts", token_counts)
        self.put("candidates", candidate_mask(expert_counts, token_counts, rule))
        self._profile.settings[f"domain/{self.name}"] = {"candidates": rule.to_dict()}
        return dropped

    def candidate_rule(self) -> "CandidateRule":
        from banpick_cli.profile.stats import CandidateRule

        return CandidateRule(**self._profile.settings.get(f"domain/{self.name}", {}).get("candidates", {}))


class BanView(_Group):
    """Ban's calibration (layer-sensitivity): per-layer KL, L'_l, R_min/R_max and the ratio histogram."""

    parts = BAN_PARTS

    def __init__(self, profile: Holder):
        super().__init__(profile, "ban/")

    layer_kl = property(lambda self: self.get("layer_kl"))  # float32 [M]
    layer_sensitivity = property(lambda self: self.get("layer_sensitivity"))  # float32 [M]: L'_l
    ratio_min = property(lambda self: self.get("ratio_min"))  # float32 [M]
    ratio_max = property(lambda self: self.get("ratio_max"))  # float32 [M]
    ratio_hist = property(lambda self: self.get("ratio_hist"))  # int64 [M, bins]

    @property
    def settings(self) -> dict[str, Any]:
        """Returns the settings layer-sensitivity recorded (k_min, lam, beta, ratio_k_num, ...), or {}."""
        stored = dict(self._profile.settings.get("ban", {}))
        if "lambda" in stored:  # profiles before 0.1.1 spelt Ban's strength as on the command line
            stored.setdefault("lam", stored.pop("lambda"))
        return stored

    def set_settings(self, record: dict[str, Any]) -> None:
        self._profile.settings["ban"] = record


class BatchView:
    """The batch-aware step's settings: its candidate bound, calibrated on calibration text (no tensors)."""

    def __init__(self, profile: Holder):
        self._profile = profile

    @property
    def settings(self) -> dict[str, Any]:
        """Returns what calibration recorded (candidates, anchor, batch_size, share, ...), or {}."""
        return dict(self._profile.settings.get(BATCH, {}))

    @property
    def candidates(self) -> int | None:
        """Returns the calibrated candidate bound, or None when the profile has none."""
        value = self._profile.settings.get(BATCH, {}).get("candidates")
        return int(value) if value is not None else None

    def set_settings(self, record: dict[str, Any]) -> None:
        self._profile.settings[BATCH] = record

