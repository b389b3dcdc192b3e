"""One registry of model-family adapters, keyed by `config.model_type`."""

from __future__ import annotations

from typing import Any

from banpick_cli.errors import ModelError, UnsupportedArchitecture
from banpick_cli.models.base import MoEAdapter

_ADAPTERS: dict[str, MoEAdapter] = {}


def register(adapter_cls: type[MoEAdapter]) -> type[MoEAdapter]:
    """Class decorator: registers one adapter for each of its model types."""
    adapter = adapter_cls()
    for model_type in adapter_cls.model_types:
        _ADAPTERS[model_type] = adapter
    return adapter_cls


def supported_model_types() -> list[str]:
    """Returns the model types with an adapter, sorted."""
    _load_builtin()
    return sorted(_ADAPTERS)


def adapter_for(config: Any) -> MoEAdapter:
    """Returns the adapter for a transformers config, or raises a one-line error."""
    _load_builtin()
    model_type = getattr(config, "model_type", None)
    adapter = _ADAPTERS.get(model_type)
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
    # Importing the family modules runs their @register decorators.
    from banpick_cli.models import families  # noqa: F401
