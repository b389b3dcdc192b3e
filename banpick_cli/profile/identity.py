"""The model a profile belongs to: its layout and its router's rule (the routing core's RouterSpec)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from banpick_cli.routing.spec import RouterSpec

# The router fields a profile's "model" record holds, flat, under these names (format v1).
_ROUTER_FIELDS = ("scoring", "renormalize", "routed_scaling_factor", "topk_method", "n_group", "topk_group",
                  "weights_in_logits_dtype")


@dataclass(frozen=True)
class ModelIdentity:
    """What a profile records about the model it was made for: its layout and its routers' rule."""

    name_or_path: str
    architecture: str
    model_type: str
    num_layers: int
    moe_layers: tuple[int, ...]
    vocab_size: int
    router: RouterSpec  # the model's own rule, without per-layer tensors (correction_bias is None)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelIdentity) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, str(v)) for k, v in self.to_dict().items())))

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def k_base(self) -> int:
        return self.router.top_k

    def router_specs(self, correction_bias: list | None = None) -> list[RouterSpec]:
        """Returns one RouterSpec per MoE layer; engines pass DeepSeek-V3's per-layer correction bias."""
        biases = correction_bias or [None] * len(self.moe_layers)
        return [replace(self.router, correction_bias=bias) for bias in biases]

    def to_dict(self) -> dict[str, Any]:
        r = self.router
        out: dict[str, Any] = {
            "name_or_path": self.name_or_path, "architecture": self.architecture, "model_type": self.model_type,
            "num_layers": self.num_layers, "moe_layers": list(self.moe_layers), "vocab_size": self.vocab_size,
            "num_experts": r.num_experts, "k_base": r.top_k,
        }
        out.update({name: getattr(r, name) for name in _ROUTER_FIELDS})
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelIdentity":
        """Returns the identity a profile recorded (profiles written before `weights_in_logits_dtype` was
        recorded read it as False: their routing then keeps float32 weights)."""
        known = {f.name for f in fields(cls)} - {"router"}
        router = RouterSpec(
            num_experts=int(data["num_experts"]), top_k=int(data["k_base"]),
            **{name: data[name] for name in _ROUTER_FIELDS if name in data},
        )
        return cls(**{k: v for k, v in data.items() if k in known} | {
            "moe_layers": tuple(int(i) for i in data["moe_layers"]), "router": router})
