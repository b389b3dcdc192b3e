"""DeepSeek-V3's FP8 checkpoint format, made from a saved model: every decoder-layer projection as
`float8_e4m3fn` with one float32 `weight_scale_inv` per 128x128 block (edge blocks partial), and the
config's `quantization_config`; and its dequantized twin (the same FP8 values times their scales, saved
in the twin's dtype, no scales, no quantization_config)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

QUANT = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
BLOCK = 128


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (float8_e4m3fn weight, float32 scale per 128x128 block) as DeepSeek-V3's release stores them."""
    rows, cols = weight.shape
    br, bc = -(-rows // BLOCK), -(-cols // BLOCK)
    padded = torch.zeros(br * BLOCK, bc * BLOCK)
    padded[:rows, :cols] = weight.float()
    scale = padded.reshape(br, BLOCK, bc, BLOCK).abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # e4m3's max
    return (weight.float() / expand(scale, rows, cols)).to(torch.float8_e4m3fn), scale


def expand(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]


def write_fp8_pair(source: Path, fp8: Path, twin: Path, twin_dtype: torch.dtype = torch.float32) -> int:
    """Writes `source`'s model as an FP8 checkpoint and as its dequantized twin; returns the FP8 tensors' count."""
    from safetensors.torch import load_file, save_file

    state = {}
    for shard in sorted(source.glob("*.safetensors")):
        state.update(load_file(shard))
    quantized, dequantized = {}, {}
    for key, value in state.items():
        if key.startswith("model.layers.") and key.endswith("proj.weight") and value.ndim == 2:
            q, scale = quantize(value)
            quantized[key], quantized[key + "_scale_inv"] = q, scale
            dequantized[key] = (q.float() * expand(scale, *value.shape)).to(twin_dtype)
        else:
            quantized[key] = dequantized[key] = value  # not quantized: the same tensor in both
    for folder, tensors, quant in ((fp8, quantized, True), (twin, dequantized, False)):
        folder.mkdir(parents=True, exist_ok=True)
        for item in source.iterdir():
            if item.suffix != ".safetensors" and item.name != "model.safetensors.index.json" and item.is_file():
                shutil.copy(item, folder / item.name)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        if quant:
            config["quantization_config"] = QUANT
        (folder / "config.json").write_text(json.dumps(config, indent=1))
    return sum(1 for v in quantized.values() if v.dtype == torch.float8_e4m3fn)
