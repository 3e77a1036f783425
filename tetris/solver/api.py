"""The one entry point: `solve(problem, solver, time_limit_ms)`, every plan validated.

Never trust a solver's feasibility: each planner's plans go through the independent validator.
An invalid plan from an exact planner is replaced by the (validated) greedy plan and the
violation is reported in `stats["fallback"]`; an invalid greedy plan is a bug and raises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from tetris.solver.cp_sat import CpOptions, solve_cp
from tetris.solver.greedy import solve_greedy
from tetris.solver.milp import MilpOptions, solve_milp
from tetris.solver.plan import SolveResult
from tetris.solver.problem import Problem
from tetris.solver.validator import ensure_valid, validate_plans

Planner = Callable[[Problem, float], SolveResult]

PLANNERS: dict[str, Planner] = {
    "greedy": solve_greedy,
    "cp": solve_cp,
    "milp": solve_milp,
}

DEFAULT_TIME_LIMIT_MS = {"greedy": 50.0, "cp": 50.0, "milp": 10_000.0}


def solve(
    problem: Problem,
    solver: str = "greedy",
    time_limit_ms: float | None = None,
    *,
    cp_options: CpOptions | None = None,
    milp_options: MilpOptions | None = None,
) -> SolveResult:
    if solver not in PLANNERS:
        raise ValueError(f"unknown solver {solver!r}: use one of {', '.join(PLANNERS)}")
    limit = DEFAULT_TIME_LIMIT_MS[solver] if time_limit_ms is None else time_limit_ms
    if limit <= 0:
        raise ValueError(f"time limit must be > 0 ms, got {limit}")
    if solver == "cp":
        result = solve_cp(problem, limit, cp_options)
    elif solver == "milp":
        result = solve_milp(problem, limit, milp_options)
    else:
        result = PLANNERS[solver](problem, limit)
    if not result.status.has_plans:
        return result
    violations = validate_plans(problem, result.plans)
    if not violations:
        return result
    if solver == "greedy":
        ensure_valid(problem, result.plans)
    fallback = solve_greedy(problem)
    ensure_valid(problem, fallback.plans)
    stats = dict(result.stats)
    stats["fallback"] = f"{solver} plan invalid ({violations[0].message}); greedy plan used"
    return replace(fallback, solver=solver, stats=stats, wall_ms=result.wall_ms + fallback.wall_ms)
