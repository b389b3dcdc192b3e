"""`--dry-run` of `profile`, `kl-scan` and `layer-sensitivity`: what a run will do, hold and take, from the
model's config alone (passes/cost.py), before any weights or data are read and without writing anything.

Also the memory check behind choosing `--stream` when the model does not fit this machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from banpick_cli.passes.cost import MODES, Cost, Timing, plan_cost, probe
from banpick_cli.stages.common import TextSettings


@dataclass
class RunEstimate:
    """A run's counts, peak memory and time per mode (whole model, --sequential, --stream), and this machine's memory."""

    command: str
    model: str
    device: str
    dtype: str
    cost: Cost
    timing: Timing | None
    seconds: dict[str, float]  # per mode; empty without a probe
    available: dict[str, int]  # bytes free now: "cpu", and "device" on a GPU
    modes: tuple[str, ...]  # the modes this command offers
    fits: dict[str, bool] = field(default_factory=dict)  # per mode: the peak fits the available memory
    runtime: int = 0  # bytes this process holds now (Python, torch, transformers, datasets, the config): measured

    @property
    def forwards(self) -> float:
        """Returns the decoder work in full-model forwards of one batch (layer runs / decoder layers)."""
        return self.cost.layer_runs / max(self.cost.shape.layers, 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "command": self.command, "model": self.model, "device": self.device, "dtype": self.dtype,
            **self.cost.as_dict(), "forwards": round(self.forwards, 2), "weights_bytes": weights_bytes(self.cost),
            "seconds": {m: round(s, 2) for m, s in self.seconds.items()}, "available_bytes": self.available,
            "modes": list(self.modes), "fits": self.fits, "timing": None if self.timing is None else vars(self.timing),
            "stream_cpu_peak_bytes": self.stream_cpu_peak, "stream_cpu_peak_basis": self.stream_basis(),
            "seconds_basis": self.time_basis(), "cpu_only": self.cpu_only,
        }

    @property
    def cpu_only(self) -> bool:
        """Returns whether the run has no accelerator: its "device" memory is CPU memory too."""
        return "device" not in self.available

    def time_basis(self) -> str:
        """Returns how the time estimate was made: the counts, the rates timed here, and what it assumes."""
        t, cost = self.timing, self.cost
        if t is None:
            return "no time estimate (nothing was timed)"
        loads = ""
        if "stream" in self.modes and cost.layer_loads["stream"]:
            loads = f" (+ {cost.layer_loads['stream']:,} layer reads x {t.load_s:.3g} s with --stream)"
        return (f"{cost.layer_runs:,} decoder-layer runs x {t.layer_s:.3g} s + {cost.head_runs:,} LM-head runs x "
                f"{t.head_s:.3g} s{loads}, each rate timed here on {t.device} (the fastest of {t.runs} runs of one "
                f"{t.batch_size}x{t.seq_len}-token batch through one layer of this model's shape, random weights); "
                f"every text is counted at --seq-len {t.seq_len} tokens, so shorter texts and a busy machine move it: "
                "an estimate to the nearest factor of 2, not a promise")

    @property
    def stream_cpu_peak(self) -> int:
        """Returns the process's peak CPU memory of a --stream run: the runtime measured here, plus one decoder
        layer (read straight into place), the resident parts, the hidden states and, on a CPU, one forward's
        activations."""
        return self.runtime + self.cost.peak_bytes["stream"]["cpu"]

    def stream_basis(self) -> str:
        """Returns what the --stream CPU peak is made of, and what each part was measured or computed on."""
        shape, mib = self.cost.shape, lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
        on_cpu = self.cost.activations if self.cpu_only else 0
        layer = max(range(shape.layers), key=lambda i: shape.layer_params[i])
        return (f"runtime {mib(self.runtime)} (this process's resident memory now, measured: Python, torch, "
                "transformers, datasets) "
                f"+ the largest decoder layer {mib(shape.layer_params[layer] * shape.bytes_per_param)} (layer {layer}, "
                f"from the config in {self.dtype}) + embedding, routers, LM head and hidden states "
                f"{mib(self.cost.peak_bytes['stream']['cpu'] - shape.layer_params[layer] * shape.bytes_per_param - on_cpu)}"
                + (f" + one forward's activations {mib(on_cpu)}" if on_cpu else ""))


def weights_bytes(cost: Cost) -> int:
    """Returns the bytes of the model's weights in the run's dtype."""
    return cost.shape.params * cost.shape.bytes_per_param


def available_memory(device: torch.device) -> dict[str, int]:
    """Returns the bytes free now: "cpu" (MemAvailable, else physical pages free) and "device" on a GPU."""
    found = {"cpu": _cpu_available()}
    if device.type == "cuda":
        found["device"] = int(torch.cuda.mem_get_info(device)[0])
    return found


def _cpu_available() -> int:
    found = _proc_bytes("/proc/meminfo", "MemAvailable:")
    if found is not None:
        return found
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def estimate_run(command: str, settings: TextSettings, *, model: str, device: str = "auto", dtype: str = "auto",
                 profile: str | Path | None = None, checkpoint_every: int = 32, time_it: bool = True) -> RunEstimate:
    """Returns what `command` would do with these settings: counts, peak memory and time per mode.

    Reads the model's config (and for kl-scan the profile's candidates); `time_it` runs `probe` (one
    decoder layer of the model's shape with random weights, the LM head, and one layer read from a local
    checkpoint). The sample count is an upper bound: a data source with fewer texts runs fewer batches.
    """
    from banpick_cli.models.loading import check_model, resolve_device, resolve_dtype

    resolved, config, _ = check_model(model)
    run_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, run_device)
    variants = _variants(command, settings, profile)
    cost = plan_cost(config, command=command, samples=settings.samples, seq_len=settings.seq_len,
                     batch_size=settings.batch_size, variants_by_layer=variants,
                     hidden_cache_mb=getattr(settings, "hidden_cache_mb", 2048), checkpoint_every=checkpoint_every,
                     window_batches=getattr(settings, "checkpoint_every", 0) if command != "profile" else 0,
                     dtype=torch_dtype, device=run_device.type)
    modes = MODES if command == "profile" else ("whole", "stream")
    try:  # every run reads its texts through datasets (data/loading.py): about 85 MiB of the runtime
        import datasets  # noqa: F401
    except ImportError:
        pass  # the run itself will name the extra that adds it
    runtime = resident_bytes()  # before the probe allocates its layer
    timing, seconds = None, {}
    if time_it:
        folder = Path(resolved)
        checkpoint = folder if folder.is_dir() and any(folder.glob("*.safetensors")) else None
        timing = probe(config, batch_size=settings.batch_size, seq_len=settings.seq_len, device=run_device,
                       dtype=torch_dtype, checkpoint=checkpoint)
        seconds = {mode: cost.seconds(timing, mode) for mode in modes}
    available = available_memory(run_device)
    fits = {mode: _fits(cost, mode, available) for mode in modes}
    return RunEstimate(command, model, str(run_device), str(torch_dtype).replace("torch.", ""), cost, timing, seconds,
                       available, modes, fits, runtime=runtime)


def resident_bytes() -> int:
    """Returns this process's resident memory now (VmRSS), 0 where /proc is missing."""
    return _proc_bytes("/proc/self/status", "VmRSS:") or 0


def _proc_bytes(path: str, key: str) -> int | None:
    """Returns the kB figure on the line of a /proc file that starts with `key`, in bytes, or None."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(key):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return None


def _fits(cost: Cost, mode: str, available: dict[str, int]) -> bool:
    peak = cost.peak_bytes[mode]
    if "device" not in available:  # a CPU run: device and CPU memory are the same
        return peak["cpu"] + peak["device"] <= available["cpu"]
    return peak["cpu"] <= available["cpu"] and peak["device"] <= available["device"]


def _variants(command: str, settings: TextSettings, profile: str | Path | None) -> dict[int, int] | None:
    """Returns decoder-layer index -> variants: kl-scan's candidates from the profile; None otherwise."""
    if command != "kl-scan":
        return None
    from banpick_cli.profile.format import read_profile
    from banpick_cli.stages.kl_scan import scanned_experts

    prof = read_profile(Path(profile))
    per_position = scanned_experts(prof, settings).sum(dim=1).tolist()
    return {prof.model.moe_layers[p]: int(n) for p, n in enumerate(per_position) if n}


def needs_stream(model: str, *, device: str = "auto", dtype: str = "auto") -> tuple[bool, int, int]:
    """Returns (the weights do not fit the memory free now, weights bytes, free bytes), from the config alone.

    On a GPU the weights must fit the device; on a CPU, the CPU's free memory.
    """
    from banpick_cli.models.loading import check_model, resolve_device, resolve_dtype

    _, config, _ = check_model(model)
    run_device = resolve_device(device)
    cost = plan_cost(config, command="profile", samples=1, seq_len=2, batch_size=1,
                     dtype=resolve_dtype(dtype, run_device))
    free = available_memory(run_device)
    room = free.get("device", free["cpu"])
    need = weights_bytes(cost)
    return need > room, need, room
