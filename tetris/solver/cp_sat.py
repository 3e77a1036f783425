"""CP-SAT planner: choose one candidate per request and place every chunk exactly.

Model (times in integer ticks after `now`; durations rounded up to ticks, releases rounded up,
so any tick schedule is feasible in real time — `schedule.left_shift` then re-times it exactly):
- x[r,m] ∈ {0,1}, Σ_m x[r,m] = 1                        (one candidate per request)
- chunk (r,m,k): optional interval [s, s + d) present iff x[r,m]; s ≥ release
- s[r,m,k+1] ≥ s[r,m,k] + d[r,m,k]                       (chunks in order)
- per instance g: NoOverlap over every interval using g  (exact capacity, nested groups built in)
- E_r = end of the chosen candidate's last chunk;  E_r ≤ deadline_r unless miss_r
- minimise Σ_r w_r·(E_r − a_r)/S_r + P·w_r·miss_r + λ·w_r·Σ_m x[r,m]·GPUsec[r,m]/S_r

Warm start: the greedy plan as a complete hint, improved by large-neighbourhood search (settings
and why: `CpOptions`). The result is the better of CP-SAT's and greedy's plans
by the exact objective, so CP is never worse than greedy. A watchdog thread stops the search at
the deadline even if a phase of the solver overruns its own time limit. `bound` is CP-SAT's bound
over the candidate set, less the most that rounding to ticks can add (`_rounding_slack`), or the
contention-free bound when that is higher (LNS alone proves little).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ortools.sat.python import cp_model

from tetris.solver.candidates import DEFAULT_MAX_CANDIDATES, Candidate, generate_candidates
from tetris.solver.greedy import solve_greedy
from tetris.solver.objective import request_cost, total_objective
from tetris.solver.plan import RequestPlan, SolveResult, SolveStatus
from tetris.solver.problem import Problem
from tetris.solver.schedule import left_shift, serial_starts

MODEL_BUILD_RESERVE_MS = 2.0
CANDIDATES_PER_MS = 4.0
MIN_CANDIDATES = 4


@dataclass(frozen=True)
class CpOptions:
    """Defaults measured on random 8-32 instance × 4-32 request problems (see docs/solver.md):
    two workers running only large-neighbourhood search from the greedy hint improved on greedy
    far more often than CP-SAT's default portfolio; feasibility jump is off because its first
    pass ignores the time limit (51 ms on a 10 ms budget); presolve is off because it eats
    budgets of tens of ms. LNS cannot prove optimality: the reproducible mode
    (`deterministic_time`) runs one worker of complete search instead, which can."""

    num_workers: int = 2
    lns_only: bool = True
    presolve: bool = False
    feasibility_jump: bool = False
    seed: int = 0
    tick_s: float = 1e-4
    max_candidates: int = DEFAULT_MAX_CANDIDATES
    # Reproducible mode: one worker of complete search for this much CP-SAT deterministic
    # time; the wall clock is ignored.
    deterministic_time: float | None = None
    watchdog_grace_ms: float = 2.0


@dataclass
class _Model:
    model: cp_model.CpModel
    presence: list[list[cp_model.IntVar]]
    starts: list[list[list[cp_model.IntVar]]]
    ends: list[cp_model.IntVar]
    misses: list[cp_model.IntVar]
    deadlines: list[int]
    tick_s: float


def _ticks_up(seconds: float, tick: float) -> int:
    return max(0, math.ceil(seconds / tick - 1e-9))


def _candidates_per_request(problem: Problem, opts: CpOptions, limit_ms: float | None) -> int:
    """Fewer candidates under short limits: building the model costs about 0.1 ms a candidate
    in Python (measured at 16 instances × 32 requests), time the search then lacks."""
    if limit_ms is None:
        return opts.max_candidates
    total = CANDIDATES_PER_MS * limit_ms
    per_request = int(total / max(1, len(problem.requests)))
    return max(MIN_CANDIDATES, min(opts.max_candidates, per_request))


def _build(problem: Problem, cands: list[list[Candidate]], opts: CpOptions,
           greedy_end: float) -> _Model:
    tick, now = opts.tick_s, problem.now_s
    longest = sum(max(sum(c.duration_s for c in cand.chunks) for cand in per) for per in cands)
    num_chunks = sum(len(cand.chunks) for per in cands for cand in per)
    latest_release = max(c.release_s for per in cands for cand in per for c in cand.chunks)
    horizon = _ticks_up(max(greedy_end, latest_release) - now + longest, tick) + num_chunks + 1
    m = cp_model.CpModel()
    on_instance: list[list[cp_model.IntervalVar]] = [[] for _ in range(problem.num_instances)]
    presence, starts, ends, misses, deadlines = [], [], [], [], []
    objective: list[cp_model.LinearExprT] = []
    constant = 0.0
    for r, per in enumerate(cands):
        req = problem.requests[r]
        w, slo = req.weight, req.ttft_slo_s
        xs = [m.new_bool_var(f"x{r}_{i}") for i in range(len(per))]
        m.add_exactly_one(xs)
        end = m.new_int_var(0, horizon, f"end{r}")
        miss = m.new_bool_var(f"miss{r}")
        deadline = math.floor((req.deadline_s - now) / tick + 1e-9)
        if deadline < 0:
            m.add(miss == 1)
        else:
            m.add(end <= deadline).only_enforce_if(~miss)
        req_starts = []
        for i, (x, cand) in enumerate(zip(xs, per, strict=True)):
            prev: tuple[cp_model.IntVar, int] | None = None
            cand_starts = []
            for k, chunk in enumerate(cand.chunks):
                d = max(1, _ticks_up(chunk.duration_s, tick))
                s = m.new_int_var(_ticks_up(chunk.release_s - now, tick), horizon, f"s{r}_{i}_{k}")
                iv = m.new_optional_fixed_size_interval_var(s, d, x, f"iv{r}_{i}_{k}")
                for g in chunk.instances:
                    on_instance[g].append(iv)
                if prev is not None:
                    m.add(s >= prev[0] + prev[1]).only_enforce_if(x)
                prev = (s, d)
                cand_starts.append(s)
            assert prev is not None
            m.add(end == prev[0] + prev[1]).only_enforce_if(x)
            objective.append(x * (w * problem.gpu_cost_weight * cand.gpu_seconds / slo))
            req_starts.append(cand_starts)
        objective.append(end * (w * tick / slo))
        objective.append(miss * (w * problem.miss_penalty))
        constant += w * (now - req.arrival_s) / slo
        presence.append(xs)
        starts.append(req_starts)
        ends.append(end)
        misses.append(miss)
        deadlines.append(deadline)
    for ivs in on_instance:
        if len(ivs) > 1:
            m.add_no_overlap(ivs)
    m.minimize(sum(objective) + constant)
    return _Model(m, presence, starts, ends, misses, deadlines, tick)


def _hint(problem: Problem, built: _Model, cands: list[list[Candidate]],
          greedy: Sequence[RequestPlan]) -> None:
    """Hint the greedy plan (candidate 0 of each request), re-timed on the tick grid in greedy's
    own chunk order so it stays feasible there (see `schedule`)."""
    tick, now = built.tick_s, problem.now_s
    chosen = [per[0] for per in cands]
    order = sorted(
        ((pos, k) for pos, cand in enumerate(chosen) for k in range(len(cand.chunks))),
        key=lambda ref: (greedy[ref[0]].chunks[ref[1]].start_s, ref),
    )
    free = [float(_ticks_up(problem.free_at(g) - now, tick)) for g in range(problem.num_instances)]
    starts = serial_starts(
        chosen,
        order,
        free,
        lambda ref: float(_ticks_up(chosen[ref[0]].chunks[ref[1]].release_s - now, tick)),
        lambda ref: float(max(1, _ticks_up(chosen[ref[0]].chunks[ref[1]].duration_s, tick))),
    )
    m = built.model
    for r, per in enumerate(cands):
        for i, x in enumerate(built.presence[r]):
            m.add_hint(x, i == 0)
        for k, var in enumerate(built.starts[r][0]):
            m.add_hint(var, int(starts[r][k]))
        # A complete hint lets CP-SAT take it as its first solution without any search.
        for i in range(1, len(per)):
            for var in built.starts[r][i]:
                m.add_hint(var, var.proto.domain[0])
        last = per[0].chunks[-1]
        end = int(starts[r][-1]) + max(1, _ticks_up(last.duration_s, tick))
        m.add_hint(built.ends[r], end)
        m.add_hint(built.misses[r], end > built.deadlines[r])


def _configure(solver: cp_model.CpSolver, opts: CpOptions, budget_s: float) -> None:
    params = solver.parameters
    params.random_seed = opts.seed
    params.cp_model_presolve = opts.presolve
    params.use_feasibility_jump = opts.feasibility_jump
    if opts.deterministic_time is not None:
        params.num_workers = 1
        params.max_deterministic_time = opts.deterministic_time
    else:
        params.num_workers = opts.num_workers
        params.use_lns_only = opts.lns_only
        params.max_time_in_seconds = budget_s


def solve_cp(
    problem: Problem, time_limit_ms: float = 50.0, options: CpOptions | None = None
) -> SolveResult:
    """Greedy first (the fallback), then CP-SAT over the candidates within what is left of
    `time_limit_ms`; returns whichever plan has the lower exact objective."""
    opts = options or CpOptions()
    started = time.perf_counter()
    greedy = solve_greedy(problem)
    if not greedy.plans:
        return SolveResult("cp", greedy.status, greedy.objective, greedy.objective,
                           greedy.wall_ms, stats=dict(greedy.stats))
    assert greedy.objective is not None
    cands = generate_candidates(problem, greedy.plans, _candidates_per_request(
        problem, opts, None if opts.deterministic_time is not None else time_limit_ms))
    greedy_end = max(p.prefill_end_s for p in greedy.plans)
    built = _build(problem, cands, opts, greedy_end)
    _hint(problem, built, cands, greedy.plans)
    stats: dict[str, float | int | str] = {
        "candidates": sum(len(per) for per in cands),
        "greedy_objective": greedy.objective,
        "greedy_order": str(greedy.stats.get("order", "")),
    }
    elapsed_ms = (time.perf_counter() - started) * 1e3
    budget_ms = time_limit_ms - elapsed_ms - MODEL_BUILD_RESERVE_MS
    if opts.deterministic_time is None and budget_ms <= 0:
        stats["cp_status"] = "skipped: no time left after greedy and model building"
        return _result(problem, greedy.plans, greedy.objective, None, False, started, stats)
    solver = cp_model.CpSolver()
    _configure(solver, opts, max(budget_ms, 0.0) / 1e3)
    watchdog = None
    if opts.deterministic_time is None:
        watchdog = threading.Timer((budget_ms + opts.watchdog_grace_ms) / 1e3, solver.stop_search)
        watchdog.start()
    try:
        status = solver.solve(built.model)
    finally:
        if watchdog is not None:
            watchdog.cancel()
    stats["cp_status"] = solver.status_name(status)
    stats["cp_wall_ms"] = solver.wall_time * 1e3
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return _result(problem, greedy.plans, greedy.objective, None, False, started, stats)
    chosen = []
    order = []
    for r, per in enumerate(cands):
        i = next(i for i, x in enumerate(built.presence[r]) if solver.boolean_value(x))
        chosen.append(per[i])
        order += [(solver.value(s), r, k) for k, s in enumerate(built.starts[r][i])]
    order.sort()
    plans = left_shift(problem, chosen, [(r, k) for _, r, k in order])
    objective = total_objective(problem, plans)
    stats["cp_objective"] = objective
    bound = max(solver.best_objective_bound - _rounding_slack(problem, cands, opts.tick_s),
                contention_free_bound(problem, cands))
    proved = status == cp_model.OPTIMAL
    if objective < greedy.objective - 1e-12:
        stats["improved_on_greedy"] = 1
        return _result(problem, plans, objective, bound, proved, started, stats)
    stats["improved_on_greedy"] = 0
    return _result(problem, greedy.plans, greedy.objective, bound, proved, started, stats)


def contention_free_bound(problem: Problem, cands: list[list[Candidate]]) -> float:
    """Σ_r min over r's candidates of its cost if it had the instances to itself: a lower bound
    over the candidate set (others can only delay it), valid when the search proves little."""
    total = 0.0
    for r, per in enumerate(cands):
        req = problem.requests[r]
        best = math.inf
        for cand in per:
            end = 0.0
            for chunk in cand.chunks:
                end = max(end, chunk.release_s) + chunk.duration_s
            best = min(best, request_cost(problem, req, end, cand.gpu_seconds))
        total += best
    return total


def _rounding_slack(problem: Problem, cands: list[list[Candidate]], tick: float) -> float:
    """How much rounding to ticks can raise the objective: any chunk waits behind at most all
    chunks before it, each rounded up by under one tick. Subtracting it keeps `bound` a lower
    bound of the exact problem (up to SLO misses decided within that slack of a deadline)."""
    chain = sum(max(len(c.chunks) for c in per) for per in cands) + 1
    return sum(r.weight * chain * tick / r.ttft_slo_s for r in problem.requests)


def _result(problem: Problem, plans: Sequence[RequestPlan], objective: float,
            bound: float | None, proved: bool, started: float,
            stats: dict[str, float | int | str]) -> SolveResult:
    del problem
    status = SolveStatus.OPTIMAL if proved else SolveStatus.FEASIBLE
    wall_ms = (time.perf_counter() - started) * 1e3
    return SolveResult("cp", status, objective, bound, wall_ms, tuple(plans), stats)
