"""The usage pass at scale: batch windows that checkpoint, data-parallel shards, layer-by-layer onloading.

None of these change the counts. The calibration batches are built exactly as `count_usage` builds
them (batch j = texts[j*B:(j+1)*B], padded to its longest text); a rank takes every world-th batch;
a window of `checkpoint_every` batches runs either through the whole model or layer by layer; after
each window the summed counts go to a sidecar, so a killed run resumes after its last finished window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from banpick_cli.passes.batches import Batch, batches
from banpick_cli.passes.resume import Partial, Sidecar
from banpick_cli.passes.distributed import Dist
from banpick_cli.passes.sequential import run_layerwise
from banpick_cli.passes.streaming import LayerSource
from banpick_cli.passes.usage import UsageCounter, UsageCounts
from banpick_cli.errors import BadSetting
from banpick_cli.models.base import RoutingHooks
from banpick_cli.models.loading import LoadedModel
from banpick_cli.progress import ProgressEvent, ProgressFn, silent


@dataclass(frozen=True)
class RunOptions:
    """How a pass runs, not what it computes: every choice here gives the same counts.

    `sequential` onloads one decoder layer at a time onto the run device (the model stays on the CPU);
    `device_map` ("auto", ...) has accelerate spread the model over every visible GPU instead;
    `checkpoint_every` is the window, in batches, after which partial counts are saved (0: no sidecar,
    one window); `stream` builds the model on the meta device and reads each decoder layer from the
    checkpoint when it runs (passes/streaming.py), for models larger than the machine's memory.
    """

    sequential: bool = False
    checkpoint_every: int = 32
    device_map: str | None = None
    stream: bool = False

    def __post_init__(self) -> None:
        if self.checkpoint_every < 0:
            raise BadSetting(f"--checkpoint-every must be >= 0 batches, got {self.checkpoint_every}")
        if self.sequential and self.device_map:
            raise BadSetting("--sequential keeps the model on the CPU and onloads one layer at a time; drop --device-map")
        if self.stream and self.device_map:
            raise BadSetting("--stream reads one layer at a time from the checkpoint onto one device; drop --device-map")


@dataclass
class PassResult:
    """The reduced counts of a pass, and how it ran."""

    usage: UsageCounts
    resumed_batches: int  # this rank's batches taken from a sidecar instead of recomputed
    batches: int  # all ranks' batches
    layer_loads: int = 0  # decoder layers this rank loaded (read from the checkpoint, or moved to the device)


def _batch(loaded: LoadedModel, texts: list[str], index: int, *, seq_len: int, batch_size: int, device: torch.device) -> Batch:
    chunk = texts[index * batch_size : (index + 1) * batch_size]
    return next(batches(loaded.tokenizer, chunk, seq_len=seq_len, batch_size=batch_size, device=device))


@torch.inference_mode()
def count_usage_pass(
    loaded: LoadedModel,
    texts: list[str],
    *,
    seq_len: int,
    batch_size: int,
    device: torch.device | None = None,
    options: RunOptions = RunOptions(),
    sidecar: Sidecar | None = None,
    dist: Dist = Dist(),
    progress: ProgressFn = silent,
) -> PassResult:
    """Counts expert selections over this rank's batches, checkpointing each window; returns all ranks' sums.

    `device` is where batches run (the model's device, or the onloading device with
    `options.sequential`). With a `sidecar`, finished windows are saved and a matching sidecar is
    resumed from. Every rank must call this; the reduction is collective.
    """
    device = device or loaded.device
    num_layers, num_experts = len(loaded.layers), loaded.routing.num_experts
    total = math.ceil(len(texts) / batch_size)
    mine = dist.shard(total)
    counter = UsageCounter(num_layers, num_experts, device)
    samples = torch.zeros(1, dtype=torch.int64)
    done = 0
    partial = sidecar.load() if sidecar else None
    if partial is not None:
        done = min(partial.done, len(mine))
        counter.counts[:, :num_experts] = partial.tensors["expert_counts"].to(device)
        counter.tokens.copy_(partial.tensors["token_counts"].to(device))
        samples += int(partial.state.get("samples", 0))
    resumed = done
    window = options.checkpoint_every or max(len(mine), 1)
    tokens_seen = 0  # this run's tokens, for the progress rate

    def point_at(batch: Batch) -> None:
        counter.mask = batch.attention_mask.reshape(-1).bool()

    # A streamed model has no weights in memory: it always runs layer by layer, each read once per window.
    layerwise = options.sequential or loaded.streamed is not None
    source = LayerSource(loaded)
    # The first event is the baseline: resumed batches are not work done at this run's rate.
    progress(ProgressEvent("profile", done, len(mine), note="resumed" if done else ""))
    with RoutingHooks(loaded.layers, num_experts, observers=[counter]):
        decoder = loaded.adapter.decoder(loaded.model)
        while done < len(mine):
            ids = mine[done : done + window]
            if layerwise:
                run = [_batch(loaded, texts, j, seq_len=seq_len, batch_size=batch_size, device=torch.device("cpu"))
                       for j in ids]
                run_layerwise(loaded, run, device=device, before_batch=point_at, progress=progress, source=source)
                tokens_seen += sum(b.tokens for b in run)
                samples += sum(int(b.input_ids.shape[0]) for b in run)
            else:  # each batch built as it runs, and reported when it ran (a window can take hours)
                for n, j in enumerate(ids):
                    batch = _batch(loaded, texts, j, seq_len=seq_len, batch_size=batch_size, device=device)
                    point_at(batch)
                    decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                    samples += int(batch.input_ids.shape[0])
                    tokens_seen += batch.tokens
                    if n + 1 < len(ids):  # the window's last batch is reported once its window is saved
                        progress(ProgressEvent("profile", done + n + 1, len(mine), tokens_seen,
                                               note=f"batch {done + n + 1}/{len(mine)}"))
            done += len(ids)
            if sidecar is not None:
                # Saved after the last window too: a failed write of the profile then reruns instantly.
                sidecar.save(Partial(done, {"expert_counts": counter.counts[:, :num_experts],
                                            "token_counts": counter.tokens}, {"samples": int(samples)}))
            progress(ProgressEvent("profile", done, len(mine), tokens_seen, note=f"batch {done}/{len(mine)}"))
    counts = counter.counts[:, :num_experts].cpu().clone()
    tokens = counter.tokens.cpu().clone()
    dist.sum_(counts)
    dist.sum_(tokens)
    dist.sum_(samples)
    usage = UsageCounts(counts, tokens, int(tokens[0]) if num_layers else 0, int(samples))
    return PassResult(usage, resumed, total, layer_loads=sum(source.loads))
