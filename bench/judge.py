"""
How a figure is judged against its same-run reference, and when it is not judged at all.

A target is a ratio: the daemon's figure over the reference's, measured in the
same round, back to back, so that whatever else the machine does falls on both
alike. The ratio of each round is taken, and the median of those ratios is
judged. A neighbour's load that comes and goes between rounds moves both
figures of a round together; one that comes and goes within a round does not,
and shows as the reference's own figures moving from round to round. So the
reference's spread (its largest figure over its smallest, across the rounds)
is checked first: beyond the stated bound, the reference was disturbed, and
the bench says so instead of calling the target met or missed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# The most a reference's figure may move across rounds (largest over smallest)
# for a target to be judged on it. Throughputs and times of a C loop or a bare
# Python loop are steady on a quiet machine (a few percent); a p99 is one
# request in a hundred, and moves more by nature.
SPREAD_BOUND_STEADY = 1.5
SPREAD_BOUND_TAIL = 3.0


def spread(values: Sequence[float]) -> float:
    """Largest over smallest: 1.0 for figures that did not move; inf when one is 0."""
    if not values:
        return math.nan
    low, high = min(values), max(values)
    if low <= 0:
        return math.inf if high > 0 else 1.0
    return high / low


def paired_ratios(ours: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Each round's figure over the reference's figure of the same round."""
    if len(ours) != len(reference):
        raise ValueError(f"{len(ours)} figures against {len(reference)} of the reference")
    return [a / b if b > 0 else math.inf for a, b in zip(ours, reference, strict=True)]


@dataclass(frozen=True)
class Judgement:
    """One target: the median paired ratio, its bound, and whether it could be judged."""

    ratio: float
    bound: float
    at_least: bool  # the ratio must be ≥ bound (throughput); else ≤ bound (a time)
    reference_spread: float
    spread_bound: float

    @property
    def disturbed(self) -> bool:
        """The reference moved across rounds beyond its bound (or there was nothing to judge)."""
        return not self.reference_spread <= self.spread_bound  # NaN counts as disturbed

    @property
    def met(self) -> bool | None:
        """True or False; None when the reference was disturbed and nothing is claimed."""
        if self.disturbed or math.isnan(self.ratio):
            return None
        return self.ratio >= self.bound if self.at_least else self.ratio <= self.bound

    def verdict(self) -> str:
        """What the report's last column says."""
        met = self.met
        if met is None:
            return (
                f"**not judged**: the reference itself was disturbed (it moved "
                f"{self.reference_spread:.2f}× across rounds; bound {self.spread_bound:g}×)"
            )
        if met:
            return "met"
        miss = 1 - self.ratio / self.bound if self.at_least else self.ratio / self.bound - 1
        return f"**missed** by {miss:.0%}"


def judge(
    ours: Sequence[float],
    reference: Sequence[float],
    *,
    bound: float,
    at_least: bool,
    spread_bound: float,
) -> Judgement:
    """Judge the per-round figures `ours` against the same rounds' `reference`."""
    ratios = paired_ratios(ours, reference)
    return Judgement(
        ratio=statistics.median(ratios) if ratios else math.nan,
        bound=bound,
        at_least=at_least,
        reference_spread=spread(reference),
        spread_bound=spread_bound,
    )
