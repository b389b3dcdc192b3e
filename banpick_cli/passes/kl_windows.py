"""Where a layer-major KL scan (passes/kl.py) keeps its hidden states: windows and state tiers.

The calibration batches are cut into windows whose states (the unmodified model's and every variant's)
fit `hidden_cache_mb`; within a window the variants' states are held on the run device, then the CPU
on a GPU run, then on disk. `WindowSums` is what the finished windows have summed: enough to resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from banpick_cli.passes.batches import Batch


@dataclass
class WindowSums:
    """What a layer-major run has summed over its finished windows: enough to resume after them.

    The float64 sums are added batch by batch in the engine's batch order, and a batch's numbers do not
    depend on which window holds it (a window only decides how long states are kept and where, never
    how a batch is cut into forwards), so resuming from these sums gives the uninterrupted run's bits.
    """

    batches: int  # calibration batches finished: a prefix of the engine's batch order
    windows: int  # windows finished
    tokens: int  # real tokens in those batches
    kl_sums: torch.Tensor  # [variants] float64: summed top-k KL, plans by position, variants as given


def cut_windows(all_batches: list[Batch], token_bytes: int, budget: int, window_batches: int) -> list[list[Batch]]:
    """Returns the batches cut into windows whose states (`token_bytes` per token) fit `budget` bytes,
    of at most `window_batches` batches each when set (0: no limit)."""
    if not all_batches:
        return []
    windows: list[list[Batch]] = [[]]
    used = 0
    for batch in all_batches:
        size = batch.input_ids.numel() * token_bytes
        full = window_batches and len(windows[-1]) >= window_batches
        if windows[-1] and (used + size > budget or full):
            windows.append([])
            used = 0
        windows[-1].append(batch)
        used += size
    return windows


def state_tiers(device: torch.device, hidden_cache_mb: int) -> list[tuple[torch.device, int]]:
    """Returns the (device, byte budget) tiers for a window's states, in the order they are tried."""
    budget = hidden_cache_mb * 2**20
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return [(device, free // 4), (torch.device("cpu"), budget)]
    return [(device, budget)]


class WindowStates:
    """The variants' hidden states of one window: in memory up to a budget per tier, then on disk.

    Tiers are tried in order (the run device, then the CPU on a GPU run); what fits none goes to a
    temporary folder and is read back when its variant next runs.
    """
    def __init__(self, tiers: list[tuple[torch.device, int]]):
        self.tiers = tiers
        self.used = [0] * len(tiers)
        self.held: dict[Any, tuple[int, torch.Tensor | str]] = {}
        self.folder: str | None = None
        self.spilled = 0  # tensors written to disk

    def put(self, key: Any, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        for t, (device, budget) in enumerate(self.tiers):
            if self.used[t] + size <= budget:
                self.used[t] += size
                self.held[key] = (t, tensor.to(device))
                return
        import os
        import tempfile

        self.folder = self.folder or tempfile.mkdtemp(prefix="banpick-states-")
        path = os.path.join(self.folder, f"{len(self.held)}-{self.spilled}.pt")
        torch.save(tensor.cpu().clone(), path)  # a view would save its whole stacked storage
        self.spilled += 1
        self.held[key] = (-1, path)

    def pop(self, key: Any) -> torch.Tensor:
        tier, value = self.held.pop(key)
        if tier >= 0:
            self.used[tier] -= value.numel() * value.element_size()
            return value
        import os

        tensor = torch.load(value, weights_only=True)
        os.unlink(value)
        return tensor

    def close(self) -> None:
        self.held.clear()
        if self.folder is not None:
            import shutil

            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
