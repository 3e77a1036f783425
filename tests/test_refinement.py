"""Background CP-SAT refinement: the state after launches, re-timing, and when a plan is used."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.helpers import linear_cost_model, problem, request
from tetris.solver.plan import ChunkPlan, RequestPlan
from tetris.solver.policy.refinement import BackgroundRefiner, problem_after, retime
from tetris.solver.policy.refinement_runs import InlineRun
from tetris.solver.problem import PendingRequest, Problem
from tetris.solver.validator import validate_plans


def test_problem_after_applies_launched_chunks() -> None:
    """A partly launched request continues from its chunk; a fully launched one leaves."""
    cm = linear_cost_model(4)
    p = problem(cm, (0.0,) * 4, request("a", 1024), request("b", 512), request("c", 512))
    launched = [RequestPlan("a", (ChunkPlan(0, 512, (0, 1), 0.1, 0.4),)),
                RequestPlan("b", (ChunkPlan(0, 512, (2,), 0.1, 0.6),))]
    after = problem_after(p, launched, 0.1)
    assert after.now_s == 0.1
    assert after.availability_s == (0.4, 0.4, 0.6, 0.0)
    assert [r.request_id for r in after.requests] == ["a", "c"]
    a = after.requests[0]
    assert (a.prefilled_tokens, a.kv_instances, a.ready_s) == (512, (0, 1), 0.4)


def test_retime_keeps_chunks_and_order_and_shifts_to_availability() -> None:
    """Instance 0 busy until 1 s: both chunks move later, same tokens and groups, valid."""
    cm = linear_cost_model(2)  # 1 ms per token per instance
    p = problem(cm, (1.0, 0.0), request("a", 1024), request("b", 512))
    old = [RequestPlan("a", (ChunkPlan(0, 1024, (0, 1), 0.0, 0.512),)),
           RequestPlan("b", (ChunkPlan(0, 512, (0,), 0.512, 1.024),))]
    new = retime(p, old)
    assert new[0].chunks[0].start_s == pytest.approx(1.0)
    assert new[0].chunks[0].end_s == pytest.approx(1.512)
    assert new[1].chunks[0].start_s == pytest.approx(1.512)
    assert [(c.start_token, c.end_token, c.instances) for q in new for c in q.chunks] == \
        [(0, 1024, (0, 1)), (0, 512, (0,))]
    assert validate_plans(p, new) == []


def test_refined_plan_is_used_only_when_ready_current_and_better() -> None:
    """Not before its time, not once a request it planned moved on, not when no better."""
    cm = linear_cost_model(2)
    reqs = (request("a", 2048, slo=1.0), request("b", 512, slo=0.3), request("c", 512, slo=5.0))

    def at(now: float, *rs: PendingRequest) -> Problem:
        return problem(cm, (0.0, 0.0), *(rs or reqs), now_s=now)

    refiner = BackgroundRefiner(InlineRun(time_limit_ms=50.0))
    assert refiner.start(at(0.0))
    assert refiner.run.busy(0.01) and not refiner.run.busy(0.05)
    assert not refiner.start(at(0.01))  # one CP-SAT run at a time
    assert refiner.take(at(0.01), None) is None  # still running: 50 ms not over
    moved = replace(reqs[0], prefilled_tokens=512, kv_instances=(0,))
    assert refiner.take(at(0.06, moved, *reqs[1:]), None) is None  # "a" moved on since
    assert refiner.take(at(0.06), None) is None  # ... and that dropped it for good
    assert refiner.start(at(0.06))
    plans = refiner.take(at(0.2), None)
    assert plans is not None and validate_plans(at(0.2), plans) == []
    assert refiner.start(at(0.2))
    assert refiner.take(at(0.3), greedy_objective=-1.0) is None  # greedy is better


def test_refined_plan_takes_newcomers_after_its_own_requests() -> None:
    """A request that arrived after the refinement started is planned too, after the kept
    requests' work on its instances."""
    cm = linear_cost_model(2)
    reqs = (request("a", 1024, slo=5.0), request("b", 1024, slo=5.0))
    refiner = BackgroundRefiner(InlineRun(time_limit_ms=20.0))
    assert refiner.start(problem(cm, (0.0, 0.0), *reqs))
    late = request("c", 512, arrival=0.05, slo=5.0)
    now = problem(cm, (0.0, 0.0), *reqs, late, now_s=0.05)
    plans = refiner.take(now, None)
    assert plans is not None and [p.request_id for p in plans] == ["a", "b", "c"]
    assert validate_plans(now, plans) == []
    first = plans[2].chunks[0]
    for g in first.instances:  # after the kept requests' work on each instance it uses
        busy_until = max((c.end_s for p in plans[:2] for c in p.chunks if g in c.instances),
                         default=0.0)
        assert first.start_s >= busy_until - 1e-9


def test_refiner_skips_when_fewer_than_two_wait() -> None:
    """With one request waiting there is no order to choose: no refinement runs."""
    cm = linear_cost_model(2)
    refiner = BackgroundRefiner(InlineRun(time_limit_ms=20.0))
    assert not refiner.start(problem(cm, (0.0, 0.0), request("a", 512)))
