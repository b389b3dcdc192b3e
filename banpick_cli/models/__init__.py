"""Model-family adapters behind one registry, and model loading."""

from banpick_cli.models.base import MoEAdapter, MoELayer, RoutingConfig, RoutingHooks
from banpick_cli.models.registry import adapter_for, register, supported_model_types

__all__ = [
    "MoEAdapter",
    "MoELayer",
    "RoutingConfig",
    "RoutingHooks",
    "adapter_for",
    "register",
    "supported_model_types",
]
