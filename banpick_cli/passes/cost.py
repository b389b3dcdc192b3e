"""Know the cost before paying it: what a calibration pass will do and hold, from the model's config alone.

`plan_cost` counts, without weights (the model is built on the meta device), the decoder-layer
forwards, LM-head forwards, layer loads and tokens of `profile`, `kl-scan` or `layer-sensitivity`,
and the peak memory of each way of running it (whole model, `--sequential`, `--stream`). `probe` times
this machine on the model's own shape: one decoder layer (random weights, the first MoE layer's
shape) on one batch, the LM head on one batch, and, for a local checkpoint, reading one layer from it.
`Cost.seconds(timing, mode)` turns the two into a time estimate (progress.py's `eta` keeps one honest as a
run goes).

Counts are in batch-forwards of one decoder layer ("layer runs"): a variant stacked with others costs
the same rows. The scans run the unmodified model through every layer and each variant through the
layers from its own to the last (passes/kl.py); `profile` runs the layers up to the last MoE layer.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from banpick_cli.models import experts
from banpick_cli.models.loading import build_meta
from banpick_cli.models.registry import adapter_for
from banpick_cli.passes.kl_math import default_stack

MODES = ("whole", "sequential", "stream")


@dataclass(frozen=True)
class Shape:
    """The sizes that decide the cost, read from a meta-device build of the config."""

    layers: int  # decoder layers
    moe_layers: tuple[int, ...]  # their indices
    hidden: int
    vocab: int
    layer_params: tuple[int, ...]  # parameters per decoder layer
    active_params: tuple[int, ...]  # parameters a token uses per decoder layer (K of E experts)
    embed_params: int
    head_params: int  # 0 when tied to the embedding
    router_params: int  # all routers together (resident when streaming)
    bytes_per_param: int

    @classmethod
    def of(cls, config: Any, dtype: torch.dtype) -> "Shape":
        model = build_meta(config, dtype)
        adapter = adapter_for(config)
        decoder = adapter.decoder(model)
        moe = {layer.layer_index: layer for layer in adapter.moe_layers(model)}
        routing = adapter.routing_config(config)
        sizes, active = [], []
        for i, layer in enumerate(decoder.layers):
            total = sum(p.numel() for p in layer.parameters())
            experts = sum(p.numel() for p in moe[i].block.experts.parameters()) if i in moe else 0
            sizes.append(total)
            active.append(total - experts + (experts * routing.top_k // max(routing.num_experts, 1)))
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        routers = sum(p.numel() for layer in moe.values() for p in layer.router.parameters())
        return cls(len(decoder.layers), tuple(sorted(moe)), int(embed.shape[1]), int(head.shape[0]), tuple(sizes),
                   tuple(active), embed.numel(), 0 if head is embed else head.numel(), routers,
                   torch.empty((), dtype=dtype).element_size())

    @property
    def params(self) -> int:
        return sum(self.layer_params) + self.embed_params + self.head_params


@dataclass
class Cost:
    """What one run will do (counts) and hold (bytes per mode); `seconds` adds a time from a probe."""

    command: str
    batches: int
    tokens: int  # padded positions run through the model (an upper bound on real tokens)
    generated_tokens: int  # these passes generate nothing; the field keeps the three counts together
    variants: int
    windows: int
    layer_runs: int  # decoder-layer forwards of one batch (the unmodified model's and the variants')
    head_runs: int  # LM-head forwards of one batch
    layer_loads: dict[str, int]  # per mode: decoder layers brought to the device or read from disk
    peak_bytes: dict[str, dict[str, int]]  # per mode: {"cpu": ..., "device": ...}
    shape: Shape = field(repr=False)
    activations: int = 0  # one batch's activations in one decoder layer

    def seconds(self, timing: "Timing", mode: str) -> float:
        """Returns the estimated wall time of the run in `mode` on the probed machine."""
        per_layer = timing.layer_s  # one batch through one (MoE) layer
        read = timing.load_s if mode == "stream" else (timing.move_s if mode == "sequential" else 0.0)
        return self.layer_runs * per_layer + self.head_runs * timing.head_s + self.layer_loads[mode] * read

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("shape")
        return out


def plan_cost(config: Any, *, command: str, samples: int, seq_len: int, batch_size: int,
              variants_by_layer: dict[int, int] | None = None, hidden_cache_mb: int = 2048,
              checkpoint_every: int = 32, window_batches: int = 0, dtype: torch.dtype = torch.float32,
              device: str = "cpu") -> Cost:
    """Returns the counts and peak memory of one run from the config alone.

    `variants_by_layer` maps a decoder-layer index to its number of variants (kl-scan: the candidates;
    layer-sensitivity: one per MoE layer, the default when None); `profile` has none. `checkpoint_every`
    is profile's window; the scans' window is what fits `hidden_cache_mb`, at most `window_batches`
    when set (their --checkpoint-every). `device` (its type) sets how many variants a scan stacks into
    one forward, and whose experts forward runs (the CPU: models/experts.py's slices; else transformers').
    """
    shape = Shape.of(config, dtype)
    b = shape.bytes_per_param
    batches = math.ceil(samples / batch_size)
    tokens = samples * seq_len
    batch_states = batch_size * seq_len * shape.hidden * b  # one batch's hidden states
    if command == "profile":
        variants_by_layer = {}
        last = max(shape.moe_layers)
        window = checkpoint_every or batches
    else:
        if variants_by_layer is None:
            variants_by_layer = dict.fromkeys(shape.moe_layers, 1)
        last = shape.layers - 1
        n = sum(variants_by_layer.values())
        # As the engine cuts windows: as many batches as fit the budget with every variant's states.
        window = max(1, int(hidden_cache_mb * 2**20 // max(batch_states * (n + 1), 1)))
        window = min(window, window_batches) if window_batches else window
    variants = sum(variants_by_layer.values())
    windows = math.ceil(batches / window)
    layer_runs = batches * ((last + 1) + sum(v * (last + 1 - layer) for layer, v in variants_by_layer.items()))
    head_runs = 0 if command == "profile" else batches * (1 + variants)
    layer_loads = {"whole": 0, "sequential": windows * (last + 1), "stream": windows * (last + 1)}
    largest = max(shape.layer_params) * b
    resident = (shape.embed_params + shape.router_params) * b
    head = shape.head_params * b if command != "profile" else 0
    states = min(window, batches) * batch_states * (variants + 1)
    replicas = 1 if command == "profile" else default_stack(device)
    activations = _activations(config, shape, batch_size * replicas, seq_len, b, sliced=device == "cpu")
    weights = shape.params * b
    if device == "cpu":  # one memory: a layer "moved to the device" is the one already there
        peak = {
            "whole": {"cpu": weights + activations + states, "device": 0},
            "sequential": {"cpu": weights + states + activations, "device": 0},
            # Each checkpoint tensor is read straight into its place in the (fused) layer: one copy of it.
            "stream": {"cpu": largest + resident + head + states + activations, "device": 0},
        }
    else:
        peak = {
            "whole": {"cpu": 0, "device": weights + activations + states},
            "sequential": {"cpu": weights + states, "device": largest + shape.embed_params * b + head + activations},
            "stream": {"cpu": largest + resident + head + states, "device": largest + resident + head + activations},
        }
    return Cost(command, batches, tokens, 0, variants, windows, layer_runs, head_runs, layer_loads, peak, shape, activations)


def expert_width(config: Any) -> int:
    """Returns the width of one expert's FFN from a model config (0 when it does not say)."""
    config = getattr(config, "text_config", None) or config
    return int(getattr(config, "moe_intermediate_size", 0) or getattr(config, "intermediate_size", 0) or 0)


def _activations(config: Any, shape: Shape, rows: int, seq: int, b: int, *, sliced: bool) -> int:
    """Returns one forward's activations in one decoder layer for `rows` texts of `seq` tokens: the hidden
    states around attention and experts, the experts' own peak (models/experts.py), SDPA math-kernel scores."""
    heads = int(getattr(config, "num_attention_heads", 1))
    top_k = int(getattr(config, "num_experts_per_tok", 1))
    tokens = rows * seq
    moe = experts.peak_bytes(tokens, top_k, shape.hidden, expert_width(config), b, sliced=sliced)
    return tokens * 4 * shape.hidden * b + moe + rows * heads * seq * seq * b


@dataclass(frozen=True)
class Timing:
    """Seconds on this machine: one batch through one decoder layer and the LM head; one layer read or moved.

    `layer_s` and `head_s` are the fastest of `runs` timed runs (after a warm-up) on a batch of `batch_size` x
    `seq_len` tokens: other work on a shared machine only ever adds time, so the fastest run is the least disturbed.
    """

    layer_s: float
    head_s: float
    load_s: float
    move_s: float
    device: str
    batch_size: int = 0
    seq_len: int = 0
    runs: int = 0


def _fastest(once: Callable[[], float], *, least: int = 3, most: int = 10, budget_s: float = 1.0) -> tuple[float, int]:
    """Returns (the fastest of several timed runs of `once`, how many ran): at least `least`, and more, up to
    `most`, while the runs took under `budget_s` together (a small model's milliseconds are noisy)."""
    times = [once() for _ in range(least)]
    while len(times) < most and sum(times) < budget_s:
        times.append(once())
    return min(times), len(times)


@torch.inference_mode()
def probe(config: Any, *, batch_size: int, seq_len: int, device: torch.device, dtype: torch.dtype,
          checkpoint: Path | None = None, repeat: int = 3) -> Timing:
    """Returns a Timing from running the model's own layer shape here, with random weights (no checkpoint read
    except, when `checkpoint` is given, one decoder layer to time the disk)."""
    model = build_meta(config, dtype)
    adapter = adapter_for(config)
    decoder = adapter.decoder(model)
    moe = adapter.moe_layers(model)
    index = moe[0].layer_index if moe else 0
    layer = decoder.layers[index].to_empty(device=device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    for p in layer.parameters():
        p.copy_((torch.randn(p.shape, generator=generator) * 0.02).to(p.dtype))
    for name, buf in layer.named_buffers():
        buf.zero_()
    rotary = decoder.rotary_emb.to_empty(device=device)
    model._init_weights(rotary)
    hidden = torch.randn(batch_size, seq_len, int(config.hidden_size), generator=generator).to(device, dtype)
    positions = torch.arange(seq_len, device=device)[None]
    rope = rotary(hidden, positions)
    mask = torch.full((seq_len, seq_len), float("-inf"), device=device, dtype=dtype).triu(1)[None, None]

    def once() -> float:
        start = time.perf_counter()
        layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rope)
        _sync(device)
        return time.perf_counter() - start

    once()  # warm-up
    layer_s, runs = _fastest(once, least=repeat)
    vocab, width = int(config.get_text_config().vocab_size), int(config.hidden_size)
    head = torch.nn.Linear(width, vocab, bias=False, device=device, dtype=dtype)
    tokens = hidden.reshape(-1, width)
    step = max(1, (1 << 21) // vocab)

    def head_once() -> float:
        start = time.perf_counter()
        for s in range(0, tokens.shape[0], step):
            torch.topk(head(tokens[s : s + step]).float(), min(1000, vocab), dim=-1)
        _sync(device)
        return time.perf_counter() - start

    head_s = _fastest(head_once, least=repeat)[0] * 2  # the unmodified targets' top-k, or a variant's logits and KL
    move_s = 0.0
    if device.type == "cuda":
        start = time.perf_counter()
        layer.to("cpu").to(device)
        _sync(device)
        move_s = (time.perf_counter() - start) / 2
    load_s = move_s
    if checkpoint is not None:
        from banpick_cli.passes.checkpoint import open_checkpoint
        from banpick_cli.passes.streaming import StreamedWeights

        routers = {m.layer_index: next(n for n, x in model.named_modules() if x is m.router) for m in moe}
        weights = StreamedWeights(model, open_checkpoint(checkpoint, config), dtype, device, routers)
        start = time.perf_counter()
        weights.acquire(index, device)
        weights.release(index)
        load_s = time.perf_counter() - start
    return Timing(layer_s, head_s, load_s, move_s, str(device), batch_size, seq_len, runs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

