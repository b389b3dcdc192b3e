"""Reading serving engines' usage dumps into expert counts over a model's MoE layers (docs/import.md).

- SGLang's expert distribution recorder (`python/sglang/srt/eplb/expert_distribution.py`): the `.pt`
  files `/dump_expert_distribution_record` writes. Mode `stat` holds `logical_count`
  [passes, layers, logical experts]; modes `per_pass`/`per_token` hold `records`, each with a
  `global_physical_count` [layers, physical experts] and, per file, `last_physical_to_logical_map`.
- vLLM's routed experts (`--enable-return-routed-experts`): arrays [tokens, layers, top_k] of expert ids,
  as `CompletionOutput.routed_experts` (offline) or the OpenAI server's `prompt_routed_experts` and
  `choices[i].routed_experts` fields, saved as .npy/.npz/.pt or JSON/JSONL responses.

The layer axis of either may cover every decoder layer (dense layers hold zeros) or only the MoE layers;
both are accepted. `stages/import_usage.py` turns the counts into a profile.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from banpick_cli.errors import DataError
from banpick_cli.profile.identity import ModelIdentity

SGLANG_DEFAULT_BUFFER = 1000  # --expert-distribution-recorder-buffer-size: a circular buffer of forward passes


@dataclass
class ImportedUsage:
    """Counts read from dumps, already restricted to the model's MoE layers."""

    expert_counts: torch.Tensor  # [moe_layers, experts] int64
    token_counts: torch.Tensor  # [moe_layers] int64
    sequences: int  # requests, records or forward passes read
    tokens_exact: bool  # False: tokens were derived as counts / k_base (SGLang's stat mode)
    files: list[str]
    notes: list[str]


def _files(paths: Iterable[str], patterns: tuple[str, ...]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            inside = sorted({p for pattern in patterns for p in path.glob(pattern)})
            if not inside:
                raise DataError(f"{path}: no dump files ({', '.join(patterns)}) in this folder")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"dump not found: {path}")
    return list(dict.fromkeys(found))  # a file named twice is read once


def _layer_rows(identity: ModelIdentity, layers_in_dump: int, source: str) -> list[int]:
    """Returns which rows of a dump's layer axis are the model's MoE layers, in order."""
    if layers_in_dump == identity.num_layers:
        return list(identity.moe_layers)
    if layers_in_dump == len(identity.moe_layers):
        return list(range(layers_in_dump))
    raise DataError(f"{source}: {layers_in_dump} layers in the dump, but the model has {identity.num_layers} "
                    f"decoder layers ({len(identity.moe_layers)} MoE); is it a dump of this model?")


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(f"{path}: not a readable torch file ({type(err).__name__}: {str(err)[:120]})") from None


def read_sglang(paths: Iterable[str], identity: ModelIdentity, *, replicas: int = 1) -> ImportedUsage:
    """Sums SGLang expert-distribution dumps (stat, per_pass or per_token mode) over the model's MoE layers."""
    E = identity.num_experts
    counts = torch.zeros(len(identity.moe_layers), E, dtype=torch.int64)
    tokens = 0
    tokens_exact = True
    sequences = 0
    notes: list[str] = []
    files = _files(paths, ("*.pt",))
    for path in files:
        dump = _load_torch(path)
        if not isinstance(dump, dict):
            raise DataError(f"{path}: not an SGLang expert distribution dump (a dict was expected)")
        if "logical_count" in dump:  # mode "stat": [passes, layers, logical experts], already summed over ranks
            logical = torch.as_tensor(dump["logical_count"]).long()
            if logical.dim() == 2:
                logical = logical.unsqueeze(0)
            passes = int((logical.sum(dim=(1, 2)) > 0).sum())
            if passes == logical.shape[0] == SGLANG_DEFAULT_BUFFER:
                notes.append(f"{path.name}: exactly {passes} passes, the recorder's default circular buffer; older "
                             "passes may have been overwritten (record with --expert-distribution-recorder-buffer-size -1)")
            sequences += passes
            per_layer = logical.sum(0)
            tokens_exact = False
        elif "records" in dump:  # modes "per_pass"/"per_token": one record per forward pass
            mapping = dump.get("last_physical_to_logical_map")
            per_layer = None
            for record in dump["records"]:
                physical = torch.as_tensor(record["global_physical_count"]).long()
                logical = _physical_to_logical(physical, mapping, E, path)
                per_layer = logical if per_layer is None else per_layer + logical
                sequences += 1
                if "input_ids" in record:
                    tokens += len(record["input_ids"])
                else:
                    tokens_exact = False
            if per_layer is None:
                notes.append(f"{path.name}: no records (was the recorder started?)")
                continue
        else:
            raise DataError(f"{path}: an SGLang dump holds 'logical_count' (stat mode) or 'records' (per_pass, "
                            f"per_token); this one has {sorted(dump)[:6]}")
        if per_layer.shape[1] != E:
            raise DataError(f"{path}: {per_layer.shape[1]} experts per layer in the dump, the model has {E} "
                            "(record with --disable-shared-experts-fusion so shared experts stay out of the ids)")
        counts += per_layer[_layer_rows(identity, per_layer.shape[0], str(path))]
    token_counts = torch.full((len(identity.moe_layers),), tokens, dtype=torch.int64) if tokens_exact else None
    return _finish(counts, token_counts, sequences, identity, replicas, files, notes)


def _physical_to_logical(physical: torch.Tensor, mapping: Any, experts: int, path: Path) -> torch.Tensor:
    """Folds EPLB's physical expert replicas back onto the logical experts they copy."""
    if mapping is None or physical.shape[1] == experts and _is_identity(mapping, experts):
        return physical
    mapping = torch.as_tensor(mapping).long()
    if mapping.shape != physical.shape:
        raise DataError(f"{path}: physical-to-logical map has shape {list(mapping.shape)}, counts {list(physical.shape)}")
    out = torch.zeros(physical.shape[0], experts, dtype=torch.int64)
    return out.scatter_add_(1, mapping, physical)


def _is_identity(mapping: Any, experts: int) -> bool:
    mapping = torch.as_tensor(mapping)
    return mapping.shape[-1] == experts and bool((mapping == torch.arange(experts)).all())


def _vllm_arrays(path: Path) -> Iterator[Any]:
    """Yields each routed-experts array ([tokens, layers, top_k]) a vLLM output file holds."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".json.gz") else path.suffix
    if suffix == ".npy":
        import numpy as np

        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise DataError(f"{path}: not a readable .npy array ({_first_line(err)})") from None
        yield from (array if array.ndim == 4 else [array])
    elif suffix == ".npz":
        import zipfile

        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = [archive[name] for name in archive.files]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise DataError(f"{path}: not a readable .npz archive ({_first_line(err)})") from None
        yield from arrays
    elif suffix in (".pt", ".pth"):
        data = _load_torch(path)
        items = data.values() if isinstance(data, dict) else data if isinstance(data, (list, tuple)) else [data]
        yield from items
    elif suffix in (".json", ".jsonl"):
        for obj in _json_objects(path, lines=suffix == ".jsonl"):
            yield from _from_response(obj, path)
    else:
        raise DataError(f"{path}: expected .npy, .npz, .pt, .json or .jsonl routed-experts output")


def _json_objects(path: Path, *, lines: bool) -> list[Any]:
    """Returns the JSON values of a .json file (one) or a .jsonl file (one per non-empty line); a binary,
    non-UTF-8 or malformed file is one DataError naming the line."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror or err})") from None
    if b"\0" in data[:8192]:
        raise DataError(f"{path}: a binary file, not JSON{'L' if lines else ''} responses (NUL bytes in it)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at line {line}); save the responses as UTF-8 JSON") from None
    if not lines:
        try:
            return [json.loads(text)]
        except ValueError as err:
            raise DataError(f"{path}: not JSON ({_first_line(err)}); expected one response or a list of them") from None
    objects = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                objects.append(json.loads(line))
            except ValueError as err:
                raise DataError(f"{path}: line {number} is not JSON ({_first_line(err)}); expected one response per line") from None
    return objects


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:160]


def _from_response(obj: Any, path: Path) -> Iterator[Any]:
    """Yields the routed-experts arrays of an OpenAI-style response (or a list of them, or a bare array)."""
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):
        for item in obj:
            yield from _from_response(item, path)
        return
    if isinstance(obj, list):
        yield obj
        return
    if not isinstance(obj, dict):
        raise DataError(f"{path}: a JSON object with 'routed_experts' or 'prompt_routed_experts' was expected")
    found = False
    if obj.get("prompt_routed_experts") is not None:  # vLLM 0.21-0.25's server
        found = True
        yield _routed_field(obj["prompt_routed_experts"], path)
    if obj.get("routed_experts") is not None:
        found = True
        yield _routed_field(obj["routed_experts"], path)
    for choice in obj.get("choices") or []:
        if isinstance(choice, dict) and choice.get("routed_experts") is not None:
            found = True
            yield _routed_field(choice["routed_experts"], path)
    if not found:
        raise DataError(f"{path}: a response without routed experts (was the server started with --enable-return-routed-experts?)")


def _routed_field(value: Any, path: Path) -> Any:
    """Returns a response's routed-experts array: nested lists (vLLM 0.21-0.25) or, since vLLM 0.26, a
    string holding base64 of the .npy bytes (`vllm/utils/serial_utils.py` numpy2base64; shape
    [tokens - 1, layers, top_k], uint8/uint16/int32)."""
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        import base64
        import binascii
        import io

        import numpy as np

        try:
            array = np.load(io.BytesIO(base64.b64decode(value, validate=True)), allow_pickle=False)
        except (binascii.Error, ValueError, OSError, EOFError) as err:
            raise DataError(f"{path}: routed_experts is a string but not base64 of a .npy array ({err})") from None
        if array.dtype.kind not in "iu":
            raise DataError(f"{path}: routed_experts holds {array.dtype} values, expert ids (integers) were expected")
        return array.astype(np.int64)
    raise DataError(f"{path}: routed_experts is a {type(value).__name__}; expected nested lists or a base64 .npy string")


def read_vllm(paths: Iterable[str], identity: ModelIdentity, *, replicas: int = 1) -> ImportedUsage:
    """Counts expert ids in vLLM routed-experts arrays over the model's MoE layers (ids outside [0, E) skipped)."""
    E, K = identity.num_experts, identity.k_base
    counts = torch.zeros(len(identity.moe_layers), E + 1, dtype=torch.int64)
    tokens = torch.zeros(len(identity.moe_layers), dtype=torch.int64)
    sequences = 0
    notes: list[str] = []
    skipped = duplicates = 0
    files = _files(paths, ("*.npz", "*.npy", "*.pt", "*.jsonl", "*.json"))
    for path in files:
        for array in _vllm_arrays(path):
            try:
                ids = torch.as_tensor(array).long()
            except (TypeError, ValueError, RuntimeError) as err:
                raise DataError(f"{path}: routed experts must be integer arrays [tokens, layers, top_k] "
                                f"({_first_line(err)})") from None
            if ids.numel() == 0:
                continue
            if ids.dim() != 3:
                raise DataError(f"{path}: routed experts must be [tokens, layers, top_k], got shape {list(ids.shape)}")
            if ids.shape[2] != K:
                raise DataError(f"{path}: top-{ids.shape[2]} experts per token in the dump, the model routes top-{K}")
            ids = ids[:, _layer_rows(identity, ids.shape[1], str(path))]  # [T, M, K]
            valid = (ids >= 0) & (ids < E)
            skipped += int((~valid).sum())
            ids = torch.where(valid, ids, torch.full_like(ids, E))  # out-of-range ids go to a spare bin
            # Each (token, expert) counts once: a banpick-routed server fills a pruned slot with an
            # expert the token already uses, at weight 0.
            ids, _ = ids.sort(-1)
            repeat = torch.zeros_like(valid)
            repeat[..., 1:] = (ids[..., 1:] == ids[..., :-1]) & (ids[..., 1:] < E)
            duplicates += int(repeat.sum())
            ids = torch.where(repeat, torch.full_like(ids, E), ids)
            per_layer = ids.permute(1, 0, 2).reshape(ids.shape[1], -1)  # [M, T*K]
            counts += torch.zeros_like(counts).scatter_add_(1, per_layer, torch.ones_like(per_layer))
            tokens += valid.any(-1).sum(0)
            sequences += 1
    if skipped:
        notes.append(f"{skipped} expert ids outside [0, {E}) were skipped (padding or missing routes)")
    if duplicates:
        notes.append(f"{duplicates} repeated (token, expert) slots counted once (pruned slots of a banpick-routed server)")
    if sequences == 0:
        raise DataError("no routed experts found in the given files")
    return _finish(counts[:, :E], tokens, sequences, identity, replicas, files, notes)


def _finish(counts: torch.Tensor, tokens: torch.Tensor | None, sequences: int, identity: ModelIdentity, replicas: int,
            files: list[Path], notes: list[str]) -> ImportedUsage:
    """Divides out replicated ranks and fills in tokens per layer (counts / K_base when not recorded)."""
    if replicas > 1:
        if bool((counts % replicas).any()):
            notes.append(f"counts are not all multiples of --replicas {replicas}; they were rounded down")
        counts = counts // replicas
        tokens = None if tokens is None else tokens // replicas
    if int(counts.sum()) == 0:
        raise DataError("the dumps hold no expert selections for this model's MoE layers")
    exact = tokens is not None
    if tokens is None:
        # Every token selects K_base experts, so each layer's count over K_base is its tokens.
        tokens = (counts.sum(-1) + identity.k_base // 2) // identity.k_base
    return ImportedUsage(counts.long(), tokens.long(), sequences, exact, [str(f) for f in files], notes)
