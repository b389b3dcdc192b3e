"""Data-parallel calibration on torch.distributed: which rank this is, its shard, exact reductions.

Under `torchrun --nproc-per-node N banpick <stage> ...` every rank runs the same command on its shard
of the calibration batches; the sums are all-reduced and rank 0 writes the profile. Reductions are
exact by construction: integer sums and counts are reduced as int64 (float sums as float64), minima
and maxima with MIN and MAX, and a mean is always a reduced sum over a reduced count, never a mean of
per-rank means.

    dist = init_from_env()                  # world 1 (no-op) outside torchrun
    mine = dist.shard(num_batches)          # batch i goes to rank i % world
    dist.sum_(counts); dist.min_(r_min); dist.max_(r_max)
    if dist.is_main: write_profile(...)
    dist.barrier(); dist.close()
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from banpick_cli.errors import BadSetting

_EXACT_SUM = {torch.float16: torch.float64, torch.bfloat16: torch.float64, torch.float32: torch.float64,
              torch.int8: torch.int64, torch.int16: torch.int64, torch.int32: torch.int64, torch.uint8: torch.int64,
              torch.bool: torch.int64}


@dataclass
class Dist:
    """This process's place in a data-parallel run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""
    owns_group: bool = False  # this object initialised the process group and closes it

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> list[int]:
        """Returns this rank's items of range(n): every world-th one, starting at its rank.

        Round-robin over whole batches keeps every batch exactly as a single process would build it,
        so the summed counts equal a one-process run's bit for bit.
        """
        return list(range(self.rank, n, self.world))

    # --- reductions (in place; each returns its tensor) -----------------------------------------
    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduces a sum exactly: small ints as int64, floats as float64; the result keeps that dtype."""
        wide = _EXACT_SUM.get(tensor.dtype, tensor.dtype)
        if wide != tensor.dtype:
            raise ValueError(f"reduce a {tensor.dtype} sum as {wide}: convert it first (exact sums only)")
        return self._reduce(tensor, "SUM")

    def min_(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, "MIN")

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, "MAX")

    def mean(self, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Returns the global mean: the reduced sum over the reduced count (reduces both in place)."""
        self.sum_(total)
        self.sum_(count)
        return total / count.clamp(min=1)

    def agree(self, ok: bool) -> bool:
        """Returns True only if every rank passed `ok` (so all ranks stop together on a bad input)."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
        return bool(self._reduce(flag, "MIN").item())

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()

    def close(self) -> None:
        """Destroys the process group if this object created it."""
        if self.owns_group:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()
            self.owns_group = False

    def _reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        if not self.active:
            return tensor
        import torch.distributed as td

        # NCCL reduces CUDA tensors only, gloo CPU tensors only; move there and back.
        where = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        work = tensor if tensor.device == where else tensor.to(where)
        td.all_reduce(work, op=getattr(td.ReduceOp, op))
        if work is not tensor:
            tensor.copy_(work.to(tensor.device))
        return tensor


def world_from_env() -> tuple[int, int, int]:
    """Returns (rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise BadSetting("WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them)") from None
    return rank, world, local


def init_from_env(backend: str | None = None) -> Dist:
    """Joins torchrun's process group if there is one; returns this process's Dist (world 1 otherwise).

    The backend is NCCL when CUDA is available, else gloo (CPU); an already initialised group is
    reused and left open.
    """
    rank, world, local = world_from_env()
    if world <= 1:
        return Dist()
    import torch.distributed as td

    if td.is_initialized():
        return Dist(td.get_rank(), td.get_world_size(), local, td.get_backend(), owns_group=False)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local)
    td.init_process_group(backend=backend)
    return Dist(td.get_rank(), td.get_world_size(), local, backend, owns_group=True)
