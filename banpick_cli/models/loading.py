"""Load a model through transformers, find its adapter, and describe it for a profile."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from banpick_cli.checks import file_problem
from banpick_cli.errors import BadSetting, ModelError, import_extra
from banpick_cli.models.base import MoEAdapter, MoELayer
from banpick_cli.models.experts import use_sliced_experts
from banpick_cli.models.registry import adapter_for
from banpick_cli.profile.fingerprint import router_fingerprint
from banpick_cli.profile.identity import ModelIdentity
from banpick_cli.routing import RouterSpec
from banpick_cli.paths import DEMO_MODEL_DIR, DEMO_MODEL_NAME

# Short names users type, as in `banpick profile --model Qwen3-30B-A3B`.
HUB_ALIASES = {
    "Qwen3-30B-A3B": "Qwen/Qwen3-30B-A3B",
    "Qwen3-235B-A22B": "Qwen/Qwen3-235B-A22B",
    "Qwen1.5-MoE-A2.7B": "Qwen/Qwen1.5-MoE-A2.7B",
    "DeepSeek-V2-Lite": "deepseek-ai/DeepSeek-V2-Lite",
    "DeepSeek-V2-Lite-Chat": "deepseek-ai/DeepSeek-V2-Lite-Chat",
    "OLMoE-1B-7B": "allenai/OLMoE-1B-7B-0924",
    "Mixtral-8x7B": "mistralai/Mixtral-8x7B-v0.1",
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}




@dataclass
class LoadedModel:
    """A model ready for calibration: the HF model, its tokenizer, adapter, MoE layers, identity."""

    model: nn.Module
    tokenizer: Any
    adapter: MoEAdapter
    layers: list[MoELayer]
    routing: RouterSpec  # the model's own rule (per-layer tensors live in router_specs())
    identity: ModelIdentity
    fingerprint: str
    device: torch.device
    # Set when the weights are streamed from the checkpoint (passes/streaming.py): the decoder layers stay
    # on the meta device and a pass materialises each one while it runs it.
    streamed: Any = None

    def router_specs(self) -> list["RouterSpec"]:
        """Returns one RouterSpec per MoE layer (the model's own routing rule), in layer order."""
        return [self.adapter.router_spec(layer, self.routing) for layer in self.layers]


def resolve_model_name(name: str) -> str:
    """Returns a local path or hub id for a user's --model value."""
    if name == DEMO_MODEL_NAME:
        if not (DEMO_MODEL_DIR / "config.json").exists():
            raise ModelError(f"the demo model is missing at {DEMO_MODEL_DIR}: reinstall banpick (its wheel carries it) "
                             "or, in a checkout, run `make demo-model`")
        return str(DEMO_MODEL_DIR)
    return HUB_ALIASES.get(name, name)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadSetting(f"--device {device}: no CUDA device is available here; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise BadSetting(f"--device {device}: {err}") from None


def _map_device(device_map: str | dict) -> torch.device:
    """Returns the device a device map mostly uses, for choosing the default dtype."""
    if isinstance(device_map, dict):
        on_gpu = any(str(v) not in ("cpu", "disk", "meta") for v in device_map.values())
        return torch.device("cuda" if on_gpu and torch.cuda.is_available() else "cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise BadSetting(f"--dtype {dtype}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_config(name: str) -> tuple[str, Any]:
    """Returns (resolved path or hub id, transformers config) or raises a one-line ModelError."""
    from transformers import AutoConfig

    resolved = resolve_model_name(name)
    local = Path(resolved)
    problem = file_problem(local)
    if problem not in (None, "not found", "is a folder, not a file"):  # a symlink loop, a FIFO: say what it is
        raise ModelError(f"model {resolved} {problem}")
    if local.exists() and not local.is_dir():
        raise ModelError(f"model {resolved} is a file: give the folder that holds config.json and the weights")
    if local.exists() and not (local / "config.json").exists():
        raise ModelError(f"model directory {resolved} has no config.json")
    if not local.exists() and (resolved.startswith((".", "/", "~")) or resolved.count("/") > 1):
        raise ModelError(f"model not found: {resolved} (no such directory)")
    try:
        return resolved, AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0][:160]
        raise ModelError(
            f"cannot load model '{resolved}': not a local model directory, and the hub did not provide it ({reason})"
        ) from None


def build_meta(config: Any, dtype: torch.dtype) -> nn.Module:
    """Returns the model of `config` with every parameter and buffer on the meta device (no memory, no init)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    use_sliced_experts(model)
    return model.eval()


def check_model(name: str) -> tuple[str, Any, MoEAdapter]:
    """Returns (resolved path or hub id, config, adapter) after reading only the model's config, or raises a
    one-line ModelError: a missing path, a folder without config.json, a dense or unsupported model.

    Stages call it before fetching any data, so a mistyped --model is reported as a model problem in
    well under a second, not after a dataset download."""
    resolved, config = load_config(name)
    return resolved, config, adapter_for(config)


def load_model(name: str, *, device: str = "auto", dtype: str = "auto", device_map: str | dict | None = None) -> LoadedModel:
    """Loads a supported MoE model with from_pretrained, in eval mode, with its adapter.

    `device_map` ("auto", "balanced", ... or a dict) spreads the layers over every visible GPU
    through accelerate, for models that do not fit one; inputs then go to the embedding's device.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved, config = load_config(name)
    adapter = adapter_for(config)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device if device_map is None else _map_device(device_map))
    quant = getattr(config, "quantization_config", None)
    quant = quant if quant is None or isinstance(quant, dict) else quant.to_dict()
    if quant and quant.get("quant_method") == "fp8" and torch_device.type == "cpu" and device_map is None:
        # transformers dequantizes FP8 on the CPU with a block of (rows / scale rows): wrong for DeepSeek-V3's
        # partial 128x128 edge blocks (576-row kv_a_proj_with_mqa: an error; other shapes: wrong values).
        raise ModelError(f"'{name}' is an FP8 block-quantized checkpoint, which loads on the CPU only with --stream "
                         "(it dequantizes each layer as it is read)")
    extra: dict[str, Any] = {}
    if device_map is not None:
        import_extra("accelerate", "scale", "--device-map")  # from_pretrained needs it for device_map
        extra["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=torch_dtype, **extra)
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError, SafetensorError) as err:  # SafetensorError: a corrupt or truncated shard
        reason = str(err).strip().splitlines()[0][:160]
        raise ModelError(f"cannot load model '{resolved}': {reason}") from None
    if device_map is None:
        model.to(torch_device)
    else:
        # accelerate placed the layers; batches start where the embedding lives.
        torch_device = model.get_input_embeddings().weight.device
    model.eval()
    use_sliced_experts(model)  # the same bits as transformers' grouped_mm experts, in less memory
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return describe(model, tokenizer, adapter, name_or_path=name, device=torch_device)


def describe(model: nn.Module, tokenizer: Any, adapter: MoEAdapter, *, name_or_path: str, device: torch.device) -> LoadedModel:
    """Wraps an already-loaded HF model (the library entry point for users who load it themselves)."""
    layers, routing, identity = identify(model, adapter, name_or_path=name_or_path)
    return LoadedModel(model, tokenizer, adapter, layers, routing, identity, fingerprint(adapter, layers), device)


def identify(model: nn.Module, adapter: MoEAdapter, *, name_or_path: str) -> tuple[list[MoELayer], RouterSpec, ModelIdentity]:
    """Returns a model's MoE layers, routing rule and identity; works on a weightless (meta) model too."""
    layers = adapter.moe_layers(model)
    if not layers:
        raise ModelError(f"'{name_or_path}' has no MoE layers that banpick can find")
    routing = adapter.routing_config(model.config)
    config = model.config
    identity = ModelIdentity(
        name_or_path=str(name_or_path),
        architecture=(getattr(config, "architectures", None) or [type(model).__name__])[0],
        model_type=config.model_type,
        num_layers=len(adapter.decoder(model).layers),
        moe_layers=tuple(layer.layer_index for layer in layers),
        vocab_size=int(config.vocab_size),
        router=routing,
    )
    return layers, routing, identity


def fingerprint(adapter: MoEAdapter, layers: list[MoELayer]) -> str:
    """Returns the profile-format fingerprint of the loaded routers (profile/fingerprint.py)."""
    return router_fingerprint((layer.layer_index, name, tensor) for layer in layers
                              for name, tensor in adapter.router_tensors(layer).items())
