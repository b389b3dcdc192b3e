"""Paired statistics: exact McNemar on hand counts, the bootstrap interval on cases with known answers."""

import math

import pytest

from banpick_cli.evaluation.stats import format_interval, mcnemar_exact, paired, probe_gain


def test_mcnemar_exact_matches_the_binomial_tail():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(1, 0) == 1.0  # one task either way: no evidence at all
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert mcnemar_exact(3, 3) == 1.0
    n = 40
    assert mcnemar_exact(10, 30) == pytest.approx(2 * sum(math.comb(n, i) for i in range(11)) / 2**n)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_one_task_in_75_is_what_it_is():
    p = probe_gain(1, 12, 75)  # the failure probe: one of 12 failures fixed, 75 tasks
    assert (p.gained, p.lost, p.n) == (1, 0, 75) and p.delta == pytest.approx(100 / 75)
    # The one fixed task is drawn 0..k times in 75 draws ~ Binomial(75, 1/75): P(0) = 0.366 > 2.5%,
    # P(>= 4) = 1.9% < 2.5% <= P(>= 3): the interval is [0, 3 tasks].
    assert p.ci95 == pytest.approx((0.0, 4.0)) and p.p_value == 1.0 and not p.significant
    assert format_interval(p) == "+1.33 [+0.00, +4.00] p=1.00"


def test_paired_counts_discordant_pairs_and_is_reproducible():
    base = [True] * 50 + [False] * 25
    other = [True] * 40 + [False] * 10 + [True] * 5 + [False] * 20  # lost 10, gained 5
    p = paired(base, other)
    assert (p.gained, p.lost) == (5, 10) and p.delta == pytest.approx(-500 / 75)
    assert p.p_value == pytest.approx(mcnemar_exact(5, 10))
    assert p.ci95[0] < p.delta < p.ci95[1] and p == paired(base, other)
    same = paired(base, base)
    assert same.ci95 == (0.0, 0.0) and same.p_value == 1.0 and same.delta == 0.0
    strong = paired([False] * 20, [True] * 20)
    assert strong.ci95 == (100.0, 100.0) and strong.p_value == pytest.approx(2 / 2**20) and strong.significant


def test_groups_resample_within_each_task_set_and_average_them():
    base = [True, True, False, False] + [True] * 8
    other = [True, True, True, False] + [True] * 7 + [False]
    p = paired(base, other, groups=["a"] * 4 + ["b"] * 8)
    assert p.base_accuracy == pytest.approx((50 + 100) / 2) and p.accuracy == pytest.approx((75 + 87.5) / 2)
    assert p.delta == pytest.approx((25 - 12.5) / 2)
    with pytest.raises(ValueError, match="same tasks"):
        paired([True], [True, False])


def test_compare_sets_is_per_set_and_pooled():
    from banpick_cli.evaluation.stats import compare_sets

    base = {"math": [True, False, False, True], "code": [True] * 4}
    row = {"math": [True, True, True, True], "code": [True, True, True, False]}
    overall, per = compare_sets(base, row)
    assert per["math"] == paired(base["math"], row["math"]) and per["code"].lost == 1
    assert (overall.gained, overall.lost) == (2, 1) and overall.p_value == pytest.approx(mcnemar_exact(2, 1))
    assert overall.delta == pytest.approx((50 - 25) / 2)
