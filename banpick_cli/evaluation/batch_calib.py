"""The batch-aware step's knob from calibration text: the candidate bound of `routing.batch_share`.

`batch_share` lets a token move a slot onto an expert the rest of its batch keeps when that expert lies
within the token's router top-`candidates`. A wider bound empties more experts per batch, by moving
slots further down each token's own ranking. `calibrate_candidates` simulates decode batches on router
logits of calibration text (`CalibrationLogits`, as `evaluation/budget.py` uses; never the scored tasks):
`batches` seeded draws of `batch_size` calibration tokens, routed by a plan (the method the step
follows) or by the model itself, then the step at every bound from K_base to 2 K_base (the router's
top-2k, Pick C's range, is the widest). It returns the narrowest bound whose reduction of distinct
experts per layer per batch is at least `share` (0.9) of the largest reduction among them: most of the
sharing, with moves as close to each token's own preference as that allows. The result is what `profile.batch.set_settings` stores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from banpick_cli.errors import BadSetting
from banpick_cli.routing import ANCHOR, RouterSpec, batch_share, distinct_experts, route
from banpick_cli.evaluation.budget import CalibrationLogits

SHARE = 0.9  # of the widest bound's reduction: what the chosen bound must reach


@dataclass(frozen=True)
class BatchCalibration:
    """The chosen candidate bound and what each bound on the grid did on the calibration batches."""

    candidates: int
    batch_size: int
    share: float
    plain: float  # distinct experts per layer per batch without the step
    distinct: dict[int, float] = field(default_factory=dict)  # bound -> the same with the step
    method: str = "model"
    source: str = ""

    def to_settings(self) -> dict[str, Any]:
        """Returns the record `profile.batch.set_settings` stores (JSON-friendly)."""
        return {"candidates": self.candidates, "anchor": ANCHOR, "batch_size": self.batch_size, "share": self.share,
                "method": self.method, "plain_distinct": round(self.plain, 3),
                "distinct": {str(k): round(v, 3) for k, v in self.distinct.items()}, "source": self.source}


def calibrate_candidates(
    specs: Sequence[RouterSpec],
    sample: CalibrationLogits,
    plan: Any = None,
    *,
    batch_size: int = 16,
    batches: int = 16,
    share: float = SHARE,
    seed: int = 0,
) -> BatchCalibration:
    """Returns the narrowest candidate bound reaching `share` of the widest bound's reduction in distinct experts.

    `plan`: a RoutingPlan whose routing the step follows (its `route(position, logits)`); None: the model's
    own top-k. Raises BadSetting (one line) for a batch size below 2, more tokens per batch than the
    sample has, or a share outside (0, 1].
    """
    specs = list(specs)
    if not isinstance(batch_size, int) or batch_size < 2:
        raise BadSetting(f"batch size must be an integer >= 2 (a batch of one shares nothing), got {batch_size!r}")
    if sample is None or sample.tokens < batch_size:
        have = 0 if sample is None else sample.tokens
        raise BadSetting(f"calibrating the batch-aware step needs at least {batch_size} calibration tokens, got {have}")
    if not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise BadSetting(f"share must be in (0, 1], got {share!r}")
    if len(sample.logits) != len(specs):
        raise BadSetting(f"calibration logits cover {len(sample.logits)} MoE layers; the model has {len(specs)}")
    k_base, most = specs[0].top_k, min(s.available() for s in specs)
    grid = list(range(min(k_base, most), min(2 * k_base, most) + 1))
    gen = torch.Generator().manual_seed(seed)
    draws = [torch.randperm(sample.tokens, generator=gen)[:batch_size] for _ in range(batches)]
    plain, sums = 0.0, dict.fromkeys(grid, 0.0)
    for position, (logits, spec) in enumerate(zip(sample.logits, specs)):
        for rows in draws:
            x = logits[rows]
            routing = route(x, spec) if plan is None else plan.route(position, x)
            plain += float(distinct_experts(routing, spec.num_experts))
            for n in grid:
                sums[n] += float(distinct_experts(batch_share(x, spec, routing, candidates=n), spec.num_experts))
    count = len(draws) * len(specs)
    plain /= count
    distinct = {n: s / count for n, s in sums.items()}
    best = max(plain - d for d in distinct.values())
    chosen = next(n for n in grid if plain - distinct[n] >= share * best - 1e-9)
    return BatchCalibration(chosen, batch_size, float(share), plain, distinct,
                            method="model" if plan is None else plan.method, source=sample.source)
