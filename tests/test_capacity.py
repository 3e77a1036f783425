"""Capacity search on synthetic attainment curves whose answer is known."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tetris.evaluation.capacity import fewest_instances, find_max_rate


def step(threshold: float, calls: list[float] | None = None) -> Callable[[float], float]:
    """Attainment 1 below `threshold`, 0.5 at and above it; records each call."""
    def evaluate(rate: float) -> float:
        if calls is not None:
            calls.append(rate)
        return 1.0 if rate < threshold else 0.5
    return evaluate


@pytest.mark.parametrize("start", [0.05, 1.0, 3.7, 50.0, 9000.0])
def test_step_function_found_within_tolerance(start: float) -> None:
    """From any start, the step at 3.7 is bracketed to rel_tol with no rate evaluated twice."""
    calls: list[float] = []
    res = find_max_rate(step(3.7, calls), start_rps=start, rel_tol=0.02)
    lo, hi = res.bracket_rps
    assert hi is not None
    assert lo < 3.7 <= hi and hi / lo - 1 <= 0.02
    assert res.max_rate_rps == lo and res.converged
    assert 3.7 / 1.02 <= res.max_rate_rps < 3.7
    assert len(calls) == len(set(calls)) == len(res.evaluations)
    assert [r for r, _ in res.evaluations] == calls
    assert len(calls) <= 24


def test_never_passing() -> None:
    """Failing everywhere halves down to min_rps: max rate 0, bracket (0, min_rps)."""
    res = find_max_rate(lambda r: 0.0, start_rps=1.0, min_rps=0.01)
    assert res.max_rate_rps == 0.0
    assert res.bracket_rps == (0.0, 0.01)
    assert res.converged
    assert [r for r, _ in res.evaluations] == [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125,
                                              0.015625, 0.01]


def test_never_failing() -> None:
    """Passing everywhere doubles up to max_rps: that is the answer, with no failing bound."""
    res = find_max_rate(lambda r: 0.95, start_rps=1.0, max_rps=100.0)
    assert res.max_rate_rps == 100.0
    assert res.bracket_rps == (100.0, None)
    assert res.converged
    assert [r for r, _ in res.evaluations] == [1, 2, 4, 8, 16, 32, 64, 100]
    assert json.loads(json.dumps(res.to_dict()))["bracket_rps"] == [100.0, None]


def test_evaluation_budget() -> None:
    """Running out of max_evals mid-search stops early and reports not converged."""
    res = find_max_rate(step(3.7), start_rps=1.0, max_evals=4, rel_tol=1e-6)
    assert len(res.evaluations) == 4 and not res.converged
    lo, hi = res.bracket_rps
    assert hi is not None and lo < 3.7 <= hi


def test_non_monotone_attainment() -> None:
    """A passing island above a failing rate is ignored: the answer stays below the lowest fail.

    Passes below 2, fails in [2, 3), passes again in [3, 5), fails from 5. Doubling from 1
    fails at 2; the pass at 4 is never reached, and the result is bracketed below 2."""
    def bumpy(rate: float) -> float:
        return 0.95 if rate < 2 or 3 <= rate < 5 else 0.5

    res = find_max_rate(bumpy, start_rps=1.0, rel_tol=0.01)
    lo, hi = res.bracket_rps
    assert hi is not None and lo < 2 <= hi and hi / lo - 1 <= 0.01
    assert res.max_rate_rps == lo


def test_non_monotone_start_in_a_dip() -> None:
    """Starting inside a failing dip (1.5–1.9) converges to the dip's lower edge although
    higher rates (1.9–6) pass: the answer is the highest pass below the lowest evaluated fail."""
    def dip(rate: float) -> float:
        return 0.5 if 1.5 <= rate < 1.9 or rate >= 6 else 0.95

    res = find_max_rate(dip, start_rps=1.7, rel_tol=0.01)
    lo, hi = res.bracket_rps
    assert hi is not None and lo < 1.5 <= hi < 1.9 and hi / lo - 1 <= 0.01
    assert res.max_rate_rps == lo
    fails = [r for r, a in res.evaluations if a < 0.9]
    passes = [r for r, a in res.evaluations if a >= 0.9]
    assert min(fails) == hi and max(passes) == lo


def test_bad_arguments() -> None:
    """Non-positive rates, an inverted range or a zero tolerance raise ValueError."""
    with pytest.raises(ValueError):
        find_max_rate(step(1.0), start_rps=0.0)
    with pytest.raises(ValueError):
        find_max_rate(step(1.0), start_rps=1.0, min_rps=10.0, max_rps=1.0)
    with pytest.raises(ValueError):
        find_max_rate(step(1.0), start_rps=1.0, rel_tol=0.0)


@pytest.mark.parametrize("needed", [1, 3, 5, 8, 16])
def test_fewest_instances_step(needed: int) -> None:
    """Binary search finds the smallest passing count, evaluating each count at most once."""
    candidates = [16, 1, 2, 3, 4, 5, 6, 8, 12, 2]
    best, evals = fewest_instances(lambda n: 0.92 if n >= needed else 0.4,
                                   candidates=candidates)
    assert best == needed
    counts = [n for n, _ in evals]
    assert len(counts) == len(set(counts)) <= 4  # log2(9 distinct) rounded up
    assert (needed, 0.92) in evals


def test_fewest_instances_none_pass() -> None:
    """When no candidate reaches the target the answer is None, having tried the largest."""
    best, evals = fewest_instances(lambda n: 0.1, candidates=[1, 2, 4, 8])
    assert best is None
    assert evals[-1] == (8, 0.1)
    assert fewest_instances(lambda n: 1.0, candidates=[]) == (None, [])
