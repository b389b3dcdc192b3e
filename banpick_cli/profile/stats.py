"""Pure statistics over profile tensors: usage frequency, ratio to the layer mean, candidates."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from banpick_cli.checks import number


@dataclass(frozen=True)
class CandidateRule:
    """Which experts count as domain-specialised candidates.

    An expert is a candidate when its selection frequency is at least `min_ratio` times the layer
    mean (the mean is K_base / experts: every token picks K_base experts), or when it is among the
    `top_n` most used of its layer (0 turns that arm off). Defaults: ratio 2.0, top 0.
    """

    min_ratio: float = 2.0
    top_n: int = 0

    def __post_init__(self) -> None:
        number("--candidate-ratio", self.min_ratio, low=0, low_open=True)
        number("--candidate-top", self.top_n, low=0, integer=True)

    def to_dict(self) -> dict:
        return asdict(self)


def usage_frequency(counts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Returns the share of tokens that selected each expert. # [moe_layers, experts]"""
    return counts.double() / tokens.clamp(min=1).double().unsqueeze(-1)


def usage_ratio(counts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Returns each expert's selection count over its layer's mean count. # [moe_layers, experts]"""
    mean = counts.double().mean(dim=-1, keepdim=True).clamp(min=1e-12)
    return counts.double() / mean


def candidate_mask(counts: torch.Tensor, tokens: torch.Tensor, rule: CandidateRule) -> torch.Tensor:
    """Returns the candidate experts under `rule` as a bool mask. # [moe_layers, experts]"""
    ratio = usage_ratio(counts, tokens)
    mask = ratio >= rule.min_ratio
    if rule.top_n:
        top = torch.topk(counts, min(rule.top_n, counts.shape[-1]), dim=-1).indices
        mask |= torch.zeros_like(mask).scatter_(-1, top, True)
    return mask & (counts > 0)
