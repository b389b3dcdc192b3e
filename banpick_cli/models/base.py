"""The adapter contract: where a family keeps its MoE blocks and routers, and how it routes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn

from banpick_cli.routing import RouterSpec

# A route override receives the router's own output for one MoE layer and returns the
# (weights, indices) the experts should use instead. Index == num_experts means "no expert".
#   fn(position, router_logits [T, E], weights [T, K], indices [T, K]) -> (weights [T, W], indices [T, W])
RouteFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# An observer sees the final (weights, indices) the experts receive, after any override.
ObserveFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]



@dataclass(frozen=True)
class MoELayer:
    """One sparse MoE block: its position among MoE layers, its decoder-layer index, its router."""

    position: int  # 0..num_moe_layers-1: the row in every [moe_layers, experts] tensor
    layer_index: int  # index in model.model.layers
    block: nn.Module
    router: nn.Module


class MoEAdapter:
    """Base adapter. Families differ in config names, which layers are sparse, and routing rules.

    transformers 5.24 gives every supported family the same block shape: `layers[i].mlp` holds a
    router `gate` returning (router_logits, top_k_weights, top_k_index) and an `experts` module that
    skips index == num_experts. The adapter reads and replaces the router's output through a forward
    hook on `gate`, so the state dict, and the experts loop, stay untouched.
    """

    model_types: tuple[str, ...] = ()
    family: str = ""
    # The MoE block's module name in checkpoints and serving engines ("model.layers.3.mlp.gate"); a family
    # whose original checkpoints name it otherwise lists that name too (Mixtral: block_sparse_moe).
    block_names: tuple[str, ...] = ("mlp",)

    # --- what differs per family -------------------------------------------------------------
    def routing_config(self, config: Any) -> RouterSpec:
        """Returns the family's router rule from a transformers config (no per-layer tensors)."""
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        """Returns the decoder stack (the module with `.layers`), skipping the LM head wrapper."""
        return model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model

    def output_head(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """Returns (final norm, LM head): what turns the last decoder layer's output into logits.

        The KL engine replays decoder layers from a stored hidden state and finishes with these two,
        which must give the same logits as the model's own forward (no softcapping or scaling in
        any supported family; a family that has them overrides this).
        """
        return self.decoder(model).norm, model.get_output_embeddings()

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        """Returns every sparse MoE block in order, with its router."""
        found = []
        for index, layer in enumerate(self.decoder(model).layers):
            mlp = getattr(layer, "mlp", None)
            router = getattr(mlp, "gate", None)
            # Dense layers (DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers) have no router.
            if mlp is None or router is None or not hasattr(mlp, "experts"):
                continue
            found.append(MoELayer(len(found), index, mlp, router))
        return found

    def router_spec(self, layer: MoELayer, routing: RouterSpec) -> RouterSpec:
        """Returns the routing core's description of this layer's router (its own rule, exactly)."""
        bias = getattr(layer.router, "e_score_correction_bias", None)
        return replace(routing, correction_bias=None if bias is None else bias.detach())

    def router_tensors(self, layer: MoELayer) -> dict[str, torch.Tensor]:
        """Returns the router parameters that decide routing (hashed into the fingerprint)."""
        out = {"weight": layer.router.weight}
        bias = getattr(layer.router, "e_score_correction_bias", None)
        if bias is not None:
            out["e_score_correction_bias"] = bias
        return out


@dataclass
class RoutingHooks:
    """Forward hooks on every router of a model: observers and per-layer overrides.

    Install once with `install`, change `overrides`/`observers` freely, `remove` when done.
    `token_mask` (bool [tokens]) tells observers which flattened positions are real tokens.
    """

    layers: list[MoELayer]
    num_experts: int
    overrides: dict[int, RouteFn] = field(default_factory=dict)
    observers: list[ObserveFn] = field(default_factory=list)
    token_mask: torch.Tensor | None = None
    _handles: list[Any] = field(default_factory=list)
    _saved_flags: list[tuple[nn.Module, bool]] = field(default_factory=list)

    def install(self) -> "RoutingHooks":
        for layer in self.layers:
            self._handles.append(layer.router.register_forward_hook(self._make_hook(layer)))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for experts, flag in self._saved_flags:
            experts._is_expert_parallel = flag
        self._saved_flags.clear()

    def _make_sentinels_safe(self, experts: nn.Module) -> None:
        # transformers 5.24 `grouped_mm`/`batched_mm` experts (the default when loaded with
        # from_pretrained) handle index == num_experts only on their expert-parallel path; otherwise
        # the kernel leaves those output rows uninitialised and weight 0 * NaN poisons the token.
        # That path only masks sentinel rows (integrations/moe.py), and grouped_mm then skips them
        # at no compute. The eager loop skips them regardless. Restored by `remove`. Set lazily, on
        # the first override of a layer: the masking costs ~25% of a CPU forward, which pure
        # observers (profile) should not pay.
        if hasattr(experts, "_is_expert_parallel") and all(e is not experts for e, _ in self._saved_flags):
            self._saved_flags.append((experts, experts._is_expert_parallel))
            experts._is_expert_parallel = True

    def __enter__(self) -> "RoutingHooks":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _make_hook(self, layer: MoELayer):
        position = layer.position

        def hook(module: nn.Module, args: tuple, output: tuple) -> tuple | None:
            logits, weights, indices = output
            override = self.overrides.get(position)
            if override is not None:
                self._make_sentinels_safe(layer.block.experts)
                weights, indices = override(position, logits, weights, indices)
            for observe in self.observers:
                observe(position, logits, weights, indices)
            return (logits, weights, indices) if override is not None else None

        return hook


# The adapters by `config.model_type`: filled by `register` (each family's module), read by registry.py.
ADAPTERS: dict[str, MoEAdapter] = {}


def register(adapter_cls: type[MoEAdapter]) -> type[MoEAdapter]:
    """Class decorator: registers one adapter for each of its model types."""
    adapter = adapter_cls()
    for model_type in adapter_cls.model_types:
        ADAPTERS[model_type] = adapter
    return adapter_cls
