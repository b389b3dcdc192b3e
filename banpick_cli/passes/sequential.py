"""Layer-by-layer onloading: push a window of calibration batches through one decoder layer at a time.

As llm-compressor's sequential pipeline and REAP's layerwise observer do, the model stays in CPU memory;
each decoder layer in turn moves to the device, every batch's hidden states pass through it and return to
the CPU, and the layer moves back. The device holds one decoder layer, the embedding, and one batch's
activations, so `profile --sequential` counts a 235B model on a single GPU (docs/scaling.md).

Router hooks fire inside each layer exactly as in a whole-model forward, so observers (UsageCounter)
need no change; `before_batch` lets the caller point them at the batch being run (its padding mask).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from banpick_cli.passes.batches import Batch
from banpick_cli.passes.streaming import LayerSource
from banpick_cli.models.loading import LoadedModel
from banpick_cli.progress import ProgressEvent, ProgressFn, silent


class _Stop(Exception):
    """Raised once the last needed layer's inputs are recorded: the rest of the forward is not needed."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records the arguments it is called with, passes hidden states on."""

    def __init__(self, index: int, sink: dict[int, tuple[tuple, dict]], stop_at: int, original: nn.Module):
        super().__init__()
        self.index, self.sink, self.stop_at = index, sink, stop_at
        # Some decoders read attributes of their layers while looping (the attention type of a layer).
        for name in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(original, name):
                setattr(self, name, getattr(original, name))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.sink[self.index] = (args, kwargs)
        if self.index == self.stop_at:
            raise _Stop
        return hidden_states


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _layer_inputs(decoder: nn.Module, batch: Batch, last: int, device: torch.device) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
    """Returns one batch's input to layer 0 and the other arguments of layers 0..last, on the CPU.

    The decoder itself builds the causal mask and rotary embeddings (its own code, per family); every
    layer is swapped for a recorder for one forward, so the exact arguments each layer receives are
    kept, including per-layer masks (sliding-window layers).
    """
    layers = decoder.layers
    originals = list(layers)
    sink: dict[int, tuple[tuple, dict]] = {}
    first_hidden: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        first_hidden.append(args[0] if args else kwargs["hidden_states"])

    try:
        for i, layer in enumerate(originals):
            layers[i] = _Recorder(i, sink, last, layer)
        handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            decoder(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    # Objects shared by several layers (one mask, one rotary pair) are moved once and stay shared.
    moved: dict[int, Any] = {}

    def cpu(value: Any) -> Any:
        if id(value) not in moved:
            moved[id(value)] = _to(value, torch.device("cpu"))
        return moved[id(value)]

    calls = []
    for i in range(last + 1):
        args, kwargs = sink[i]
        calls.append((tuple(cpu(a) for a in args), {k: cpu(v) for k, v in kwargs.items()}))
    return first_hidden[0].to("cpu"), calls


@torch.inference_mode()
def run_layerwise(
    loaded: LoadedModel,
    window: list[Batch],
    *,
    device: torch.device,
    before_batch: Callable[[Batch], None] = lambda batch: None,
    progress: ProgressFn = silent,
    source: LayerSource | None = None,
) -> list[torch.Tensor]:
    """Runs a window of batches through the decoder one layer at a time; returns the hidden states after the last MoE layer.

    The model's layers stay where they are kept (the CPU); only the layer being run, and the decoder's
    small parts (embedding, rotary, final norm), visit `device`. Router hooks installed on the model
    observe each layer as it runs. The returned states ([batch, seq, hidden] per batch, on the CPU) are
    the input the next decoder layer would see. `source` gives the layers (default: the model's own,
    moved to `device` and back); a streamed model's source reads each from the checkpoint once per window.
    """
    source = source or LayerSource(loaded)
    decoder = loaded.adapter.decoder(loaded.model)
    last = max(layer.layer_index for layer in loaded.layers)  # layers after the last MoE block are skipped
    home = {name: _device_of(child) for name, child in decoder.named_children() if name != "layers"}
    for name, child in decoder.named_children():
        if name != "layers":
            child.to(device)
    try:
        states, calls = [], []
        for batch in window:
            hidden, per_layer = _layer_inputs(decoder, batch, last, device)
            states.append(hidden)
            calls.append(per_layer)
    finally:
        for name, child in decoder.named_children():
            if name != "layers" and home[name] is not None:
                child.to(home[name])
    for i in range(last + 1):
        layer = source.acquire(i, device)
        try:
            for b, batch in enumerate(window):
                before_batch(batch)
                args, kwargs = calls[b][i]
                out = layer(states[b].to(device), *_to(args, device), **_to(kwargs, device))
                states[b] = (out[0] if isinstance(out, tuple) else out).to("cpu")
        finally:
            source.release(i)
        progress(ProgressEvent("layers", i + 1, last + 1, note=f"layer {i + 1}/{last + 1}"))
    return states


def _device_of(module: nn.Module) -> torch.device | None:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return None
