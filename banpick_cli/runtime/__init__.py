"""Apply a routing profile: the HF transformers runtime, the plan every runtime shares, engine plugins.

    from banpick_cli.runtime import apply
    with apply(model, "profile.safetensors", method="banpick", domain="math") as handle:
        model.generate(...)
    handle.stats()

Engine plugins (vllm_plugin, sglang_plugin) import their engine lazily; this package does not.
"""

from banpick_cli.runtime.hf import RoutingHandle, RoutingStats, apply, remove
from banpick_cli.runtime.plan import METHODS, RoutingPlan, build_plan

__all__ = ["METHODS", "RoutingHandle", "RoutingPlan", "RoutingStats", "apply", "build_plan", "remove"]
