"""Resuming, one scheme for every stage: partial results in a sidecar file next to the output.

A pass over many batches saves what it has summed so far, every N batches, to a sidecar
(`<output>.<stage>-<tag>.partial`), stamped with a fingerprint of everything that decides the result:
the model's router fingerprint, the calibration data, the stage's settings. A rerun whose fingerprint
matches resumes after the last saved batch window; any other fingerprint starts afresh (and the stale
sidecar is overwritten), so a changed setting never mixes with stale partial results. The stage removes
the sidecar once its profile is written.

    fp = run_fingerprint(model=loaded.fingerprint, data=texts_digest(texts), settings=asdict(settings))
    sidecar = Sidecar(out, "kl-scan", "math", fp)
    partial = sidecar.load()            # None: nothing to resume (missing, unreadable or stale)
    ...                                 # start after partial.done units, from partial.tensors
    sidecar.save(Partial(done, {"kl_sum": kl_sum}, {"tokens": tokens}))
    ...
    write_profile(profile, out); sidecar.remove()

The scans (kl-scan, layer-sensitivity) save their KL sums per window of batches through
`WindowCheckpoint`, a sidecar of the same kind; `profile` and `failure-probe` save their sums per batch
window directly.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

SIDECAR_FORMAT = "banpick.partial"


def digest(value: Any) -> str:
    """Returns "sha256:<hex>" of a JSON-able value (keys sorted, so dict order does not matter)."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def texts_digest(texts: Sequence[str]) -> str:
    """Returns "sha256:<hex>" of calibration texts, in order (each length-prefixed, so splits differ)."""
    h = hashlib.sha256()
    for text in texts:
        raw = text.encode("utf-8", "surrogatepass")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return "sha256:" + h.hexdigest()


def run_fingerprint(*, model: str, data: str, settings: Mapping[str, Any], **extra: Any) -> str:
    """Returns the fingerprint a sidecar is stamped with: model + data + settings (+ anything else)."""
    return digest({"model": model, "data": data, "settings": dict(settings), **extra})


@dataclass
class Partial:
    """What a pass has finished: `done` units (batches), their summed tensors, and JSON-able state."""

    done: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


def sidecar_path(out: str | os.PathLike, stage: str, tag: str) -> Path:
    """Returns where a stage's partial results for `tag` (a domain, a rank; "" for none) live next to `out`."""
    target = Path(out)
    return target.with_name(f"{target.name}.{stage}{'-' + tag if tag else ''}.partial")


def read_sidecar(path: str | os.PathLike, fingerprint: str | None = None) -> Partial | None:
    """Returns the partial results in a sidecar file (of the run with `fingerprint`, when given), or None
    when it is missing, torn, foreign or of another run."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != SIDECAR_FORMAT or fingerprint not in (None, meta.get("fingerprint")):
                return None
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        return Partial(int(meta["done"]), tensors, json.loads(meta.get("state", "{}")))
    except Exception:  # a torn or foreign file is never trusted; the run starts afresh
        return None


class Sidecar:
    """The partial-results file of one stage run; every write is atomic (temporary file, then rename)."""

    def __init__(self, out: str | os.PathLike, stage: str, tag: str, fingerprint: str):
        self.path = sidecar_path(out, stage, tag)
        self.fingerprint = fingerprint
        self.stale = False  # set by load(): a sidecar existed but belonged to another run
        self.saved: int | None = None  # units (batches, candidates) this run's file holds: loaded or last saved

    def load(self) -> Partial | None:
        """Returns the saved partial results of this same run, or None (missing, unreadable or stale)."""
        self.stale = False
        if not self.path.is_file():
            return None
        found = read_sidecar(self.path, self.fingerprint)
        self.stale = found is None
        self.saved = found.done if found is not None else None
        return found

    def save(self, partial: Partial) -> None:
        """Writes the partial results atomically, so a kill at any moment leaves the last good window.

        A failed write (full disk) raises a one-line OutputError and leaves the previous window intact.
        """
        from safetensors.torch import save

        from banpick_cli.outputs import write_bytes_atomic

        meta = {"format": SIDECAR_FORMAT, "fingerprint": self.fingerprint, "done": str(int(partial.done)),
                "state": json.dumps(partial.state, sort_keys=True)}
        tensors = {k: v.detach().cpu().contiguous() for k, v in partial.tensors.items()}
        write_bytes_atomic(self.path, save(tensors, metadata=meta), what="checkpoint")
        self.saved = int(partial.done)

    def remove(self) -> None:
        """Deletes the sidecar (after the stage's own output is safely written)."""
        self.path.unlink(missing_ok=True)


def mask_digest(mask: torch.Tensor) -> str:
    """Returns a short hash of a bool mask (which experts a scan covers)."""
    return hashlib.sha256(mask.to(torch.uint8).cpu().numpy().tobytes()).hexdigest()[:16]


class WindowCheckpoint:
    """The finished windows of one layer-major scan (passes/kl.py): its `WindowSums` and any tensors the
    stage keeps beside them (an observer's state), saved to a sidecar after every window.

    A rerun with the same fingerprint resumes after the saved windows; any other fingerprint, a sidecar
    whose sums do not fit the run, or `restart` starts afresh (`stale` says a sidecar was discarded).
    """

    def __init__(self, out: str | os.PathLike, stage: str, tag: str, fingerprint: str, *, restart: bool = False):
        self.sidecar = Sidecar(out, stage, tag, fingerprint)
        self.saved = None if restart else self.sidecar.load()
        self.stale = self.sidecar.stale
        self.windows = 0  # finished windows, saved or resumed

    def resume(self, variants: int):
        """Returns (WindowSums or None, the stage's saved tensors) when the sidecar fits `variants` sums."""
        from banpick_cli.passes.kl_windows import WindowSums

        saved = self.saved
        if saved is None or "kl_sums" not in saved.tensors or saved.tensors["kl_sums"].numel() != variants:
            self.stale = self.stale or saved is not None
            return None, {}
        self.windows = int(saved.state["windows"])
        sums = WindowSums(saved.done, self.windows, int(saved.state["tokens"]), saved.tensors["kl_sums"].double())
        return sums, {k: v for k, v in saved.tensors.items() if k != "kl_sums"}

    def save(self, sums, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Writes the finished windows' sums (and the stage's tensors) atomically."""
        self.windows = sums.windows
        self.sidecar.save(Partial(sums.batches, {"kl_sums": sums.kl_sums, **(tensors or {})},
                                  {"windows": sums.windows, "tokens": sums.tokens}))

    def finish(self) -> None:
        """Removes the sidecar (after the stage's profile is written)."""
        self.sidecar.remove()


def previous_output(out: Path, source: Path, fingerprint: str):
    """Returns the existing `--out` profile when it is not the input (a finished run may have saved there)."""
    from banpick_cli.profile.format import read_profile

    if out.resolve() == source.resolve() or not out.exists():
        return None
    return read_profile(out, fingerprint=fingerprint)
