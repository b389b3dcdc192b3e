"""Apply a routing profile: the HF transformers runtime, the plan every runtime shares, engine plugins.

    from banpick_cli.runtime import apply
    with apply(model, "profile.safetensors", method="banpick", domain="math") as handle:
        model.generate(...)
    handle.stats()

The names below load on first use, so that an engine plugin importing `banpick_cli.runtime.engine` pulls
in neither the HF runtime nor transformers.
"""

from importlib import import_module
from typing import Any

_LAZY = {
    "RoutingHandle": "hf", "RoutingStats": "hf", "apply": "hf", "remove": "hf",
    "METHODS": "methods", "RoutingPlan": "plan", "build_plan": "plan",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'banpick_cli.runtime' has no attribute {name!r}")
    return getattr(import_module(f"banpick_cli.runtime.{_LAZY[name]}"), name)
