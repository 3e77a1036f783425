"""The plan JSON contract: shape, times relative to now, lossless round trip."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from tests.helpers import linear_cost_model, problem, request
from tetris.solver.greedy import solve_greedy
from tetris.solver.plan import ChunkPlan, RequestPlan, SolveResult, SolveStatus
from tetris.solver.plan_json import PlanReport, report_from_result
from tetris.solver.problem import Problem


def _result_at(now: float) -> tuple[Problem, SolveResult]:
    prob = problem(linear_cost_model(4), (now + 2.0, now, now - 1.0, now + 0.5),
                   request("a", 2048, arrival=now - 0.25, slo=4.0), now_s=now)
    chunks = (
        ChunkPlan(0, 1024, (1, 2), now, now + 0.5),
        ChunkPlan(1024, 2048, (1, 2, 3), now + 0.5, now + 0.9),
    )
    return prob, SolveResult("greedy", SolveStatus.FEASIBLE, 1.0, None, 0.7,
                             (RequestPlan("a", chunks),), {"order": "edf"})


def test_times_are_relative_to_now() -> None:
    """Every time in the report is shifted by now_s; durations and TTFT are unchanged."""
    prob, result = _result_at(100.0)
    report = report_from_result(prob, result)
    assert report.availability_s == pytest.approx([2.0, 0.0, 0.0, 0.5])  # past → free now
    plan = report.plans[0]
    assert plan.arrival_s == pytest.approx(-0.25)
    assert plan.prefill_end_s == pytest.approx(0.9)
    assert plan.ttft_s == pytest.approx(1.15)
    assert plan.ttft_slo_s == 4.0
    assert plan.slo_slack_s == pytest.approx(2.85)
    times = [t for c in plan.chunks for t in (c.start_s, c.end_s)]
    assert times == pytest.approx([0.0, 0.5, 0.5, 0.9])
    assert [c.sp for c in plan.chunks] == [2, 3]
    assert report.solver.name == "greedy" and report.solver.status == "feasible"
    assert report.solver.bound is None and report.solver.stats == {"order": "edf"}


def test_json_shape_has_the_contract_keys() -> None:
    """The serialised report has exactly the documented top-level, plan and chunk keys."""
    prob, result = _result_at(0.0)
    data = json.loads(report_from_result(prob, result).model_dump_json())
    assert set(data) == {"solver", "availability_s", "plans"}
    assert set(data["solver"]) == {"name", "status", "wall_ms", "objective", "bound", "stats"}
    assert set(data["plans"][0]) == {
        "request_id", "arrival_s", "prompt_tokens", "prefill_end_s", "ttft_s", "ttft_slo_s",
        "slo_slack_s", "chunks",
    }
    assert set(data["plans"][0]["chunks"][0]) == {
        "start_token", "end_token", "instances", "start_s", "end_s",
    }


def test_round_trip_of_a_real_solve() -> None:
    """model_validate_json(model_dump_json()) gives back an equal report for a solver's plan."""
    prob = problem(linear_cost_model(4), (0.0, 0.0, 1.0, 1.0),
                   request("x", 8192), request("y", 1024, arrival=0.3), now_s=0.0)
    report = report_from_result(prob, solve_greedy(prob))
    again = PlanReport.model_validate_json(report.model_dump_json())
    assert again == report
    assert again.model_dump_json() == report.model_dump_json()


def test_extra_fields_are_kept_and_bad_status_rejected() -> None:
    """Readers accept fields they do not know; a status outside the four is an error."""
    prob, result = _result_at(0.0)
    data = json.loads(report_from_result(prob, result).model_dump_json())
    data["plans"][0]["decode_instance"] = 3
    data["generated_by"] = "tetris 0.1.0"
    report = PlanReport.model_validate(data)
    assert report.model_dump()["plans"][0]["decode_instance"] == 3
    data["solver"]["status"] = "great"
    with pytest.raises(ValidationError):
        PlanReport.model_validate(data)


def test_infinite_objective_becomes_null() -> None:
    """JSON has no infinity: a non-finite objective or bound is reported as null."""
    prob, result = _result_at(0.0)
    inf_result = SolveResult("cp", SolveStatus.FEASIBLE, float("inf"), float("-inf"), 1.0,
                             result.plans)
    report = report_from_result(prob, inf_result)
    assert report.solver.objective is None and report.solver.bound is None
    assert PlanReport.model_validate_json(report.model_dump_json()) == report
