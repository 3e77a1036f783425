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
- U_r ≤ H also keeps out ends that no plan as good as greedy's can have (`_restrict`, which drops
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
"Optimal" means proved within MIP_REL_GAP and those tolerances.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass
from typing import Any

import highspy
import pulp

from tetris.solver.candidates import DEFAULT_MAX_CANDIDATES, Candidate, generate_candidates
from tetris.solver.greedy import solve_greedy
from tetris.solver.objective import MISS_EPS_S, total_objective
from tetris.solver.plan import RequestPlan, SolveResult, SolveStatus
from tetris.solver.problem import Problem
from tetris.solver.schedule import left_shift, serial_starts

BACKENDS = ("cbc", "highs")
MIP_REL_GAP = 1e-6  # HiGHS's default 1e-4 would call a 0.01 %-suboptimal plan "optimal"
# Reading the solution back and left-shifting it; CBC also spends this starting its process.
SOLVE_RESERVE_MS = 5.0
# pulp hands the model over (MPS file for CBC, row by row for HiGHS) before any solver clock
# starts; measured, that takes about as long as building it. Reserved so as not to overrun.
HANDOVER_PER_BUILD = 1.0


@dataclass(frozen=True)
class MilpOptions:
    backend: str = "cbc"  # "cbc" or "highs"
    max_candidates: int = DEFAULT_MAX_CANDIDATES
    warm_start: bool = True  # greedy's plan as the initial solution
    threads: int = 1
    msg: bool = False


# A flattened chunk: (request, candidate, chunk index).
_Ref = tuple[int, int, int]


@dataclass
class _Model:
    prob: Any
    x: list[list[Any]]
    s: list[list[list[Any]]]
    ends: list[Any]
    misses: list[Any]
    orders: dict[tuple[_Ref, _Ref], Any]  # y = 1: first chunk before second
    deadlines: list[float]


def _alone(cand: Candidate, now: float) -> list[float]:
    """Chunk starts of the candidate run alone: the earliest any schedule can give them."""
    starts, t = [], 0.0
    for c in cand.chunks:
        t = max(t, c.release_s - now)
        starts.append(t)
        t += c.duration_s
    return starts


def _horizon(problem: Problem, cands: list[list[Candidate]]) -> float:
    now = problem.now_s
    latest = max(c.release_s - now for per in cands for cand in per for c in cand.chunks)
    work = sum(max(sum(c.duration_s for c in cand.chunks) for cand in per) for per in cands)
    h = latest + work
    return h + 1e-9 * (1.0 + h)  # float summation order must not push a valid end past H


@dataclass
class _Window:
    """What any plan at least as good as greedy's can do for one request (relative times)."""

    floor: float  # no end earlier: the best candidate run alone
    cap: float  # no end later
    deadline: float
    may_miss: bool


def _restrict(problem: Problem, cands: list[list[Candidate]],
              cutoff: float) -> tuple[list[list[Candidate]], list[_Window]]:
    """Drop candidates and end times that no plan with objective ≤ `cutoff` (greedy's) can use.

    Each request's cost is at least its `low` (best alone end, least GPU-seconds, a miss only if
    even that misses), so in such a plan it exceeds `low` by at most slack = cutoff − Σ low. That
    bounds its end (E ≤ floor + S·slack/w), rules out candidates costing more than that on their
    own, and an avoidable miss when w·P > slack. Greedy's plan (candidate 0) always survives, so
    the optimum over the candidates does too."""
    now, lam, pen = problem.now_s, problem.gpu_cost_weight, problem.miss_penalty
    alone_end = [[_alone(c, now)[-1] + c.chunks[-1].duration_s for c in per] for per in cands]
    lows, deadlines, forced = [], [], []
    for r, per in enumerate(cands):
        req = problem.requests[r]
        deadlines.append(req.deadline_s - now + MISS_EPS_S)
        forced.append(min(alone_end[r]) > deadlines[r])
        ttft = min(alone_end[r]) + now - req.arrival_s
        gpu = min(c.gpu_seconds for c in per)
        lows.append(req.weight * ((ttft + lam * gpu) / req.ttft_slo_s + pen * forced[r]))
    slack = max(0.0, cutoff - sum(lows)) + 1e-9 * (1.0 + abs(cutoff))
    kept = []
    for r, per in enumerate(cands):
        req = problem.requests[r]
        may_miss = forced[r] or req.weight * pen <= slack
        floor, gpu = min(alone_end[r]), min(c.gpu_seconds for c in per)
        kept.append([
            c for m, (c, e) in enumerate(zip(per, alone_end[r], strict=True))
            if m == 0 or (
                req.weight * (e - floor + lam * (c.gpu_seconds - gpu)) / req.ttft_slo_s <= slack
                and (may_miss or e <= deadlines[r]))
        ])
    h = _horizon(problem, kept)
    windows = []
    for r, per in enumerate(kept):
        req = problem.requests[r]
        floor = min(_alone(c, now)[-1] + c.chunks[-1].duration_s for c in per)
        may_miss = forced[r] or req.weight * pen <= slack
        cap = min(h, floor + req.ttft_slo_s * slack / req.weight)
        if not may_miss:
            cap = min(cap, deadlines[r])
        windows.append(_Window(floor, max(cap, floor), deadlines[r], may_miss))
    return kept, windows


@dataclass
class _Chunks:
    """Every chunk of every candidate, flattened in (request, candidate, chunk) order, with the
    window its start variable gets in the model: [lo, hi]."""

    refs: list[_Ref]
    lo: list[float]
    hi: list[float]
    duration: list[float]
    instances: list[tuple[int, ...]]
    first: list[int]  # first[r]: index of request r's first chunk; first[-1] = len(refs)


def _chunks(problem: Problem, cands: list[list[Candidate]], windows: list[_Window]) -> _Chunks:
    """lo: the start the chunk gets when its chain runs alone; hi: the window's cap less the
    chain's remaining duration (never below lo)."""
    out = _Chunks([], [], [], [], [], [])
    for r, (per, win) in enumerate(zip(cands, windows, strict=True)):
        out.first.append(len(out.refs))
        for m, cand in enumerate(per):
            alone = _alone(cand, problem.now_s)
            tail = win.cap
            his = []
            for c in reversed(cand.chunks):
                tail -= c.duration_s
                his.append(tail)
            his.reverse()
            for k, c in enumerate(cand.chunks):
                out.refs.append((r, m, k))
                out.lo.append(alone[k])
                out.hi.append(max(alone[k], his[k]))
                out.duration.append(c.duration_s)
                out.instances.append(c.instances)
    out.first.append(len(out.refs))
    return out


def _disjunctive(num_instances: int, chunks: _Chunks) -> list[int]:
    """For chunk t (index into `chunks.refs`), a bitmask of the chunks j > t that need an order
    binary with it: of a later request, sharing an instance, and with start windows that can
    overlap (lo_j < hi_t + d_t and lo_t < hi_j + d_j; otherwise M ≤ 0, see the module doc).
    Python ints as bitsets keep this at ~1-3 ms even for 500,000 pairs, so the pairs can be
    counted before the (far costlier) model is built."""
    n = len(chunks.refs)
    on = [0] * num_instances
    for t, gs in enumerate(chunks.instances):
        for g in gs:
            on[g] |= 1 << t
    end = [h + d for h, d in zip(chunks.hi, chunks.duration, strict=True)]
    by_lo = sorted(range(n), key=chunks.lo.__getitem__)
    lo_sorted = [chunks.lo[t] for t in by_lo]
    starts_before = [0]  # starts_before[p]: the p chunks with the smallest lo
    for t in by_lo:
        starts_before.append(starts_before[-1] | (1 << t))
    by_end = sorted(range(n), key=end.__getitem__)
    end_sorted = [end[t] for t in by_end]
    ends_after = [0] * (n + 1)  # ends_after[p]: all but the p chunks with the smallest end
    for p in range(n - 1, -1, -1):
        ends_after[p] = ends_after[p + 1] | (1 << by_end[p])
    masks = []
    r = 0
    for t in range(n):
        while t >= chunks.first[r + 1]:
            r += 1
        share = 0
        for g in chunks.instances[t]:
            share |= on[g]
        later = share >> chunks.first[r + 1] << chunks.first[r + 1]
        masks.append(later & starts_before[bisect.bisect_left(lo_sorted, end[t])]
                     & ends_after[bisect.bisect_right(end_sorted, chunks.lo[t])])
    return masks


def _build(problem: Problem, cands: list[list[Candidate]], windows: list[_Window],
           chunks: _Chunks, pairs: list[int], abort_at: float = math.inf) -> _Model | None:
    """The model; None if the clock passes `abort_at` (checked every 256 order binaries)."""
    now, lam, pen = problem.now_s, problem.gpu_cost_weight, problem.miss_penalty
    prob = pulp.LpProblem("tetris", pulp.LpMinimize)
    objective: list[Any] = []
    constant = 0.0
    xs, ss, ends, misses, deadlines = [], [], [], [], []
    t = 0
    for r, (per, win) in enumerate(zip(cands, windows, strict=True)):
        req = problem.requests[r]
        scale = req.weight / req.ttft_slo_s
        x_r = [prob.add_variable(f"x_{r}_{m}", cat=pulp.LpBinary) for m in range(len(per))]
        prob += pulp.lpSum(x_r) == 1
        alone = [_alone(cand, now) for cand in per]
        floor, cap, deadline = win.floor, win.cap, win.deadline
        end = prob.add_variable(f"E_{r}", floor, cap)
        miss = prob.add_variable(f"miss_{r}", int(deadline < floor),
                               int(win.may_miss and deadline < cap), cat=pulp.LpInteger)
        if floor <= deadline < cap:
            prob += end - deadline <= (cap - deadline) * miss
        s_r = []
        for m, cand in enumerate(per):
            s_rm = []
            for k in range(len(cand.chunks)):
                assert chunks.refs[t] == (r, m, k)
                s_rm.append(prob.add_variable(f"s_{r}_{m}_{k}", chunks.lo[t], chunks.hi[t]))
                t += 1
                if k:
                    prob += s_rm[k] >= s_rm[k - 1] + cand.chunks[k - 1].duration_s
            last = cand.chunks[-1].duration_s
            prob += end >= s_rm[-1] + last - (cap - floor) * (1 - x_r[m])
            objective.append(lam * scale * cand.gpu_seconds * x_r[m])
            s_r.append(s_rm)
        # Redundant, but lifts the LP bound: E is at least the chosen candidate's alone end.
        prob += end >= pulp.lpSum((a[-1] + cand.chunks[-1].duration_s) * x
                                  for a, cand, x in zip(alone, per, x_r, strict=True))
        objective += [scale * end, req.weight * pen * miss]
        constant += scale * (now - req.arrival_s)
        xs.append(x_r)
        ss.append(s_r)
        ends.append(end)
        misses.append(miss)
        deadlines.append(deadline)
    orders: dict[tuple[_Ref, _Ref], Any] = {}
    lo, hi, dur, refs = chunks.lo, chunks.hi, chunks.duration, chunks.refs
    for a, mask in enumerate(pairs):
        i = refs[a]
        x_i, s_i = xs[i[0]][i[1]], ss[i[0]][i[1]][i[2]]
        while mask:
            low = mask & -mask
            mask ^= low
            b = low.bit_length() - 1
            j = refs[b]
            m_ij = hi[a] + dur[a] - lo[b]
            m_ji = hi[b] + dur[b] - lo[a]
            if m_ij <= 0 or m_ji <= 0:
                continue  # their windows cannot overlap (`_disjunctive` leaves these out)
            if not len(orders) % 256 and time.perf_counter() > abort_at:
                return None
            y = prob.add_variable("y_{}_{}_{}_{}_{}_{}".format(*i, *j), cat=pulp.LpBinary)
            x_j, s_j = xs[j[0]][j[1]], ss[j[0]][j[1]][j[2]]
            # s_i + d_i − s_j ≤ M_ij·(3 − y − x_i − x_j) and s_j + d_j − s_i ≤ M_ji·(2 + y − x_i
            # − x_j), written out term by term: pulp's operator arithmetic costs 4x as much.
            prob.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression(
                {s_i: 1, s_j: -1, y: m_ij, x_i: m_ij, x_j: m_ij}, dur[a] - 3 * m_ij),
                pulp.LpConstraintLE))
            prob.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression(
                {s_j: 1, s_i: -1, y: -m_ji, x_i: m_ji, x_j: m_ji}, dur[b] - 2 * m_ji),
                pulp.LpConstraintLE))
            orders[i, j] = y
    prob += pulp.lpSum(objective) + constant
    return _Model(prob, xs, ss, ends, misses, orders, deadlines)


def _warm_start(problem: Problem, built: _Model, cands: list[list[Candidate]],
                greedy: tuple[RequestPlan, ...]) -> None:
    """Greedy's plan (candidate 0 everywhere), re-timed in greedy's chunk order with the model's
    own arithmetic; unchosen candidates run alone, which the model's bounds always allow."""
    now = problem.now_s
    chosen = [per[0] for per in cands]
    order = sorted(
        ((r, k) for r, cand in enumerate(chosen) for k in range(len(cand.chunks))),
        key=lambda ref: (greedy[ref[0]].chunks[ref[1]].start_s, ref),
    )
    free = [problem.free_at(g) - now for g in range(problem.num_instances)]
    starts = serial_starts(chosen, order, free,
                           lambda ref: chosen[ref[0]].chunks[ref[1]].release_s - now,
                           lambda ref: chosen[ref[0]].chunks[ref[1]].duration_s)
    value: dict[_Ref, float] = {}
    for r, per in enumerate(cands):
        for m, cand in enumerate(per):
            times = starts[r] if m == 0 else _alone(cand, now)
            built.x[r][m].setInitialValue(int(m == 0))
            for k, t in enumerate(times):
                var = built.s[r][m][k]
                value[r, m, k] = min(max(t, var.lowBound), var.upBound)
                var.setInitialValue(value[r, m, k])
        end = starts[r][-1] + chosen[r].chunks[-1].duration_s
        built.ends[r].setInitialValue(min(max(end, built.ends[r].lowBound), built.ends[r].upBound))
        built.misses[r].setInitialValue(int(end > built.deadlines[r]))
    for (i, j), y in built.orders.items():
        y.setInitialValue(int(i[1] == 0 and j[1] == 0 and value[i] <= value[j]))


class _Highs(pulp.HiGHS):  # type: ignore[misc]
    """pulp's HiGHS interface ignores initial values (handed over here as a MIP start) and starts
    the clock before copying the model into HiGHS (the limit is re-set here, after the copy)."""

    def __init__(self, warm_start: bool, deadline: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.warm_start = warm_start
        self.deadline = deadline

    def callSolver(self, lp: Any) -> None:
        model = lp.solverModel
        if self.warm_start:
            values = [0.0] * model.getNumCol()
            for var in lp.variables():
                values[var.index] = float(var.varValue or 0.0)
            start = highspy.HighsSolution()
            start.col_value = values
            start.value_valid = True
            model.setSolution(start)
        model.setOptionValue("time_limit", max(1e-3, self.deadline - time.perf_counter()))
        super().callSolver(lp)


class _Cbc(pulp.COIN_CMD):  # type: ignore[misc]
    """CBC's time limit, read when pulp builds the command line — after it has written the model
    file, which for large models takes a good share of a short budget."""

    def __init__(self, deadline: float, **kwargs: Any) -> None:
        self.deadline = deadline
        super().__init__(**kwargs)

    @property
    def timeLimit(self) -> float:
        return max(1e-3, self.deadline - time.perf_counter())

    @timeLimit.setter
    def timeLimit(self, value: float | None) -> None:
        del value  # pulp's constructor sets it; the deadline rules


def _solver(opts: MilpOptions, limit_s: float) -> Any:
    deadline = time.perf_counter() + limit_s
    if opts.backend == "highs":
        return _Highs(opts.warm_start, deadline, msg=opts.msg, timeLimit=limit_s,
                      threads=opts.threads, gapRel=MIP_REL_GAP)
    # COIN_CMD on PuLP's bundled binary: PULP_CBC_CMD is the same solver but deprecated.
    kwargs = dict(msg=opts.msg, threads=opts.threads, gapRel=MIP_REL_GAP,
                  warmStart=opts.warm_start, timeMode="elapsed")
    cbc = _Cbc(deadline, **kwargs)
    bundled = getattr(getattr(pulp, "PULP_CBC_CMD", None), "pulp_cbc_path", None)
    if not cbc.available() and bundled is not None:
        cbc = _Cbc(deadline, path=bundled, **kwargs)
    return cbc


def milp_status(sol_status: int) -> SolveStatus:
    """The MILP's own outcome from pulp's `sol_status`. LpStatus says "Optimal" for a CBC run
    stopped on time with an incumbent; only `sol_status` tells proved from merely found."""
    if sol_status == pulp.LpSolutionOptimal:
        return SolveStatus.OPTIMAL
    if sol_status == pulp.LpSolutionIntegerFeasible:
        return SolveStatus.FEASIBLE
    if sol_status == pulp.LpSolutionInfeasible:
        return SolveStatus.INFEASIBLE
    return SolveStatus.NO_SOLUTION  # nothing found, or "unbounded" (impossible: all bounded)


def _dual_bound(prob: Any, backend: str) -> float | None:
    """HiGHS's MIP dual bound (pulp passes HiGHS no objective constant: add it back)."""
    if backend != "highs" or getattr(prob, "solverModel", None) is None:
        return None
    bound = float(prob.solverModel.getInfo().mip_dual_bound)
    return bound + float(prob.objective.constant) if math.isfinite(bound) else None


def solve_milp(
    problem: Problem, time_limit_ms: float = 10_000.0, options: MilpOptions | None = None
) -> SolveResult:
    """Greedy first (the fallback), then the MILP over the candidates within what is left of
    `time_limit_ms`; returns whichever plan has the lower exact objective."""
    opts = options or MilpOptions()
    if opts.backend not in BACKENDS:
        raise ValueError(f"unknown MILP backend {opts.backend!r}: use one of {', '.join(BACKENDS)}")
    started = time.perf_counter()
    greedy = solve_greedy(problem)
    if not greedy.plans:
        return SolveResult("milp", greedy.status, greedy.objective, greedy.objective,
                           (time.perf_counter() - started) * 1e3, stats=dict(greedy.stats))
    assert greedy.objective is not None
    generated = generate_candidates(problem, greedy.plans, opts.max_candidates)
    cands, windows = _restrict(problem, generated, greedy.objective)
    build_started = time.perf_counter()
    built = _build(problem, cands, windows)
    build_ms = (time.perf_counter() - build_started) * 1e3
    if opts.warm_start:
        _warm_start(problem, built, cands, greedy.plans)
    prob = built.prob
    stats: dict[str, float | int | str] = {
        "backend": opts.backend,
        "candidates": sum(len(per) for per in generated),
        "candidates_kept": sum(len(per) for per in cands),
        "variables": prob.numVariables(),
        "constraints": prob.numConstraints(),
        "greedy_objective": greedy.objective,
        "improved_on_greedy": 0,
    }
    budget_ms = (time_limit_ms - (time.perf_counter() - started) * 1e3 - SOLVE_RESERVE_MS
                 - HANDOVER_PER_BUILD * build_ms)
    if budget_ms <= 0:
        stats["milp_status"] = "skipped: no time left after greedy and model building"
        return _result(greedy.plans, greedy.objective, None, False, started, stats)
    solve_started = time.perf_counter()
    try:
        prob.solve(_solver(opts, budget_ms / 1e3))
    except pulp.PulpSolverError as error:
        # Seen with the bundled CBC 2.10.3: a MIP start and ~10-40 ms of limit, and it segfaults.
        stats["milp_status"] = f"solver error: {error}"
        return _result(greedy.plans, greedy.objective, None, False, started, stats)
    finally:
        stats["milp_wall_ms"] = (time.perf_counter() - solve_started) * 1e3
    stats["milp_status"] = pulp.LpSolution.get(prob.sol_status, str(prob.sol_status))
    status = milp_status(prob.sol_status)
    bound = _dual_bound(prob, opts.backend)
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
