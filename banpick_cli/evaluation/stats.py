"""Paired statistics of a method against the baseline on the same tasks: bootstrap interval and McNemar.

Every eval row and every failure-probe gain is a difference of a few tasks out of tens; these say how
large a difference the tasks can tell apart. Pure functions over per-task outcomes (True = correct).

    paired(base, other)      difference in accuracy points, its 95% paired-bootstrap interval, exact McNemar p
    mcnemar_exact(b, c)      two-sided exact McNemar p from the discordant counts
    probe_gain(fixed, n)     a failure-probe gain on n tasks (only failures rerun) as the same comparison
    compare_sets(base, row)  a row against the baseline over several task sets: overall and per set
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

RESAMPLES = 10_000
SEED = 0


@dataclass(frozen=True)
class Paired:
    """One method against the baseline on the same n tasks; accuracies and the difference in points."""

    n: int
    base_accuracy: float  # points
    accuracy: float  # points
    delta: float  # accuracy - base_accuracy, points
    ci95: tuple[float, float]  # paired bootstrap, percentile, points
    p_value: float  # exact McNemar, two-sided
    gained: int  # baseline wrong, method right
    lost: int  # baseline right, method wrong

    @property
    def significant(self) -> bool:
        """Returns whether the interval excludes 0 (and so p < 0.05, give or take the bootstrap)."""
        return self.ci95[0] > 0 or self.ci95[1] < 0

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "accuracy": round(self.accuracy, 2), "delta": round(self.delta, 2),
                "ci95": [round(self.ci95[0], 2), round(self.ci95[1], 2)], "p_value": round(self.p_value, 4),
                "gained": self.gained, "lost": self.lost}


def mcnemar_exact(b: int, c: int) -> float:
    """Returns the two-sided exact McNemar p-value for b and c discordant pairs (1.0 when there are none).

    Under the null each discordant pair goes either way with probability 1/2: p = min(1, 2 P(X <= min(b, c))),
    X ~ Binomial(b + c, 1/2).
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(
    base: Sequence[bool], other: Sequence[bool], *, groups: Sequence[Any] | None = None,
    resamples: int = RESAMPLES, seed: int = SEED,
) -> Paired:
    """Returns `other` against `base` on the same tasks (same order).

    `groups` (one label per task, e.g. the task set): the bootstrap resamples within each group and the
    accuracy is the mean of the groups' accuracies, as eval's mean column. The interval is the 2.5 and
    97.5 percentiles of `resamples` paired resamples from a generator seeded with `seed` (reproducible).
    """
    if len(base) != len(other):
        raise ValueError(f"paired outcomes need the same tasks: {len(base)} against {len(other)}")
    if not base:
        raise ValueError("paired statistics need at least one task")
    a = torch.tensor([bool(x) for x in base], dtype=torch.float64)
    b = torch.tensor([bool(x) for x in other], dtype=torch.float64)
    labels = list(groups) if groups is not None else [0] * len(base)
    if len(labels) != len(base):
        raise ValueError(f"groups has {len(labels)} labels for {len(base)} tasks")
    gen = torch.Generator().manual_seed(seed)
    draws = torch.zeros(resamples, dtype=torch.float64)
    base_acc = acc = 0.0
    members = {}
    for i, label in enumerate(labels):
        members.setdefault(label, []).append(i)
    for idx in members.values():
        at = torch.tensor(idx)
        diff = b[at] - a[at]  # [n_g]: +1 gained, -1 lost
        pick = torch.randint(len(idx), (resamples, len(idx)), generator=gen)
        draws += diff[pick].mean(-1)
        base_acc += float(a[at].mean())
        acc += float(b[at].mean())
    g = len(members)
    draws = 100 * draws / g
    lo, hi = torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    gained = int(((b == 1) & (a == 0)).sum())
    lost = int(((b == 0) & (a == 1)).sum())
    return Paired(len(base), 100 * base_acc / g, 100 * acc / g, 100 * (acc - base_acc) / g, (lo, hi),
                  mcnemar_exact(gained, lost), gained, lost)


def probe_gain(fixed: int, failures: int, n: int, **kwargs: Any) -> Paired:
    """Returns a failure-probe gain as a paired comparison on the n probed tasks.

    The probe reruns only the baseline's `failures` and counts the `fixed` ones; successes it may
    break are not measured, so they count as kept: the most favourable reading of the expert.
    """
    if not 0 <= fixed <= failures <= n:
        raise ValueError(f"need 0 <= fixed <= failures <= n, got {fixed}, {failures}, {n}")
    base = [True] * (n - failures) + [False] * failures
    other = [True] * (n - failures) + [True] * fixed + [False] * (failures - fixed)
    return paired(base, other, **kwargs)


def compare_sets(
    base: dict[str, Sequence[bool]], row: dict[str, Sequence[bool]], **kwargs: Any
) -> tuple[Paired, dict[str, Paired]]:
    """Returns (over all task sets, per task set): `row`'s outcomes against the baseline's, set by set.

    Overall, the bootstrap resamples within each set and averages the sets (eval's mean column);
    McNemar pools the discordant tasks of every set.
    """
    names = list(base)
    if set(names) != set(row):
        raise ValueError(f"task sets differ: {sorted(base)} against {sorted(row)}")
    per = {name: paired(base[name], row[name], **kwargs) for name in names}
    flat_base = [x for name in names for x in base[name]]
    flat_row = [x for name in names for x in row[name]]
    groups = [name for name in names for _ in base[name]]
    return paired(flat_base, flat_row, groups=groups, **kwargs), per


def format_interval(p: Paired) -> str:
    """Returns '+1.33 [-1.33, +4.00] p=1.00': the difference, its interval and McNemar's p, for a table cell."""
    return f"{p.delta:+.2f} [{p.ci95[0]:+.2f}, {p.ci95[1]:+.2f}] p={p.p_value:.2f}"
