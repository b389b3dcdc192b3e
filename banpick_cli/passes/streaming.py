"""Streaming a checkpoint one decoder layer at a time: calibrate models larger than the machine's memory.

The model is built on the meta device from its config (no weights); the shards are read with plain
reads of the layer's byte ranges (their headers give the offsets), so memory is the layer's size
whatever the shard size. What every pass needs all the time
stays resident: the embedding, the final norm, the rotary tables and the routers (they decide the
fingerprint and the routing rule, and are small: E x H per MoE layer). Each decoder layer's other
tensors are read from the safetensors shards when a pass runs the layer (`acquire`), through
transformers' own key conversion (per-expert checkpoint tensors -> fused expert tensors), and go back
to the meta device when it is done (`release`). The LM head is read only by the passes that need it.
Peak memory: one decoder layer + the resident parts + the pass's hidden states (docs/scaling.md).

`LayerSource` is what the layer-by-layer passes (sequential.py, kl.py) run layers through; `source_for`
picks the streaming one for a streamed model, else one that moves in-memory layers to the run device
and back (a no-op when they are already there). Both count layer loads, so tests can hold a pass to
one load per layer and window.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from banpick_cli.errors import ModelError
from banpick_cli.passes.checkpoint import Checkpoint, open_checkpoint, plan, read_into
from banpick_cli.models.loading import LoadedModel, build_meta, describe, load_config, resolve_device, resolve_dtype
from banpick_cli.models.registry import adapter_for

_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")  # model keys of decoder layer N


class StreamedWeights:
    """Reads a meta-built model's weights from its checkpoint by decoder layer; frees them after use.

    Checkpoint keys are grouped by where transformers' conversion puts them (their model key): decoder
    layer N, a router, or the rest (embedding, final norm, LM head).
    """

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device,
                 routers: dict[int, str]):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
        from transformers.modeling_utils import LoadStateDictConfig

        self.model, self.checkpoint, self.dtype, self.device = model, checkpoint, dtype, device
        mapping = get_model_conversion_mapping(model)
        self._config = LoadStateDictConfig(dtype=dtype, weight_mapping=mapping)
        renamings = [m for m in mapping if not isinstance(m, WeightConverter)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        self.router_prefix = routers  # decoder layer index -> the router module's name in the model
        self.layer_keys: dict[int, list[str]] = {}
        self.router_keys: dict[int, list[str]] = {}
        self.rest: list[str] = []
        self.head_keys: list[str] = []
        head = model.get_output_embeddings()
        head_name = next((n for n, m in model.named_modules() if m is head), None)
        for key in checkpoint.files:
            target, _ = rename_source_key(key, renamings, converters)
            found = _LAYER.match(target)
            if found is None:
                (self.head_keys if head_name and target.startswith(head_name + ".") else self.rest).append(key)
                continue
            index = int(found.group(1))
            prefix = routers.get(index)
            group = self.router_keys if prefix and target.startswith(prefix + ".") else self.layer_keys
            group.setdefault(index, []).append(key)
        self.tied = not self.head_keys
        self.loads = 0  # decoder layers read from the checkpoint so far
        self.bytes_read = 0
        _map_large_allocations()

    # --- resident parts --------------------------------------------------------------------------
    def load_resident(self) -> None:
        """Reads the embedding, final norm and routers; computes the rotary tables (meta-built as empty)."""
        self._read(self.rest + [k for keys in self.router_keys.values() for k in keys])
        if self.tied:
            self.model.tie_weights()
        for module in self.model.modules():
            if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "original_inv_freq"):
                module.to_empty(device="cpu")
                self.model._init_weights(module)  # transformers' own rule for the rotary tables
        decoder = self.model.model if hasattr(self.model, "model") else self.model
        for name, child in decoder.named_children():
            if name != "layers":
                child.to(self.device)
        for prefix in self.router_prefix.values():
            self.model.get_submodule(prefix).to(self.device)
        meta = [n for n, t in [*decoder.named_parameters(), *decoder.named_buffers()]
                if t.is_meta and not n.startswith("layers.")]
        if meta:
            raise ModelError(f"--stream: the checkpoint has no tensor for {meta[0]}")

    @contextmanager
    def head(self, device: torch.device) -> Iterator[nn.Module]:
        """Yields the LM head on `device`, read from the checkpoint for the block when it is not tied."""
        head = self.model.get_output_embeddings()
        if self.tied:
            yield head
            return
        self._read(self.head_keys)
        head.to(device)
        try:
            yield head
        finally:
            _to_meta(head, keep=())

    # --- decoder layers --------------------------------------------------------------------------
    def acquire(self, index: int, device: torch.device) -> nn.Module:
        """Returns decoder layer `index` with its weights read from the checkpoint, on `device`."""
        layer = self._layers()[index]
        self._read(self.layer_keys.get(index, []))
        self.loads += 1
        return layer.to(device)

    def release(self, index: int) -> None:
        """Drops decoder layer `index`'s weights (back to the meta device), keeping its router."""
        layer = self._layers()[index]
        prefix = self.router_prefix.get(index)
        keep = (self.model.get_submodule(prefix),) if prefix else ()
        _to_meta(layer, keep=keep)
        _trim()


    def layer_bytes(self, index: int) -> int:
        return self.checkpoint.nbytes(self.layer_keys.get(index, []))

    def _layers(self) -> nn.ModuleList:
        decoder = self.model.model if hasattr(self.model, "model") else self.model
        return decoder.layers

    def _read(self, keys: list[str]) -> None:
        """Reads `keys` into the model: each tensor straight into its (fused) place (passes/checkpoint.py);
        conversions that module does not know go through transformers' own."""
        if not keys:
            return
        places, rest = plan(self.model, self.checkpoint, keys)
        self.bytes_read += read_into(self.model, self.checkpoint, places)
        if rest:
            self._convert(rest)

    def _convert(self, keys: list[str]) -> None:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.utils import logging as hf_logging

        quiet = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # transformers draws a bar per call; ours is the pass's
        # Sequential conversion: transformers' default starts a pool of threads per call, and every new
        # thread's malloc arena would stay reserved, layer after layer.
        was = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
        os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
        try:
            tensors = self.checkpoint.read(keys)
            self.bytes_read += sum(t.numel() * t.element_size() for t in tensors.values())
            info, _ = convert_and_load_state_dict_in_model(self.model, tensors, self._config)
            del tensors
        finally:
            if was is None:
                os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
            else:
                os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = was
            if quiet:
                hf_logging.enable_progress_bar()
        # transformers collects conversion failures (an allocation that failed among them) instead of raising.
        problems = [*info.conversion_errors.values(), *info.error_msgs,
                    *(f"{k}: checkpoint {a}, model {b}" for k, a, b in info.mismatched_keys)]
        if problems:
            first = str(problems[0]).strip().splitlines()
            if any("memory" in str(p).lower() or "alloc" in str(p).lower() for p in problems):
                raise MemoryError(f"out of memory reading {keys[0]} and {len(keys) - 1} more tensors: {first[-1][:200]}")
            raise ModelError(f"--stream: cannot load {keys[0]} ...: {(first[-1] if first else '')[:200]}")


def _to_meta(module: nn.Module, keep: tuple[nn.Module, ...]) -> None:
    """Replaces every parameter and persistent buffer under `module` by a meta tensor, except under `keep`."""
    kept = {id(p) for k in keep for p in [*k.parameters(), *k.buffers()]}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and id(param) not in kept and not param.is_meta:
                sub._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
        for name, buf in list(sub._buffers.items()):
            if buf is not None and id(buf) not in kept and not buf.is_meta and name not in sub._non_persistent_buffers_set:
                sub._buffers[name] = torch.empty_like(buf, device="meta")


def load_streaming(name: str, *, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Returns a LoadedModel whose decoder layers stay on the meta device and are streamed from the checkpoint.

    Only local safetensors checkpoints stream (download a hub model first, e.g. `hf download`).
    """
    from transformers import AutoTokenizer

    resolved, config = load_config(name)
    folder = Path(resolved)
    if not folder.is_dir():
        raise ModelError(f"--stream reads a local checkpoint folder; '{resolved}' is not one (download it first)")
    adapter = adapter_for(config)
    run_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, run_device)
    model = build_meta(config, torch_dtype)
    routers = {layer.layer_index: _module_name(model, layer.router) for layer in adapter.moe_layers(model)}
    weights = StreamedWeights(model, open_checkpoint(folder, config), torch_dtype, run_device, routers)
    weights.load_resident()
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded = describe(model, tokenizer, adapter, name_or_path=name, device=run_device)
    loaded.streamed = weights
    return loaded


def _module_name(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


class LayerSource:
    """Decoder layers for a pass that runs one layer at a time; counts how often each is loaded.

    In memory: `acquire` moves the layer to the run device (where it already is: nothing) and `release`
    moves it back. Streamed: read from the checkpoint, and dropped (StreamedWeights).
    """

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.streamed: StreamedWeights | None = loaded.streamed
        decoder = loaded.adapter.decoder(loaded.model)
        self.layers = decoder.layers
        self.loads = [0] * len(self.layers)  # per decoder layer
        self._home: dict[int, torch.device | None] = {}

    def acquire(self, index: int, device: torch.device) -> nn.Module:
        self.loads[index] += 1
        if self.streamed is not None:
            return self.streamed.acquire(index, device)
        layer = self.layers[index]
        self._home[index] = _device_of(layer)
        return layer.to(device)

    def release(self, index: int) -> None:
        if self.streamed is not None:
            self.streamed.release(index)
            return
        home = self._home.pop(index, None)
        if home is not None:
            self.layers[index].to(home)

    @contextmanager
    def head(self, device: torch.device) -> Iterator[tuple[nn.Module, nn.Module]]:
        """Yields (final norm, LM head) on `device` (the head read from the checkpoint when streamed)."""
        norm, head = self.loaded.adapter.output_head(self.loaded.model)
        if self.streamed is not None:
            with self.streamed.head(device) as streamed_head:
                yield norm, streamed_head
            return
        home = _device_of(head)
        norm.to(device), head.to(device)
        try:
            yield norm, head
        finally:
            if home is not None and home != device:
                head.to(home)


def _device_of(module: nn.Module) -> torch.device | None:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def _trim() -> None:
    """Hands freed heap memory back to the system (glibc keeps it otherwise: the peak would creep layer by layer)."""
    if _libc():
        _LIBC.malloc_trim(0)


def _map_large_allocations() -> None:
    """Makes glibc serve every allocation of 1 MiB or more with its own mapping, returned whole when freed.

    By default glibc raises that threshold to the size of the largest block freed so far (up to 32 MiB),
    after which a layer's tensors come from the heap, which fragments and only grows: each layer read
    would leave the process a little larger. A fixed threshold keeps the peak at one layer.
    """
    if _libc():
        _LIBC.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


_LIBC: Any = None
