"""The comparison's statistics against closed forms, published t tables, numpy, and simulation."""

import math

import numpy as np
import pytest

from mft_pipeline.compare.stats import Interval, frontier_gap, mean_interval, paired_difference, paired_verdict, s_at_dg, t_critical

# Two-sided 95% critical values t_{0.975, df} as printed in standard tables (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2).
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 9: 2.262, 10: 2.228, 19: 2.093, 29: 2.045, 30: 2.042, 100: 1.984}
# Two-sided 90% and 99% values (the same tables' 0.95 and 0.995 columns).
T_TABLE_90 = {2: 2.920, 4: 2.132, 10: 1.812}
T_TABLE_99 = {2: 9.925, 4: 4.604, 10: 3.169}


@pytest.mark.parametrize("df,t", sorted(T_TABLE.items()))
def test_interval_half_width_is_the_published_t_value(df, t):
    # Values -1 and +1 around 0 plus zeros: mean 0 and sample sd sqrt(2 / df), so sd / sqrt(n) is sqrt(2 / (df (df + 1))).
    n = df + 1
    values = [-1.0, 1.0] + [0.0] * (n - 2)
    iv = mean_interval(values)
    assert iv.mean == 0 and iv.n == n
    assert iv.half_width / math.sqrt(2 / (df * n)) == pytest.approx(t, abs=6e-4)
    assert t_critical(n) == pytest.approx(t, abs=6e-4)


def test_other_confidence_levels_match_the_tables():
    for table, confidence in ((T_TABLE_90, 0.90), (T_TABLE_99, 0.99)):
        for df, t in table.items():
            assert t_critical(df + 1, confidence) == pytest.approx(t, abs=6e-4)


def test_t_critical_matches_closed_forms():
    # df = 1 is the Cauchy distribution; df = 2 has F^{-1}(p) = (2p - 1) / sqrt(2 p (1 - p)).
    for confidence in (0.2, 0.8, 0.95, 0.99):
        p = (1 + confidence) / 2
        assert t_critical(2, confidence) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
        assert t_critical(3, confidence) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)
    # Large df: the t distribution approaches the standard normal.
    assert t_critical(2001) == pytest.approx(1.959963984540054, abs=2e-3)


def test_mean_interval_by_hand():
    # mean 2, sample sd 1, n 3: half width t_{0.975,2} / sqrt(3) = 4.302653 / 1.732051 = 2.484138.
    iv = mean_interval([1.0, 2.0, 3.0])
    assert (iv.mean, iv.n) == (2.0, 3)
    assert iv.low == pytest.approx(2 - 2.484138, abs=1e-6) and iv.high == pytest.approx(2 + 2.484138, abs=1e-6)
    assert mean_interval([1.0, 2.0, 3.0], 0.9).half_width < iv.half_width


def test_one_value_has_no_interval():
    iv = mean_interval([0.3])
    assert iv.mean == 0.3 and math.isnan(iv.low) and math.isnan(iv.high) and not iv.excludes_zero()
    with pytest.raises(ValueError):
        mean_interval([])


def test_t_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    trials, n = 4000, 3
    samples = rng.normal(5.0, 2.0, size=(trials, n))
    covered = sum(iv.low <= 5.0 <= iv.high for iv in (mean_interval(list(s)) for s in samples))
    assert covered / trials == pytest.approx(0.95, abs=0.012)


def test_paired_difference_uses_common_seeds_only():
    mft = {0: 0.10, 1: 0.05, 2: 0.08, 3: 9.0}
    ft = {0: 0.30, 1: 0.20, 2: 0.31}
    diff = paired_difference(mft, ft)
    d = np.array([-0.20, -0.15, -0.23])
    half = 4.302652729749 * d.std(ddof=1) / math.sqrt(3)
    assert diff.n == 3 and diff.mean == pytest.approx(d.mean()) and diff.high == pytest.approx(d.mean() + half)
    assert diff.excludes_zero()
    assert "lower than FT's beyond the 95% interval" in paired_verdict(diff, "MFT", "FT")


def test_paired_verdicts():
    assert "contains 0" in paired_verdict(Interval(-0.1, -0.3, 0.1, 3), "MFT", "FT")
    assert "higher" in paired_verdict(Interval(0.2, 0.1, 0.3, 3), "MFT", "FT")
    assert "no verdict" in paired_verdict(Interval(-0.2, math.nan, math.nan, 1), "MFT", "FT")


def test_s_at_dg_interpolates_and_takes_the_best_crossing():
    line = [(10.0, 0.0), (20.0, 2.0), (30.0, 6.0)]
    assert s_at_dg(line, 1.0) == pytest.approx(15.0)
    assert s_at_dg(line, 4.0) == pytest.approx(25.0)
    assert math.isnan(s_at_dg(line, 7.0))
    # DG goes down then up along tau: DG = -1 is crossed at S = 5 and at S = 12.5; the frontier offers the larger.
    bent = [(0.0, 0.0), (10.0, -2.0), (15.0, 0.0)]
    assert s_at_dg(bent, -1.0) == pytest.approx(12.5)


def test_frontier_gap_dominated_and_not():
    cached = [(10.0, 0.0), (20.0, 2.0), (30.0, 4.0)]
    dense = [(14.0, 1.0), (24.0, 3.0), (34.0, 5.0)]  # S = 9 + 5 DG against the cached 10 + 5 DG: 1 less
    gap = frontier_gap(cached, dense, points=5)
    assert [r[0] for r in gap.rows] == pytest.approx([1.0, 1.75, 2.5, 3.25, 4.0])
    assert gap.gaps == pytest.approx([-1.0] * 5) and gap.dominated is False
    better = [(s + 3.0, d) for s, d in cached]
    assert frontier_gap(cached, better).dominated is True and frontier_gap(cached, better).mean_gap == pytest.approx(3.0)
    assert frontier_gap(cached, [(1.0, 10.0), (2.0, 11.0)]).dominated is None
