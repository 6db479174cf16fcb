"""Statistics of `mft compare`: intervals over seeds, paired differences, and frontier gaps.

Pure functions of plain numbers, so the results file's claims can be checked by hand. A frontier is
a list of (S, DG) points; ``upper_envelope`` turns a cloud of them into one. The
Student t quantiles come from scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and its two-sided Student t confidence interval (NaN bounds when n < 2)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.high < 0 or self.low > 0)


def t_critical(n: int, confidence: float = 0.95) -> float:
    """The two-sided Student t critical value for the mean of ``n`` >= 2 values: t_{(1+c)/2, n-1}."""
    return float(stats.t.ppf((1 + confidence) / 2, n - 1))


def mean_interval(values: list[float], confidence: float = 0.95) -> Interval:
    """Student t interval for the mean: mean ± t_{(1+c)/2, n-1} · sd / sqrt(n), with the n-1 sample sd."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = math.fsum(values) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_critical(n, confidence) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_difference(a: dict, b: dict, confidence: float = 0.95) -> Interval:
    """Interval for the mean of ``a[k] - b[k]`` over the keys (seeds) both hold.

    Pairing by seed removes what the two runs share (the same data order and start), so the
    interval is about the methods' difference, not the seeds'.
    """
    keys = sorted(set(a) & set(b))
    if not keys:
        raise ValueError("no seed is in both")
    return mean_interval([a[k] - b[k] for k in keys], confidence)


def paired_verdict(diff: Interval, lower: str, than: str, what: str = "DG/S") -> str:
    """One line: is ``lower``'s ``what`` below ``than``'s beyond the interval of the paired difference?"""
    if diff.n < 2:
        return f"{diff.n} paired seed: no interval, no verdict."
    if diff.high < 0:
        return f"{lower}'s {what} is lower than {than}'s beyond the 95% interval."
    if diff.low > 0:
        return f"{lower}'s {what} is higher than {than}'s beyond the 95% interval."
    return f"{lower}'s {what} is not lower than {than}'s beyond the 95% interval: the interval contains 0."


def s_at_dg(frontier: list[tuple[float, float]], dg: float) -> float:
    """Largest S where the piecewise-linear ``frontier`` crosses DG = ``dg``; NaN outside its DG range.

    Args:
        frontier: (S, DG) points in the frontier's own order (increasing tau). DG need not be
            monotonic along it, so a DG value can be crossed more than once; the best S there
            is what that frontier offers at that DG.
    """
    best = math.nan
    if len(frontier) == 1:
        s, d = frontier[0]
        return s if d == dg else math.nan
    for (s0, d0), (s1, d1) in zip(frontier, frontier[1:]):
        if min(d0, d1) <= dg <= max(d0, d1):
            s = max(s0, s1) if d0 == d1 else s0 + (s1 - s0) * (dg - d0) / (d1 - d0)
            best = s if math.isnan(best) else max(best, s)
    return best


def upper_envelope(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (S, DG) points no other point beats (more S at no more DG), in increasing DG and so increasing S.

    A family's best curve over all its knobs and evaluations; ``s_at_dg`` reads it piecewise-linearly
    between them. Of points with equal DG only the one with the most S stays.
    """
    envelope: list[tuple[float, float]] = []
    for s, d in sorted(points, key=lambda p: (p[1], -p[0])):
        if not envelope or s > envelope[-1][0]:
            envelope.append((s, d))
    return envelope


@dataclass(frozen=True)
class FrontierGap:
    """S of two frontiers compared at equal DG over the DG range both cover.

    ``rows`` are (DG, S of a, S of b, S of b - S of a) at the grid points; ``dominated`` is True
    when b has more S than a at every one of them (a is dominated), None when they share no DG.
    """

    rows: list[tuple[float, float, float, float]]

    @property
    def gaps(self) -> list[float]:
        return [r[3] for r in self.rows]

    @property
    def dominated(self) -> bool | None:
        return None if not self.rows else all(g > 0 for g in self.gaps)

    @property
    def mean_gap(self) -> float:
        return math.fsum(self.gaps) / len(self.rows) if self.rows else math.nan


def frontier_gap(a: list[tuple[float, float]], b: list[tuple[float, float]], points: int = 9) -> FrontierGap:
    """S of frontier ``b`` minus S of frontier ``a`` at ``points`` evenly spaced DG values of their common range.

    Args:
        a, b: (S, DG) points, each in increasing tau.
    """
    low = max(min(d for _, d in a), min(d for _, d in b))
    high = min(max(d for _, d in a), max(d for _, d in b))
    if low > high:
        return FrontierGap([])
    # The last point is ``high`` itself: low + (high - low) can round past it, where a frontier has no S.
    grid = [low] if low == high else [low + (high - low) * i / (points - 1) for i in range(points - 1)] + [high]
    rows = []
    for dg in grid:
        sa, sb = s_at_dg(a, dg), s_at_dg(b, dg)
        rows.append((dg, sa, sb, sb - sa))
    return FrontierGap(rows)
