"""Model-family adapters behind one registry, and model loading."""

from banpick_cli.models.base import MoEAdapter, MoELayer, RoutingHooks
from banpick_cli.models.base import register
from banpick_cli.models.registry import adapter_for, supported_model_types

__all__ = [
    "MoEAdapter",
    "MoELayer",
    "RoutingHooks",
    "adapter_for",
    "register",
    "supported_model_types",
]
