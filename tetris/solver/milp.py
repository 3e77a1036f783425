"""MILP planner (PuLP, CBC or HiGHS): the CP-SAT model in continuous time, for offline use and for
cross-checking CP on small instances. Same candidates, same objective.

Model (times in seconds after `now`; ρ = a chunk's release, d its duration, D_r = deadline − now):
- x[r,m] ∈ {0,1}, Σ_m x[r,m] = 1                       (one candidate per request)
- s[r,m,k] ∈ [lo, hi] continuous, for EVERY candidate  (lo: the start it gets when its chain runs
  alone from its releases; hi: U_r − the chain's remaining duration)
- s[r,m,k+1] ≥ s[r,m,k] + d[r,m,k]                      (imposed unconditionally: see H)
- chunks i, j of different requests sharing an instance: one order binary y and
      s_i + d_i − s_j ≤ M_ij·(3 − y − x_i − x_j),   s_j + d_j − s_i ≤ M_ji·(2 + y − x_i − x_j)
  so one order holds when both are chosen, and nothing binds otherwise. (Two chunks of one
  request are the same candidate — ordered by precedence — or exclusive candidates.)
- E_r ∈ [L_r, U_r], E_r ≥ s_last + d_last − (U_r − L_r)·(1 − x[r,m]),  E_r ≥ Σ_m x·(alone end)
- E_r − D_r ≤ (U_r − D_r)·miss_r
- minimise Σ_r w_r·((E_r + now − a_r)/S_r + P·miss_r + λ·Σ_m x[r,m]·GPUsec[r,m]/S_r)

Horizon and big-Ms (why each is valid):
- H = max release + Σ_r max_m (candidate's total duration). The objective is non-decreasing in
  every end time, so some optimum is left-shifted (see `schedule`): there each chunk starts at its
  release or at the end of another chosen chunk; following that chain back ends at a release, so
  every chosen chunk ends by H. An unchosen candidate's chain, run alone, also ends by H — which
  is what makes unconditional precedence and these upper bounds safe.
- U_r ≤ H also keeps out ends that no plan as good as greedy's can have (`restrict`, which drops
  such candidates too, and forbids misses that would cost more than greedy leaves to spare). The
  optimum is at least as good as greedy's plan, which satisfies all of it, so nothing is lost.
- M_ij = hi_i + d_i − lo_j is the largest value s_i + d_i − s_j can take within the bounds, the
  tightest M that relaxes the constraint; a pair with M_ij ≤ 0 (or M_ji ≤ 0) can never overlap
  and gets no binary at all.
- L_r = min over candidates of the alone end bounds E_r below and every end is ≤ U_r, so U_r − L_r
  relaxes an unchosen candidate's end constraint; likewise U_r − D_r for the miss constraint
  (miss is fixed to 0 when D_r ≥ U_r and to 1 when D_r < L_r).

Solver tolerances (≈1e-6 on integrality and feasibility) let MILP times be slightly off, so the
solution is only read for its choices and chunk order: `left_shift` re-times it exactly (never
later than a feasible schedule in that order) and `total_objective` re-prices it. As in
`cp_sat`, the result is the better of greedy's and the MILP's plans by that exact objective.
"Optimal" means proved within MIP_REL_GAP and those tolerances, over the candidates given — and
how many candidates a request gets depends on the time limit (`solve_milp`), down to greedy's
plan alone (the MILP then only re-orders chunks) under short limits on large problems.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import pulp

from tetris.solver.candidates import DEFAULT_MAX_CANDIDATES, generate_candidates
from tetris.solver.greedy import solve_greedy
from tetris.solver.milp_backends import (
    BACKENDS,
    dual_bound,
    make_solver,
    run_solver,
)
from tetris.solver.milp_model import (
    build_model,
    disjunctive_pairs,
    flat_chunks,
    restrict,
    warm_start,
)
from tetris.solver.objective import total_objective
from tetris.solver.plan import RequestPlan, SolveResult, SolveStatus
from tetris.solver.problem import Problem
from tetris.solver.schedule import left_shift

# Reading the solution back and left-shifting it; CBC also spends this starting its process.
SOLVE_RESERVE_MS = 5.0


@dataclass(frozen=True)
class MilpOptions:
    backend: str = "cbc"  # "cbc" or "highs"
    max_candidates: int = DEFAULT_MAX_CANDIDATES
    warm_start: bool = True  # greedy's plan as the initial solution
    threads: int = 1
    msg: bool = False


@dataclass(frozen=True)
class _Costs:
    """What the model costs outside the solver's search, in ms per order binary (`pairs`: they
    dominate, 87,141 of them for 199 candidates at 16 instances × 16 requests) plus a constant.
    Measured on this 2-core machine, shared with other jobs, on `tetris bench solver` problems
    (16-32 instances × 16-32 requests, 400-11,000 pairs; pulp 3.3, CBC 2.10, HiGHS 1.16), and
    set at the upper end so that a loaded machine still keeps the limit:
    - build: `build_model` + `warm_start`: 11-15 µs a pair (~20 at 87,000; 39-46 when the pair
      constraints went through pulp's operators), ~20 µs a chunk.
    - before: what `prob.solve` takes with a 1 ms limit, i.e. the work no time limit stops:
      CBC 45-75 µs a pair (pulp writes the MPS file, CBC reads it, presolves, solves the root
      LP), HiGHS 22-39 µs (pulp copies the model in row by row, HiGHS presolves).
    - after: how far past its deadline `prob.solve` returns when the limit leaves time to search
      (limits of 0.2-2 s): both solvers check their clock only between steps that grow with the
      model, plus reading the solution back (4-6 µs a pair). CBC (between root cut passes and
      heuristics): 20-55 ms at 400 pairs, up to 120 at 1,200, 150 at 1,800, 180 at 3,400, 440 at
      11,000. HiGHS: 3-25 ms up to 3,400 pairs, but 35-270 at 6,200 and 260-350 at 11,000
      warm-started, and 150-820 ms without the start (1,800-11,000 pairs).
    The solve is allowed to end up to ~50 ms late (the limit's tolerance), so `after` covers the
    common case, not every outlier; CBC still running at the deadline is killed (`_Cbc`)."""

    build_per_pair: float = 0.015
    build_per_chunk: float = 0.02
    before_per_pair: float = 0.065
    before_fixed: float = 10.0
    after_per_pair: float = 0.05
    after_fixed: float = 30.0
    readback_per_pair: float = 0.006  # the part of `after` that follows the solver's exit

    @property
    def per_pair(self) -> float:
        return self.build_per_pair + self.before_per_pair + self.after_per_pair

    @property
    def fixed(self) -> float:
        return self.before_fixed + self.after_fixed

    def setup_ms(self, pairs: int, chunks: int) -> float:
        """Building, handing over and reading back: the time the solver does not search."""
        return self.per_pair * pairs + self.build_per_chunk * chunks + self.fixed

    def room_ms(self, budget_ms: float) -> float:
        """How much of the setup may grow with the candidates: SETUP_SHARE of what the fixed
        costs leave, so that the solver searches at least as long as extra candidates cost."""
        return SETUP_SHARE * (budget_ms - self.fixed)


def _costs(opts: MilpOptions) -> _Costs:
    if opts.backend == "cbc":
        return _Costs()
    return _Costs(before_per_pair=0.035, before_fixed=2.0,
                  after_per_pair=0.04 if opts.warm_start else 0.08, after_fixed=5.0)


# The solver should search for at least as long as the setup takes (the rest of the budget).
SETUP_SHARE = 0.5
# Least solver time worth handing the model over for; below it the MILP is skipped.
MIN_SOLVE_MS = 10.0
# Order binaries ≈ PAIR_DENSITY·N² for N candidates in all (measured 0.3-0.85, mostly ~0.5, at
# 16-32 instances × 16-32 requests); used for a first guess of candidates per request, which
# the exact count (`disjunctive_pairs`) then corrects.
PAIR_DENSITY = 0.5
# A build this many times slower than estimated scales the handover estimates up as much.
MAX_SLOWDOWN = 2.0


def _solver(opts: MilpOptions, deadline: float, kill_at: float = math.inf) -> Any:
    return make_solver(opts.backend, threads=opts.threads, msg=opts.msg,
                       warm_start=opts.warm_start, deadline=deadline, kill_at=kill_at)


def _candidates_per_request(problem: Problem, opts: MilpOptions, budget_ms: float) -> int:
    """A first guess: as many candidates as fit the setup's room (`_Costs.room_ms`), with order
    binaries ≈ PAIR_DENSITY·N² for N in all."""
    costs = _costs(opts)
    pairs = max(0.0, costs.room_ms(budget_ms)) / costs.per_pair
    per_request = math.sqrt(pairs / PAIR_DENSITY) / max(1, len(problem.requests))
    return max(1, min(opts.max_candidates, int(per_request)))


def solve_milp(
    problem: Problem, time_limit_ms: float = 10_000.0, options: MilpOptions | None = None
) -> SolveResult:
    """Greedy first (the fallback), then the MILP over the candidates within what is left of
    `time_limit_ms`; returns whichever plan has the lower exact objective.

    The model has one order binary per pair of chunks that could collide, ~N²/2 for N
    candidates, and building it and handing it to the solver costs more than searching does at
    these limits (`_Costs`: 87,141 pairs took 6-9 s to build alone). So the pairs are counted
    exactly before anything is built, and candidates per request (the first k of
    `generate_candidates`, greedy's first) are fitted to the room left after greedy
    (`_Costs.room_ms`). Greedy's plan is returned with stats["milp_status"] = "skipped: …" saying
    why when no time is left after greedy, when even one candidate a request would not fit, or
    when building overruns (checked in its loop); "killed: …" when CBC was stopped at the
    deadline. The limit holds to within greedy's own time (it always runs, stats["greedy_ms"])
    and the solvers' rarer overruns (HiGHS cannot be stopped between its clock checks)."""
    opts = options or MilpOptions()
    if opts.backend not in BACKENDS:
        raise ValueError(f"unknown MILP backend {opts.backend!r}: use one of {', '.join(BACKENDS)}")
    costs = _costs(opts)
    started = time.perf_counter()
    deadline = started + time_limit_ms / 1e3
    greedy = solve_greedy(problem)
    if not greedy.plans:
        return SolveResult("milp", greedy.status, greedy.objective, greedy.objective,
                           (time.perf_counter() - started) * 1e3, stats=dict(greedy.stats))
    assert greedy.objective is not None
    stats: dict[str, float | int | str] = {
        "backend": opts.backend,
        "greedy_objective": greedy.objective,
        "greedy_ms": (time.perf_counter() - started) * 1e3,
        "improved_on_greedy": 0,
    }

    def budget_ms() -> float:  # for building, handing over and solving
        return (deadline - time.perf_counter()) * 1e3 - SOLVE_RESERVE_MS

    least_ms = costs.setup_ms(0, 0) + MIN_SOLVE_MS
    if budget_ms() < least_ms:
        stats["milp_status"] = (f"skipped: {budget_ms():.0f} ms left after greedy "
                                f"({stats['greedy_ms']:.0f} ms), the MILP needs {least_ms:.0f}")
        return _result(greedy.plans, greedy.objective, None, False, started, stats)
    guess = _candidates_per_request(problem, opts, budget_ms())
    generated = generate_candidates(problem, greedy.plans, guess)
    grown = False
    while True:  # fit the candidates to the room, by their exact pairs: ~1-3 ms a round
        cands, windows = restrict(problem, generated, greedy.objective)
        chunks = flat_chunks(problem, cands, windows)
        pairs = disjunctive_pairs(problem.num_instances, chunks)
        num_pairs = sum(mask.bit_count() for mask in pairs)
        setup_ms = costs.setup_ms(num_pairs, len(chunks.refs))
        room, grows = costs.room_ms(budget_ms()), setup_ms - costs.fixed
        per_request = max(len(per) for per in generated)
        if not grown and per_request == guess < opts.max_candidates and grows < room / 4:
            # Fewer pairs per candidate than PAIR_DENSITY says (few instances, few requests,
            # windows apart): once, as many more as the room allows.
            grown = True
            guess = min(opts.max_candidates, int(guess * math.sqrt(room / max(grows, 1e-3))))
            generated = generate_candidates(problem, greedy.plans, guess)
            continue
        if grows <= room or per_request == 1:
            break
        shrink = math.sqrt(max(0.0, room) / grows)
        per_request = max(1, min(per_request - 1, int(per_request * shrink)))
        generated = [per[:per_request] for per in generated]  # the first k are those for k
    stats.update({
        "candidates": sum(len(per) for per in generated),
        "candidates_per_request": per_request,
        "candidates_kept": sum(len(per) for per in cands),
        "order_binaries": num_pairs,
        "setup_estimate_ms": setup_ms,
    })
    if setup_ms + MIN_SOLVE_MS > budget_ms():
        stats["milp_status"] = (
            f"skipped: {num_pairs} pairs would take ~{setup_ms:.0f} ms to build and hand over to "
            f"{opts.backend}, budget {budget_ms():.0f} ms")
        return _result(greedy.plans, greedy.objective, None, False, started, stats)
    build_estimate_ms = costs.build_per_pair * num_pairs + costs.build_per_chunk * len(chunks.refs)
    before_ms = costs.before_per_pair * num_pairs + costs.before_fixed
    after_ms = costs.after_per_pair * num_pairs + costs.after_fixed
    # Past this, what is left cannot hand the model over and leave the solver MIN_SOLVE_MS.
    abort_at = deadline - (SOLVE_RESERVE_MS + after_ms + before_ms + MIN_SOLVE_MS) / 1e3
    build_started = time.perf_counter()
    built = build_model(problem, cands, windows, chunks, pairs, abort_at)
    if built is not None and opts.warm_start:
        warm_start(problem, built, cands, greedy.plans)
    build_ms = (time.perf_counter() - build_started) * 1e3
    stats["build_ms"] = build_ms
    if built is None:
        stats["milp_status"] = (
            f"skipped: building {num_pairs} pairs overran ({build_ms:.0f} ms, estimated "
            f"{build_estimate_ms:.0f}), no time left to hand over and solve")
        return _result(greedy.plans, greedy.objective, None, False, started, stats)
    prob = built.prob
    stats["variables"] = prob.numVariables()
    stats["constraints"] = prob.numConstraints()
    # A loaded machine builds slowly, and then hands over and reads back slowly too; capped, as
    # a single pause (a garbage collection) would otherwise make every later step look slow.
    slow = min(MAX_SLOWDOWN, max(1.0, build_ms / max(build_estimate_ms, 1.0)))
    before_ms = slow * costs.before_per_pair * num_pairs + costs.before_fixed
    after_ms = slow * costs.after_per_pair * num_pairs + costs.after_fixed
    solver_deadline = deadline - (SOLVE_RESERVE_MS + after_ms) / 1e3
    solver_ms = (solver_deadline - time.perf_counter()) * 1e3
    stats["solver_limit_ms"] = solver_ms
    if solver_ms < before_ms + MIN_SOLVE_MS:
        stats["milp_status"] = (
            f"skipped: building {num_pairs} pairs took {build_ms:.0f} ms (estimated "
            f"{build_estimate_ms:.0f}); handing them over (~{before_ms:.0f} ms) and reading back "
            f"(~{after_ms:.0f} ms) would leave the solver less than {MIN_SOLVE_MS:.0f} ms")
        return _result(greedy.plans, greedy.objective, None, False, started, stats)
    # CBC still running here is killed: what is left is for reading its solution back.
    kill_at = deadline - (SOLVE_RESERVE_MS + slow * costs.readback_per_pair * num_pairs) / 1e3
    solve_started = time.perf_counter()
    try:
        status = run_solver(prob, _solver(opts, solver_deadline, kill_at), kill_at,
                            solver_deadline, stats)
        left_ms = (solver_deadline - time.perf_counter()) * 1e3
        if (status is None or status is SolveStatus.INFEASIBLE) and opts.backend == "cbc" \
                and not str(stats["milp_status"]).startswith("killed") and left_ms >= MIN_SOLVE_MS:
            # The bundled CBC 2.10.3 now and then crashes or calls a feasible model infeasible;
            # HiGHS, in-process, gets what is left of the budget.
            stats["cbc_failure"] = str(stats["milp_status"])
            stats["retried_with"] = "highs"
            opts = dataclasses.replace(opts, backend="highs")
            status = run_solver(prob, _solver(opts, solver_deadline), kill_at, solver_deadline,
                                stats)
    finally:
        stats["milp_wall_ms"] = (time.perf_counter() - solve_started) * 1e3
    if status is None:
        return _result(greedy.plans, greedy.objective, None, False, started, stats)
    bound = dual_bound(prob, opts.backend)
    if status is SolveStatus.INFEASIBLE:
        # Wrong by construction (greedy's plan is a solution); seen from the bundled CBC 2.10.3
        # when a few ms of time limit run out in its preprocessing.
        stats["fallback"] = "MILP reported infeasible (greedy's plan is a solution); greedy used"
    if not status.has_plans:
        return _result(greedy.plans, greedy.objective, bound, False, started, stats)
    stats["milp_objective"] = float(pulp.value(prob.objective))
    chosen, order = [], []
    for r, per in enumerate(cands):
        m = max(range(len(per)), key=lambda i: float(built.x[r][i].varValue or 0.0))
        chosen.append(per[m])
        t = -math.inf
        for k, var in enumerate(built.s[r][m]):
            t = max(t, float(var.varValue))  # tolerance must not put chunk k+1 before k
            order.append((t, r, k))
    order.sort()
    plans = left_shift(problem, chosen, [(r, k) for _, r, k in order])
    objective = total_objective(problem, plans)
    stats["milp_exact_objective"] = objective
    proved = status is SolveStatus.OPTIMAL
    if objective < greedy.objective - 1e-12:
        stats["improved_on_greedy"] = 1
        best, best_plans = objective, tuple(plans)
    else:
        best, best_plans = greedy.objective, greedy.plans
    return _result(best_plans, best, best if proved else bound, proved, started, stats)


def _result(plans: tuple[RequestPlan, ...], objective: float, bound: float | None, proved: bool,
            started: float, stats: dict[str, float | int | str]) -> SolveResult:
    # Greedy's plan always stands behind the MILP, so anything unproved is still FEASIBLE.
    status = SolveStatus.OPTIMAL if proved else SolveStatus.FEASIBLE
    wall_ms = (time.perf_counter() - started) * 1e3
    return SolveResult("milp", status, objective, bound, wall_ms, plans, stats)
