"""CP-SAT planner: choose one candidate per request and place every chunk exactly.

Model (times in integer ticks after `now`; durations rounded up to ticks, releases rounded up,
so any tick schedule is feasible in real time — `schedule.left_shift` then re-times it exactly):
- x[r,m] ∈ {0,1}, Σ_m x[r,m] = 1                        (one candidate per request)
- chunk (r,m,k): optional interval [s, s + d) present iff x[r,m]; s ≥ release
- s[r,m,k+1] ≥ s[r,m,k] + d[r,m,k]                       (chunks in order)
- per instance g: NoOverlap over every interval using g  (exact capacity, nested groups built in)
- E_r = end of the chosen candidate's last chunk;  E_r ≤ deadline_r + C unless miss_r
- minimise Σ_r w_r·(E_r − a_r)/S_r + P·w_r·miss_r + λ·w_r·Σ_m x[r,m]·GPUsec[r,m]/S_r

Rounding. Rounding up moves any chunk's end by at most C ticks, C = Σ_r (most chunks of r's
candidates) + 1, a bound on the length of any chain of waits (`_chain_ticks`), so the miss
literal's deadline is `floor(deadline/tick) + C`: a plan that meets an SLO in real time also
meets it on the tick grid, and the tick model never prices a miss the exact problem does not
have (optimistic; the exact re-pricing after `left_shift` decides the returned objective).
The objective goes to CP-SAT with integer coefficients of a known scale K
(`integer_objective`), not as floats that CP-SAT would scale itself with an unknown
error (~1e-5 absolute, as large as one tick of a long SLO). Hence

    bound = CP-SAT's integer bound / K + constant − (coefficient rounding error)
            − (the most rounding to ticks can add to the TTFT terms, `_rounding_slack`),

a valid lower bound of the exact problem over the candidate set, or the contention-free bound
when that is higher (LNS alone proves little).

Status. OPTIMAL means "proved optimal on the tick grid over the candidates": the returned plan's
exact objective is no more than the tick model's proved optimum (up to coefficient rounding), so
it is within `_rounding_slack` of the exact optimum over the candidates. It is downgraded to
FEASIBLE when the re-timed plan misses an SLO that the tick model counted as met within its
C-tick slack (`stats["cp_note"]`).

Warm start: the greedy plan as a complete hint, improved by large-neighbourhood search (settings
and why: `CpOptions`). The result is the better of CP-SAT's and greedy's plans
by the exact objective, so CP is never worse than greedy. A watchdog thread stops the search at
the deadline even if a phase of the solver overruns its own time limit. Greedy's own time cannot
be cut; the time left after it decides how many candidates to build (`_candidates_per_request`),
and CP is skipped when that is too little (`stats["cp_status"]`, `stats["greedy_ms"]`).
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
from tetris.solver.objective import MISS_EPS_S, request_cost, total_objective
from tetris.solver.plan import RequestPlan, SolveResult, SolveStatus
from tetris.solver.problem import Problem
from tetris.solver.schedule import left_shift, serial_starts

MODEL_BUILD_RESERVE_MS = 2.0
CANDIDATES_PER_MS = 4.0
MIN_CANDIDATES = 2
# Integer objective: the smallest nonzero coefficient is scaled to at least this, unless that
# would take Σ |coefficient|·(variable's upper bound) past OBJECTIVE_MAX_MAGNITUDE.
OBJECTIVE_MIN_SCALED = 1e6
OBJECTIVE_MAX_MAGNITUDE = 2**60


@dataclass(frozen=True)
class CpOptions:
    """Defaults measured on random 8-32 instance × 4-32 request problems (see docs/solver.md):
    two workers running only large-neighbourhood search from the greedy hint improved on greedy
    far more often than CP-SAT's default portfolio; feasibility jump is off because its first
    pass ignores the time limit (51 ms on a 10 ms budget); presolve is off because it eats
    budgets of tens of ms. LNS cannot prove optimality: the reproducible mode
    (`deterministic_time`) runs one worker of complete search instead, which can.

    An OPTIMAL result is optimal on the `tick_s` grid over the candidates (see the module
    docstring): its exact objective exceeds the exact optimum over the candidates by at most the
    tick rounding slack (Σ_r w_r·C·tick/S_r), which `bound` already subtracts."""

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


@dataclass(frozen=True)
class IntegerObjective:
    """Σ_i coefficients[i]·x_i / scale approximates Σ_i c_i·x_i within `error` for every x with
    0 ≤ x_i ≤ ub_i (see `integer_objective`)."""

    scale: float
    coefficients: tuple[int, ...]
    error: float


def integer_objective(
    terms: Sequence[tuple[float, int]],
    min_scaled: float = OBJECTIVE_MIN_SCALED,
    max_magnitude: int = OBJECTIVE_MAX_MAGNITUDE,
) -> IntegerObjective:
    """Integer coefficients for terms (c_i, ub_i) of variables x_i ∈ [0, ub_i].

    K makes the smallest nonzero |c_i| at least `min_scaled`, lowered if needed so that
    Σ |K·c_i|·ub_i ≤ max_magnitude / 2 (CP-SAT needs the objective's range to fit in int64);
    each coefficient is round(K·c_i), so |Σ round(K·c_i)·x_i / K − Σ c_i·x_i| ≤ Σ 0.5·ub_i / K
    over the nonzero terms, which is `error` (in the c_i's units)."""
    if any(ub < 0 for _, ub in terms):
        raise ValueError("variables of the objective must range over [0, ub], ub >= 0")
    nonzero = [abs(c) for c, _ in terms if c != 0.0]
    if not nonzero:
        return IntegerObjective(1.0, tuple(0 for _ in terms), 0.0)
    scale = min_scaled / min(nonzero)
    magnitude = sum(abs(c) * ub for c, ub in terms)
    if magnitude * scale > max_magnitude / 2:
        scale = max_magnitude / 2 / magnitude
    coefficients = tuple(round(c * scale) for c, _ in terms)
    assert sum(abs(q) * ub for q, (_, ub) in zip(coefficients, terms, strict=True)) < max_magnitude
    error = sum(0.5 * ub for c, ub in terms if c != 0.0) / scale
    return IntegerObjective(scale, coefficients, error)


@dataclass
class _Model:
    model: cp_model.CpModel
    presence: list[list[cp_model.IntVar]]
    starts: list[list[list[cp_model.IntVar]]]
    ends: list[cp_model.IntVar]
    misses: list[cp_model.IntVar]
    deadlines: list[int]
    tick_s: float
    objective: IntegerObjective
    constant: float  # the objective's float offset, outside CP-SAT


def _ticks_up(seconds: float, tick: float) -> int:
    return max(0, math.ceil(seconds / tick - 1e-9))


def _chain_ticks(cands: list[list[Candidate]]) -> int:
    """C: the most ticks rounding up can move any chunk's end. The chunks a chunk waits behind
    (its request's earlier chunks, those before it on its instances, recursively) form a chain
    starting at one release; each of them and that release is rounded up by at most one tick."""
    return sum(max(len(c.chunks) for c in per) for per in cands) + 1


def _candidates_per_request(problem: Problem, opts: CpOptions, left_ms: float | None) -> int:
    """Candidates per request for the `left_ms` of the limit left after greedy (None: no wall
    clock): CANDIDATES_PER_MS in total per ms left, at most `opts.max_candidates` per request,
    and 0 (skip CP) when fewer than MIN_CANDIDATES a request would fit. Generating and building
    cost ≈0.04-0.05 ms a candidate (measured at 16 × 32 and 64 × 256), so most of what is left
    remains for the search."""
    if left_ms is None:
        return opts.max_candidates
    total = CANDIDATES_PER_MS * max(0.0, left_ms)
    per_request = int(total / max(1, len(problem.requests)))
    if per_request < MIN_CANDIDATES:
        return 0
    return min(opts.max_candidates, per_request)


def _build(problem: Problem, cands: list[list[Candidate]], opts: CpOptions,
           greedy_end: float) -> _Model:
    tick, now = opts.tick_s, problem.now_s
    chain = _chain_ticks(cands)
    longest = sum(max(sum(c.duration_s for c in cand.chunks) for cand in per) for per in cands)
    num_chunks = sum(len(cand.chunks) for per in cands for cand in per)
    latest_release = max(c.release_s for per in cands for cand in per for c in cand.chunks)
    horizon = _ticks_up(max(greedy_end, latest_release) - now + longest, tick) + num_chunks + 1
    m = cp_model.CpModel()
    on_instance: list[list[cp_model.IntervalVar]] = [[] for _ in range(problem.num_instances)]
    presence, starts, ends, misses, deadlines = [], [], [], [], []
    # (float coefficient, variable, the variable's upper bound; every lower bound is 0)
    terms: list[tuple[float, cp_model.IntVar, int]] = []
    constant = 0.0
    for r, per in enumerate(cands):
        req = problem.requests[r]
        w, slo = req.weight, req.ttft_slo_s
        xs = [m.new_bool_var(f"x{r}_{i}") for i in range(len(per))]
        m.add_exactly_one(xs)
        end = m.new_int_var(0, horizon, f"end{r}")
        miss = m.new_bool_var(f"miss{r}")
        # Optimistic: met in real time ⇒ met in ticks (see the module docstring).
        deadline = math.floor((req.deadline_s + MISS_EPS_S - now) / tick + 1e-9) + chain
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
            terms.append((w * problem.gpu_cost_weight * cand.gpu_seconds / slo, x, 1))
            req_starts.append(cand_starts)
        terms.append((w * tick / slo, end, horizon))
        terms.append((w * problem.miss_penalty, miss, 1))
        constant += w * (now - req.arrival_s) / slo
        presence.append(xs)
        starts.append(req_starts)
        ends.append(end)
        misses.append(miss)
        deadlines.append(deadline)
    for ivs in on_instance:
        if len(ivs) > 1:
            m.add_no_overlap(ivs)
    objective = integer_objective([(c, ub) for c, _, ub in terms])
    m.minimize(cp_model.LinearExpr.weighted_sum([v for _, v, _ in terms],
                                                list(objective.coefficients)))
    return _Model(m, presence, starts, ends, misses, deadlines, tick, objective, constant)


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
    # The objective is integer at scale K: stop only at a proof (the default 1e-4 gap would
    # already be exact in integer units, but say it).
    params.absolute_gap_limit = 0.0
    params.relative_gap_limit = 0.0
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
    greedy_ms = (time.perf_counter() - started) * 1e3
    stats: dict[str, float | int | str] = {
        "greedy_objective": greedy.objective,
        "greedy_order": str(greedy.stats.get("order", "")),
        "greedy_ms": greedy_ms,
    }
    timed = opts.deterministic_time is None
    left_ms = time_limit_ms - greedy_ms - MODEL_BUILD_RESERVE_MS
    per_request = _candidates_per_request(problem, opts, left_ms if timed else None)
    if per_request == 0:
        stats["cp_status"] = (
            f"skipped: greedy took {greedy_ms:.1f} ms of the {time_limit_ms:g} ms limit; the "
            f"{max(0.0, left_ms):.1f} ms left (less a {MODEL_BUILD_RESERVE_MS:g} ms reserve) fit "
            f"fewer than {MIN_CANDIDATES} candidates a request"
        )
        return _result(greedy.plans, greedy.objective, None, False, started, stats)
    cands = generate_candidates(problem, greedy.plans, per_request)
    greedy_end = max(p.prefill_end_s for p in greedy.plans)
    built = _build(problem, cands, opts, greedy_end)
    _hint(problem, built, cands, greedy.plans)
    stats["candidates"] = sum(len(per) for per in cands)
    stats["cp_objective_scale"] = built.objective.scale
    stats["cp_objective_error"] = built.objective.error
    elapsed_ms = (time.perf_counter() - started) * 1e3
    budget_ms = time_limit_ms - elapsed_ms - MODEL_BUILD_RESERVE_MS
    if timed and budget_ms <= 0:
        stats["cp_status"] = "skipped: no time left after greedy and model building"
        return _result(greedy.plans, greedy.objective, None, False, started, stats)
    solver = cp_model.CpSolver()
    _configure(solver, opts, max(budget_ms, 0.0) / 1e3)
    watchdog = None
    if timed:
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
        return _result(greedy.plans, greedy.objective, None, False, started, stats)
    chosen = []
    order = []
    for r, per in enumerate(cands):
        i = next(i for i, x in enumerate(built.presence[r]) if solver.boolean_value(x))
        chosen.append(per[i])
        order += [(solver.value(s), r, k) for k, s in enumerate(built.starts[r][i])]
    order.sort()
    plans = left_shift(problem, chosen, [(r, k) for _, r, k in order])
    objective = total_objective(problem, plans)
    scale, error = built.objective.scale, built.objective.error
    tick_objective = solver.objective_value / scale + built.constant
    stats["cp_objective"] = objective
    stats["cp_tick_objective"] = tick_objective
    cp_bound = (solver.best_objective_bound / scale + built.constant - error
                - _rounding_slack(problem, cands, opts.tick_s))
    stats["cp_bound"] = cp_bound
    bound = max(cp_bound, contention_free_bound(problem, cands))
    proved = status == cp_model.OPTIMAL
    if objective > tick_objective + error + 1e-9 * max(1.0, abs(tick_objective)):
        # Left-shifting never ends a chunk later than its tick time, so only a deadline met
        # within the optimistic C-tick slack but missed in real time gets here.
        proved = False
        stats["cp_note"] = "an SLO met on the tick grid (within the rounding slack) is missed"
    improved = objective < greedy.objective - 1e-12
    stats["improved_on_greedy"] = int(improved)
    best_plans, best = (plans, objective) if improved else (greedy.plans, greedy.objective)
    if best < bound <= best + 1e-9 * max(1.0, abs(best)):
        bound = best  # float noise (sums in another order), not a bound above a plan
    return _result(best_plans, best, bound, proved, started, stats)


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
    """How much rounding to ticks can raise the TTFT terms: any request's end moves by at most
    C ticks (`_chain_ticks`). The miss terms cannot rise (their deadlines carry the same C
    ticks), so subtracting this keeps `bound` a lower bound of the exact problem."""
    chain = _chain_ticks(cands)
    return sum(r.weight * chain * tick / r.ttft_slo_s for r in problem.requests)


def _result(plans: Sequence[RequestPlan], objective: float, bound: float | None, proved: bool,
            started: float, stats: dict[str, float | int | str]) -> SolveResult:
    status = SolveStatus.OPTIMAL if proved else SolveStatus.FEASIBLE
    wall_ms = (time.perf_counter() - started) * 1e3
    return SolveResult("cp", status, objective, bound, wall_ms, tuple(plans), stats)
