"""Reading a safetensors checkpoint tensor by tensor straight into the model's own parameters.

`Checkpoint` knows which shard holds each key and where its bytes are (the shard headers). `plan`
works out, with transformers' own key conversion table, where each checkpoint tensor lands in the
model: a whole parameter (a renamed key), or one expert's slot of a fused expert tensor (per-expert
checkpoint tensors stacked, gate and up concatenated: `MergeModulelist(dim=0)`, optionally followed by
`Concatenate(dim=1)`). `read_into` then allocates each parameter once and reads every tensor's bytes
into its place: no shard buffer, no per-expert copy, no second copy while experts are fused. After each
tensor the file's pages are dropped from the page cache (`posix_fadvise(DONTNEED)`), so a streamed run
does not fill the page cache (which a memory cgroup charges to the process) with the checkpoint.

A tensor whose dtype differs from the parameter's goes through one scratch buffer of its own size and is
converted on copy. DeepSeek-V3's FP8 tensors (`float8_e4m3fn` with a `weight_scale_inv` of one float32
scale per 128x128 block, its config's `quantization_config`) are dequantized block row by block row:
weight * scale in float32, then cast to the parameter's dtype; edge blocks are partial.

Any conversion `plan` does not know (other operations, a missing expert) is left to transformers'
`convert_and_load_state_dict_in_model` (StreamedWeights), which holds the tensors twice while converting.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from banpick_cli.errors import ModelError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
           "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_FP8 = {"F8_E4M3", "F8_E5M2"}
SCALE_SUFFIX = "_scale_inv"  # DeepSeek-V3: `<name>.weight_scale_inv` next to `<name>.weight`


class Checkpoint:
    """The tensors of a local safetensors checkpoint: which shard holds each key, and their sizes."""

    def __init__(self, folder: str | Path, block: tuple[int, int] = (128, 128)):
        self.folder = Path(folder)
        self.block = block  # FP8 scale blocks (rows, columns), from the config's quantization_config
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self.files = {str(key): self.folder / str(shard) for key, shard in weight_map.items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise ModelError(f"{index} is not a safetensors index ({type(err).__name__}: {str(err)[:80]})") from None
        elif single.is_file():
            self.files = {}
        else:
            raise ModelError(f"--stream reads safetensors shards, and {self.folder} has none (model.safetensors[.index.json])")
        self._headers: dict[Path, tuple[int, dict[str, Any]]] = {}
        if not self.files:
            self.files = {key: single for key in self.header(single)[1] if key != "__metadata__"}

    def header(self, path: Path) -> tuple[int, dict[str, Any]]:
        """Returns (where the data starts, the JSON header) of one shard; headers are read once."""
        if path not in self._headers:
            self._headers[path] = _read_header(path)
        return self._headers[path]

    def entry(self, key: str) -> dict[str, Any]:
        """Returns the header entry of `key`: its dtype, shape and data offsets."""
        path = self.files[key]
        entry = self.header(path)[1].get(key)
        if entry is None:
            raise ModelError(f"{path} has no tensor {key}, which its index places there")
        return entry

    def nbytes(self, keys: list[str]) -> int:
        """Returns the bytes `keys` take on disk (from the shard headers; no tensor is read)."""
        total = 0
        for key in keys:
            begin, end = self.entry(key)["data_offsets"]
            total += end - begin
        return total

    def is_fp8(self, key: str) -> bool:
        return self.entry(key)["dtype"] in _FP8

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Returns {key: tensor} for `keys`, each read from its shard into fresh memory."""
        out = {}
        for key in keys:
            entry = self.entry(key)
            out[key] = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
            self._read_bytes(key, out[key])
        return out

    def read_into(self, key: str, dst: torch.Tensor, scale: str | None = None) -> int:
        """Reads tensor `key` into `dst` (a CPU tensor of its shape), converting its dtype; returns the bytes read.

        With `scale` (the key of its FP8 block scales) the tensor is dequantized: each element times its
        block's scale, in float32, then cast to `dst`'s dtype.
        """
        entry = self.entry(key)
        shape, dtype = list(entry["shape"]), _DTYPES[entry["dtype"]]
        if list(dst.shape) != shape:
            raise ModelError(f"--stream: {key} is {shape} in the checkpoint, the model expects {list(dst.shape)}")
        if scale is not None:
            self._dequantize(key, shape, dst, self.read([scale])[scale])
        elif dtype == dst.dtype and dst.is_contiguous():
            self._read_bytes(key, dst)
        else:  # a dtype to convert, or a strided slot: one tensor-sized scratch buffer
            dst.copy_(self.read([key])[key])
        begin, end = entry["data_offsets"]
        return end - begin

    def _dequantize(self, key: str, shape: list[int], dst: torch.Tensor, scales: torch.Tensor) -> None:
        rows, cols = (shape + [1, 1])[:2]
        block_r, block_c = self.block
        if len(shape) != 2 or list(scales.shape) != [math.ceil(rows / block_r), math.ceil(cols / block_c)]:
            raise ModelError(f"--stream: {key} {shape} has FP8 scales {list(scales.shape)}, expected one per "
                             f"{block_r}x{block_c} block")
        quantized = self.read([key])[key]  # one byte per element: a quarter of the float32 layer tensor
        per_column = scales.float().repeat_interleave(block_c, dim=1)[:, :cols]  # [row blocks, cols]
        for b in range(scales.shape[0]):
            rows_b = slice(b * block_r, min((b + 1) * block_r, rows))
            dst[rows_b].copy_(quantized[rows_b].to(torch.float32) * per_column[b])

    def _read_bytes(self, key: str, dst: torch.Tensor) -> None:
        """Reads the bytes of `key` into contiguous `dst` and drops them from the page cache."""
        path = self.files[key]
        start, header = self.header(path)
        begin, end = header[key]["data_offsets"]  # end - begin is dst's bytes: _read_header checked every size
        view = memoryview(dst.reshape(-1).view(torch.uint8).numpy()) if dst.numel() else memoryview(b"")
        with open(path, "rb", buffering=0) as handle:
            handle.seek(start + begin)
            got = 0
            while got < len(view):
                n = handle.readinto(view[got:])
                if not n:
                    raise ModelError(f"{path} is truncated at tensor {key}")
                got += n
            if hasattr(os, "posix_fadvise"):  # the pages were read once; keep them out of the page cache
                os.posix_fadvise(handle.fileno(), start + begin, end - begin, os.POSIX_FADV_DONTNEED)


@dataclass(frozen=True)
class Place:
    """Where one checkpoint tensor goes: a model tensor, and the slot of it (an index tuple; () is all of it)."""

    key: str  # checkpoint key
    target: str  # the model's parameter or buffer name
    slot: tuple  # (expert,) or (expert, slice(rows)) in a fused expert tensor; () for a whole tensor
    scale: str | None = None  # the checkpoint key of its FP8 block scales


MAX_HEADER = 100_000_000  # safetensors' own limit on a header's bytes


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """Returns (where the data starts, the checked JSON header) of one shard, or raises a one-line ModelError."""
    def bad(why: str) -> ModelError:
        return ModelError(f"{path} is not a readable safetensors file: {why}")

    try:
        with open(path, "rb") as handle:
            length = os.fstat(handle.fileno()).st_size
            size = int.from_bytes(handle.read(8), "little")
            if length < 8 or size > min(MAX_HEADER, length - 8):
                raise bad(f"its header claims {size:,} bytes in a file of {length:,}")
            header = json.loads(handle.read(size))
    except OSError as err:
        raise ModelError(f"cannot read {path}: {err.strerror or err}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise bad(f"its header is not JSON ({str(err)[:80]})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    data = length - 8 - size
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = dtype in _DTYPES and all(isinstance(n, int) and n >= 0 for n in [*shape, begin, end])
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise bad(f"tensor {key} has no valid dtype, shape and data_offsets")
        if not begin <= end <= data or end - begin != math.prod(shape) * _DTYPES[dtype].itemsize:
            raise bad(f"tensor {key}'s bytes {begin}-{end} do not fit its shape {shape} {dtype} or the file's "
                      f"{data:,} data bytes (truncated?)")
    return 8 + size, header


def plan(model: nn.Module, checkpoint: Checkpoint, keys: list[str]) -> tuple[list[Place], list[str]]:
    """Returns (the places of the keys read straight into the model, the keys left to transformers' conversion).

    A key renamed onto a model tensor goes whole; keys that a converter stacks per expert (and, for gate
    and up, concatenates) go to their expert's rows of the fused tensor. Every other conversion, and a
    fused tensor whose experts are not exactly 0..E-1 in the keys, is left to transformers.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (Concatenate, MergeModulelist, WeightConverter, apply_renamings,
                                                 rename_source_key)

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if not isinstance(m, WeightConverter)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    present = set(keys)
    places: list[Place] = []
    rest: list[str] = []
    fused: dict[str, list[tuple[str, int, int, str | None]]] = {}  # target -> (key, source index, expert, scale)
    fused_ops: dict[str, bool] = {}  # target -> gate and up concatenated
    for key in keys:
        if key.endswith(SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] in present:
            continue  # read with its weight
        scale = key + SCALE_SUFFIX if key + SCALE_SUFFIX in present else None
        if checkpoint.is_fp8(key) and scale is None:
            raise ModelError(f"--stream: {key} is float8 without its {SCALE_SUFFIX} block scales")
        target, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            if target in tensors:
                places.append(Place(key, target, (), scale))
            else:
                rest.append(key)
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        ops = [(type(op), getattr(op, "dim", None)) for op in converter.operations]
        concat = ops == [(MergeModulelist, 0), (Concatenate, 1)]
        expert = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), apply_renamings(key, renamings))
        if target not in tensors or expert is None or not (ops == [(MergeModulelist, 0)] or concat):
            rest.append(key)
            continue
        fused.setdefault(target, []).append((key, converter.source_patterns.index(pattern), int(expert.group(1)), scale))
        fused_ops[target] = concat
    for target, parts in fused.items():
        experts = int(tensors[target].shape[0])
        sources = sorted({source for _, source, _, _ in parts})
        complete = all(sorted(e for _, s, e, _ in parts if s == source) == list(range(experts)) for source in sources)
        if not complete:
            rest.extend(key for key, _, _, _ in parts)
            continue
        # Concatenated along dim 1 in the converter's source order: each source's rows follow the previous'.
        rows = {source: next(int(checkpoint.entry(k)["shape"][0]) for k, s, _, _ in parts if s == source) for source in sources}
        offset = {source: sum(rows[s] for s in sources if s < source) for source in sources}
        for key, source, e, scale in parts:
            slot = (e, slice(offset[source], offset[source] + rows[source])) if fused_ops[target] else (e,)
            places.append(Place(key, target, slot, scale))
    return places, rest


def read_into(model: nn.Module, checkpoint: Checkpoint, places: list[Place]) -> int:
    """Allocates every model tensor `places` name (once, in its own dtype, on the CPU) and reads each
    checkpoint tensor into its slot; returns the bytes read."""
    owners = {}
    for place in places:
        if place.target not in owners:
            module_name, _, attr = place.target.rpartition(".")
            module = model.get_submodule(module_name)
            current = getattr(module, attr)
            if current.is_meta or current.device.type != "cpu":
                fresh = torch.empty(current.shape, dtype=current.dtype)
                if attr in module._parameters:
                    module._parameters[attr] = nn.Parameter(fresh, requires_grad=False)
                else:
                    module._buffers[attr] = fresh
            owners[place.target] = getattr(module, attr)
    total = 0
    with torch.no_grad():
        for place in places:
            total += checkpoint.read_into(place.key, owners[place.target].data[place.slot], place.scale)
    return total


def open_checkpoint(folder: str | Path, config: Any) -> Checkpoint:
    """Returns the Checkpoint of `folder`, with FP8 blocks from the config's `quantization_config`.

    Unquantized checkpoints and FP8 block-quantized ones (DeepSeek-V3's `{"quant_method": "fp8",
    "weight_block_size": [128, 128]}`) stream; another quantization is a one-line ModelError.
    """
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return Checkpoint(folder)
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    method = str(quant.get("quant_method", ""))
    if method != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
        raise ModelError(f"--stream reads unquantized or FP8 (e4m3, block-scaled) checkpoints; this one is "
                         f"quantized with {method or 'an unnamed method'} {quant.get('fmt', '')}".rstrip())
    block = quant.get("weight_block_size") or [128, 128]
    return Checkpoint(folder, block=(int(block[0]), int(block[1])))
