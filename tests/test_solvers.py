"""Every planner (greedy, cp, milp) on tiny instances whose optimum is worked out by hand."""

from __future__ import annotations

import pytest

from tests.helpers import linear_cost_model, preset_cost_model, problem, request
from tetris.solver.api import solve
from tetris.solver.cp_sat import CpOptions
from tetris.solver.plan import SolveStatus
from tetris.solver.problem import Problem
from tetris.solver.validator import validate_plans

SOLVERS = ["greedy", "cp", "milp"]
# Reproducible CP-SAT: a deterministic budget instead of the wall clock.
DETERMINISTIC_CP = CpOptions(deterministic_time=5.0)


def run(p: Problem, solver: str, limit_ms: float = 20_000.0) -> tuple[float, dict[str, float]]:
    result = solve(p, solver, limit_ms, cp_options=DETERMINISTIC_CP)
    assert result.status.has_plans, result
    assert validate_plans(p, result.plans) == []
    assert result.objective is not None
    return result.objective, {pl.request_id: pl.prefill_end_s for pl in result.plans}


@pytest.mark.parametrize("solver", SOLVERS)
def test_shortest_first_on_the_whole_cluster(solver: str) -> None:
    """Two 2048-token requests, 2 idle instances, T = 1 ms·c/s, SLO 10 s, λ = 0.

    One request on both instances ends at 1.024 s, then the other at 2.048 s: J = (1.024 +
    2.048)/10 = 0.3072. Side by side on one instance each both end at 2.048 s: J = 0.4096. The
    fluid bound agrees: the first finish ≥ 4096/2 ms·½ and the second ≥ 4096 token-ms / 2."""
    p = problem(linear_cost_model(2), (0, 0), request("a", 2048), request("b", 2048))
    objective, ends = run(p, solver)
    assert objective == pytest.approx(0.3072)
    assert sorted(ends.values()) == pytest.approx([1.024, 2.048])


@pytest.mark.parametrize("solver", SOLVERS)
def test_load_weight_keeps_each_request_on_one_instance(solver: str) -> None:
    """Same pair with 0.1 s overhead per chunk and λ = 20 (heavy load).

    On one instance a request takes 0.1 + 2.048 = 2.148 s and 2.148 GPU-s: cost (2.148 +
    20·2.148)/10 = 4.5108. On two it takes 1.124 s but 2.248 GPU-s: ≥ (1.124 + 44.96)/10 =
    4.6084. Both can run alone from 0, so the optimum is 2 × 4.5108 = 9.0216."""
    cm = linear_cost_model(2, fixed=0.1)
    p = problem(cm, (0, 0), request("a", 2048), request("b", 2048), gpu_cost_weight=20.0)
    objective, ends = run(p, solver)
    assert objective == pytest.approx(9.0216)
    assert ends == pytest.approx({"a": 2.148, "b": 2.148})


@pytest.mark.parametrize("solver", SOLVERS)
def test_tight_slo_goes_first(solver: str) -> None:
    """One instance; a: 1024 tokens, SLO 5 s; b: 2048 tokens, SLO 2.5 s; miss penalty 10.

    Shortest first: a ends 1.024, b 3.072 > 2.5 (miss): 0.2048 + 1.2288 + 10 = 11.4336.
    b first: b 2.048 ≤ 2.5, a 3.072 ≤ 5: 0.8192 + 0.6144 = 1.4336, the optimum."""
    p = problem(linear_cost_model(1), (0,), request("a", 1024, slo=5.0),
                request("b", 2048, slo=2.5))
    objective, ends = run(p, solver)
    assert objective == pytest.approx(1.4336)
    assert ends == pytest.approx({"b": 2.048, "a": 3.072})


@pytest.mark.parametrize("solver", SOLVERS)
def test_future_arrival_and_busy_instances_are_respected(solver: str) -> None:
    """One instance busy until 1 s, one free; a 1024-token request arriving at 0.5 s.

    Alone on instance 1 from 0.5 it ends at 1.524; on both from 1.0 at 1.512. Better: one block
    (512 tokens) on instance 1 from 0.5 to 1.012, then the other 512 on both: 1.012 + 0.256 =
    1.268 (the fluid bound, 500 tokens by 1.0 and 524 on two, is 1.262; chunks are whole
    blocks). TTFT 0.768 s: J = 0.0768."""
    p = problem(linear_cost_model(2), (1.0, 0.0), request("a", 1024, arrival=0.5))
    objective, ends = run(p, solver)
    assert ends["a"] == pytest.approx(1.268)
    assert objective == pytest.approx(0.0768)


@pytest.mark.parametrize("solver", SOLVERS)
def test_long_request_over_fragmented_gpus_expands(solver: str) -> None:
    """The headline case: 128k tokens, 3 of 8 H100s free now and 5 at 3 s. Starting on the
    three and growing to eight beats any single-SP plan (the best is SP 3 from 0, 4.08 s)."""
    cm = preset_cost_model(8)
    avail = (0, 0, 0, 3, 3, 3, 3, 3)
    expanding = problem(cm, avail, request("a", 131072, slo=20.0))
    single = problem(cm, avail, request("a", 131072, slo=20.0), max_chunks=1)
    _, ends = run(expanding, solver)
    _, single_ends = run(single, solver)
    assert ends["a"] < single_ends["a"] - 0.5
    assert single_ends["a"] == pytest.approx(cm.chunk_seconds(131072, 0, 3))


def test_solvers_agree_on_empty_problem() -> None:
    """No pending requests: every solver returns an empty optimal plan."""
    p = problem(linear_cost_model(2), (0, 0))
    for solver in SOLVERS:
        result = solve(p, solver, 1000.0)
        assert result.status is SolveStatus.OPTIMAL and result.plans == ()


def test_unknown_solver_and_bad_limit_are_errors() -> None:
    """A typo in the solver name or a limit ≤ 0 is a ValueError naming it."""
    p = problem(linear_cost_model(1), (0,), request("a", 512))
    with pytest.raises(ValueError, match="unknown solver 'cpsat'"):
        solve(p, "cpsat")
    with pytest.raises(ValueError, match="time limit"):
        solve(p, "cp", 0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_kv_that_fits_nowhere_is_infeasible(solver: str) -> None:
    """4096 tokens over 4 instances is 1024 a piece, above a 1000-token capacity: no plan."""
    p = problem(linear_cost_model(4, kv_capacity=1000), (0, 0, 0, 0), request("a", 4096))
    result = solve(p, solver, 1000.0, cp_options=DETERMINISTIC_CP)
    assert result.status is SolveStatus.INFEASIBLE
    assert "'a'" in str(result.stats["infeasible"])


@pytest.mark.parametrize("solver", SOLVERS)
def test_plans_respect_kv_capacity(solver: str) -> None:
    """Two requests under a tight capacity: every planner's plan passes the kv_memory check."""
    cm = linear_cost_model(4, kv_capacity=1280)
    p = problem(cm, (0, 0, 1, 1), request("a", 4096), request("b", 2048, arrival=0.2))
    _, ends = run(p, solver)
    assert ends["a"] >= 1.768 - 1e-9  # the single-request optimum under this capacity
