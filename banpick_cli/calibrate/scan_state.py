"""Per-layer checkpoints of the sensitivity scans (kl-scan, layer-sensitivity), kept in the profile itself.

As each layer finishes, its row goes into a `partial/<stage>...` tensor of the output profile and the
layer's position into `settings["partial/<stage>"]["layers_done"]`, stamped with the run's identity:
a hash of the model's router fingerprint, the calibration texts, and every setting that changes the
numbers. A rerun with the same identity skips the finished layers; any other identity (a changed
setting, other data, `--restart`) starts afresh, so stale rows never mix with new ones. The stage's
final tensors are written only when every layer is done, and the partial entries are then removed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from banpick_cli.calibrate.checkpoint import digest
from banpick_cli.profile.format import RoutingProfile, read_profile, write_profile


def run_identity(**parts: Any) -> str:
    """Returns "sha256:<hex>" of everything that decides a scan's numbers (JSON, keys sorted)."""
    return digest(parts)


def mask_digest(mask: torch.Tensor) -> str:
    """Returns a short hash of a bool mask (which experts a scan covers)."""
    return hashlib.sha256(mask.to(torch.uint8).cpu().numpy().tobytes()).hexdigest()[:16]


@dataclass
class LayerCheckpoint:
    """The finished layers of one scan run, and how to save one more into the output profile."""

    profile: RoutingProfile
    out: Path
    stage: str  # settings key after "partial/": "kl-scan/math", "layer-sensitivity"
    tensor: str  # the partial tensor's name
    run: str
    values: torch.Tensor  # [moe_layers, ...] float32, NaN where not done
    done: list[int] = field(default_factory=list)

    @classmethod
    def resume(
        cls,
        profile: RoutingProfile,
        *,
        out: Path,
        stage: str,
        tensor: str,
        run: str,
        empty: torch.Tensor,
        source: RoutingProfile | None = None,
        restart: bool = False,
    ) -> "LayerCheckpoint":
        """Returns the checkpoint of this run found in `source` (default `profile`), or a fresh one."""
        source = source or profile
        saved = source.settings.get(f"partial/{stage}")
        if not restart and saved and saved.get("run") == run and tensor in source.tensors:
            done = sorted(int(p) for p in saved.get("layers_done", []))
            return cls(profile, out, stage, tensor, run, source.tensors[tensor].clone(), done)
        return cls(profile, out, stage, tensor, run, empty.clone(), [])

    def save(self, position: int, row: torch.Tensor) -> None:
        """Stores one finished layer and writes the profile atomically."""
        self.values[position] = row.to(self.values.dtype)
        self.done = sorted({*self.done, position})
        self.profile.put(self.tensor, self.values)
        self.profile.settings[f"partial/{self.stage}"] = {"run": self.run, "layers_done": self.done}
        write_profile(self.profile, self.out)

    def clear(self) -> None:
        """Removes the partial entries from the profile (the stage then writes its final tensors)."""
        self.profile.tensors.pop(self.tensor, None)
        self.profile.settings.pop(f"partial/{self.stage}", None)


def previous_output(out: Path, source: Path, fingerprint: str) -> RoutingProfile | None:
    """Returns the existing `--out` profile when it is not the input (an interrupted run saved there)."""
    if out.resolve() == source.resolve() or not out.exists():
        return None
    return read_profile(out, fingerprint=fingerprint)
