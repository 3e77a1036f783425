"""Capacity search: the highest arrival rate a policy sustains at a target SLO attainment, and
the fewest instances that reach the target.

`find_max_rate` brackets the answer geometrically (doubling from the start rate while it
passes, halving while it fails), then bisects the bracket geometrically — rates span orders of
magnitude, so the tolerance is relative. A rate *passes* when its attainment ≥ `target`.

Simulated attainment is not perfectly monotone in the rate (arrival noise, batching
effects), so the answer is stated in terms of what was actually evaluated: the bracket's upper
end is the lowest failing rate evaluated, and the result is the highest passing rate evaluated
below it. Each rate is evaluated at most once (a simulation is expensive).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CapacityResult:
    """Outcome of `find_max_rate`.

    `max_rate_rps`: highest passing rate evaluated below the lowest failing one (0.0 when even
    `min_rps` failed). `bracket_rps`: (that passing rate, the lowest failing rate) — the
    capacity lies between them; the upper end is None when no rate failed. `evaluations`:
    (rate, attainment) in evaluation order. `converged`: the search stopped because the
    bracket reached `rel_tol` or a range bound settled it (`max_rps` passed or `min_rps`
    failed), not because `max_evals` ran out.
    """

    max_rate_rps: float
    bracket_rps: tuple[float, float | None]
    evaluations: list[tuple[float, float]]
    converged: bool
    target: float

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: lists instead of tuples."""
        return {
            "max_rate_rps": self.max_rate_rps,
            "bracket_rps": list(self.bracket_rps),
            "evaluations": [[rate, att] for rate, att in self.evaluations],
            "converged": self.converged,
            "target": self.target,
        }


def find_max_rate(
    evaluate: Callable[[float], float],
    *,
    start_rps: float,
    target: float = 0.9,
    rel_tol: float = 0.02,
    max_evals: int = 24,
    min_rps: float = 1e-3,
    max_rps: float = 1e4,
) -> CapacityResult:
    """Highest arrival rate whose attainment `evaluate(rate)` ≥ `target`, to within `rel_tol`
    (hi / lo − 1 ≤ rel_tol), searching [min_rps, max_rps] with at most `max_evals` calls."""
    if not 0 < min_rps <= max_rps:
        raise ValueError(f"need 0 < min_rps <= max_rps, got {min_rps} and {max_rps}")
    if start_rps <= 0 or rel_tol <= 0 or max_evals < 1:
        raise ValueError("start_rps and rel_tol must be positive and max_evals at least 1")
    seen: dict[float, float] = {}
    evaluations: list[tuple[float, float]] = []

    def passes(rate: float) -> bool:
        if rate not in seen:
            seen[rate] = evaluate(rate)
            evaluations.append((rate, seen[rate]))
        return seen[rate] >= target  # NaN attainment fails

    def budget_left() -> bool:
        return len(evaluations) < max_evals

    rate = min(max(start_rps, min_rps), max_rps)
    lo: float | None = None
    hi: float | None = None
    settled = False  # a range bound decided the answer
    if passes(rate):
        lo = rate
        while hi is None and budget_left():
            if lo >= max_rps:
                settled = True
                break
            rate = min(lo * 2, max_rps)
            if passes(rate):
                lo = rate
            else:
                hi = rate
        settled = settled or (hi is None and lo >= max_rps)
    else:
        hi = rate
        while lo is None and budget_left():
            if hi <= min_rps:
                settled = True
                break
            rate = max(hi / 2, min_rps)
            if passes(rate):
                lo = rate
            else:
                hi = rate
        settled = settled or (lo is None and hi <= min_rps)

    while lo is not None and hi is not None and hi / lo - 1 > rel_tol and budget_left():
        mid = math.sqrt(lo * hi)
        if mid in seen or not lo < mid < hi:
            break  # the bracket is down to float resolution
        if passes(mid):
            lo = mid
        else:
            hi = mid
    tight = lo is not None and hi is not None and hi / lo - 1 <= rel_tol

    # Restate the bracket from the evaluations themselves, which is what the docstring
    # promises whatever path the search took.
    failing = [r for r, a in evaluations if not a >= target]
    lowest_fail = min(failing) if failing else None
    passing = [r for r, a in evaluations
               if a >= target and (lowest_fail is None or r < lowest_fail)]
    best = max(passing) if passing else 0.0
    return CapacityResult(
        max_rate_rps=best,
        bracket_rps=(best, lowest_fail),
        evaluations=evaluations,
        converged=settled or tight,
        target=target,
    )


def fewest_instances(
    evaluate: Callable[[int], float],
    *,
    candidates: Sequence[int],
    target: float = 0.9,
) -> tuple[int | None, list[tuple[int, float]]]:
    """Smallest candidate instance count whose attainment `evaluate(n)` ≥ `target`, by binary
    search over the sorted distinct candidates (assumes attainment does not fall as instances
    are added). Returns (that count or None if none passes, (count, attainment) evaluations in
    order)."""
    ordered = sorted(set(candidates))
    evaluations: list[tuple[int, float]] = []
    verdicts: dict[int, bool] = {}

    def passes(i: int) -> bool:
        count = ordered[i]
        if count not in verdicts:
            attainment = evaluate(count)
            evaluations.append((count, attainment))
            verdicts[count] = attainment >= target
        return verdicts[count]

    # bisect_left over a lazy key: the first index whose verdict is True.
    first = bisect_left(range(len(ordered)), True, key=passes)
    return (ordered[first] if first < len(ordered) else None), evaluations
