"""One registry of model-family adapters, keyed by `config.model_type`."""

from __future__ import annotations

import re
from typing import Any

from banpick_cli.errors import ModelError, UnsupportedArchitecture
from banpick_cli.models.base import ADAPTERS, MoEAdapter



def supported_model_types() -> list[str]:
    """Returns the model types with an adapter, sorted."""
    _load_builtin()
    return sorted(ADAPTERS)


def adapter_for(config: Any) -> MoEAdapter:
    """Returns the adapter for a transformers config, or raises a one-line error."""
    _load_builtin()
    model_type = getattr(config, "model_type", None)
    adapter = ADAPTERS.get(model_type)
    if adapter is not None:
        return adapter
    supported = ", ".join(supported_model_types())
    if not _looks_moe(config):
        raise ModelError(
            f"'{model_type}' is a dense model (no experts): banpick needs a Mixture-of-Experts model; "
            f"supported: {supported}"
        )
    raise UnsupportedArchitecture(f"unsupported MoE architecture '{model_type}'; supported: {supported}")


def _looks_moe(config: Any) -> bool:
    names = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    return any(getattr(config, name, None) for name in names)


def _load_builtin() -> None:
    # Importing the family modules runs their @register decorators (models.base.register).
    from banpick_cli.models import families  # noqa: F401


def block_names() -> tuple[str, ...]:
    """Returns every family's MoE block module names ("mlp", Mixtral's "block_sparse_moe"), sorted."""
    _load_builtin()
    return tuple(sorted({name for adapter in ADAPTERS.values() for name in adapter.block_names}))


def gate_pattern() -> re.Pattern[str]:
    """Returns the pattern of a router gate's module name in a checkpoint or an engine's model, its decoder
    layer index as group 1: "model.layers.3.mlp.gate", "model.layers.3.block_sparse_moe.gate"."""
    names = "|".join(map(re.escape, block_names()))
    return re.compile(rf"(?:^|\.)layers\.(\d+)\.(?:{names})\.gate$")
