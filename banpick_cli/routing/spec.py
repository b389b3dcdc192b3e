"""The router's own rule (RouterSpec) and what every routing function returns (Routing)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import torch

SCORINGS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(frozen=True, eq=False)
class RouterSpec:
    """How a model's router turns logits [T, E] into (weights, indices); validated at construction.

    One spec reproduces each transformers 5.24 router:
      Qwen3/Qwen2-MoE, OLMoE  softmax, greedy, renormalize=norm_topk_prob, weights_in_logits_dtype=True
      Mixtral                 softmax, greedy, renormalize=True (weights stay float32)
      DeepSeek-V2             softmax, greedy | group_limited_greedy, renormalize=False, routed scaling
      DeepSeek-V3             sigmoid, noaux_tc (correction_bias for choice only), renormalize=norm_topk_prob
    """

    num_experts: int
    top_k: int
    scoring: str  # "softmax" | "sigmoid"
    renormalize: bool
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"  # "greedy" | "group_limited_greedy" | "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    correction_bias: torch.Tensor | None = None  # [E] added to the scores for the choice only
    # Qwen3/Qwen2/OLMoE cast their weights back to the logits' dtype (bf16 in bf16 models);
    # Mixtral and DeepSeek return float32. Set True to reproduce the former bit for bit.
    weights_in_logits_dtype: bool = False

    def __post_init__(self) -> None:
        e = self.num_experts
        if not isinstance(e, int) or isinstance(e, bool) or e < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {e!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not 1 <= self.top_k <= e:
            raise ValueError(f"top_k must be an integer in [1, num_experts={e}], got {self.top_k!r}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method must be one of {TOPK_METHODS}, got {self.topk_method!r}")
        if not isinstance(self.renormalize, bool):
            raise ValueError(f"renormalize must be a bool, got {self.renormalize!r}")
        scale = self.routed_scaling_factor
        if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"routed_scaling_factor must be a finite number > 0, got {scale!r}")
        g, tg = self.n_group, self.topk_group
        if not isinstance(g, int) or g < 1 or e % g:
            raise ValueError(f"n_group must be an integer >= 1 that divides num_experts={e}, got {g!r}")
        if not isinstance(tg, int) or not 1 <= tg <= g:
            raise ValueError(f"topk_group must be an integer in [1, n_group={g}], got {tg!r}")
        if self.topk_method == "noaux_tc" and e // g < 2:
            raise ValueError(f"noaux_tc scores each group by its top-2 experts; num_experts/n_group is {e // g}")
        if self.topk_method != "greedy" and tg * (e // g) < self.top_k:
            raise ValueError(f"topk_group={tg} groups of {e // g} experts cannot hold top_k={self.top_k}")
        bias = self.correction_bias
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.shape != (e,) or not bias.is_floating_point():
                raise ValueError(f"correction_bias must be a float tensor of shape [{e}], got {_describe(bias)}")
            object.__setattr__(self, "correction_bias", bias.detach().float())

    @property
    def group_size(self) -> int:
        """Returns the number of experts in one routing group."""
        return self.num_experts // self.n_group

    def available(self) -> int:
        """Returns how many experts the router can choose among for one token (group limits included)."""
        if self.topk_method == "greedy":
            return self.num_experts
        return self.topk_group * self.group_size

    def _key(self) -> tuple:
        bias = None if self.correction_bias is None else tuple(self.correction_bias.tolist())
        return tuple(bias if f.name == "correction_bias" else getattr(self, f.name) for f in fields(self))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RouterSpec) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


@dataclass(frozen=True)
class Routing:
    """Experts and weights per token; a slot with index == num_experts holds no expert and weight 0.

    indices: long [T, W]; weights: [T, W] (float32, or the logits' dtype when the spec says so);
    k: long [T], how many slots of each token hold a real expert. Real experts come first, in the
    router's order of preference, and "no expert" slots trail.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    k: torch.Tensor

    @property
    def width(self) -> int:
        """Returns W, the number of slots per token."""
        return self.indices.shape[1]

    def as_router_output(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (weights, indices), the order transformers' routers return them in."""
        return self.weights, self.indices

    def sentinel_free(self, num_experts: int) -> "Routing":
        """Returns this routing with each "no expert" slot pointing at the token's first slot's expert
        (expert 0 if it has none) with weight 0.

        For experts kernels that cannot skip index == E: transformers' `grouped_mm` leaves those rows
        uninitialised (NaN out) and `batched_mm` indexes out of range, unless in expert-parallel mode.
        The output is unchanged; the compute of the filled slots is spent.
        """
        real = self.indices < num_experts
        first = self.indices[:, :1] % num_experts  # "no expert" (num_experts) -> expert 0
        indices = torch.where(real, self.indices, first)
        return Routing(indices=indices, weights=torch.where(real, self.weights, scalar(0.0, real.device)), k=self.k)


def scalar(value: int | float, device: torch.device) -> torch.Tensor | int | float:
    """Returns `value` for an op on `device`: on the CPU a 0-dim tensor made once (int64 or float32; it does not
    change the op's result dtype), elsewhere the number itself. A Python number makes a tensor in every op that
    takes it, 1-3 µs of a 2-5 µs op at one token (bench/bench_route.py)."""
    return _cpu_scalar(value, type(value)) if device.type == "cpu" else value


@functools.lru_cache(maxsize=64)
def _cpu_scalar(value: int | float, kind: type) -> torch.Tensor:
    return torch.tensor(value)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {list(x.shape)} and dtype {x.dtype}"
    return repr(x)
