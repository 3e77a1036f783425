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
"Optimal" means proved within MIP_REL_GAP and those tolerances, over the candidates given — and
how many candidates a request gets depends on the time limit (`solve_milp`), down to greedy's
plan alone (the MILP then only re-orders chunks) under short limits on large problems.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import pulp

from tetris.solver.candidates import DEFAULT_MAX_CANDIDATES, Candidate, generate_candidates
from tetris.solver.greedy import solve_greedy
from tetris.solver.milp_backends import (
    BACKENDS,
    dual_bound,
    make_solver,
    run_solver,
)
from tetris.solver.objective import MISS_EPS_S, total_objective
from tetris.solver.plan import RequestPlan, SolveResult, SolveStatus
from tetris.solver.problem import Problem
from tetris.solver.schedule import left_shift, serial_starts

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
    - build: `_build` + `_warm_start`: 11-15 µs a pair (~20 at 87,000; 39-46 when the pair
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
# the exact count (`_disjunctive`) then corrects.
PAIR_DENSITY = 0.5
# A build this many times slower than estimated scales the handover estimates up as much.
MAX_SLOWDOWN = 2.0


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
           chunks: _Chunks | None = None, pairs: list[int] | None = None,
           abort_at: float = math.inf) -> _Model | None:
    """The model; None if the clock passes `abort_at` (checked every 256 order binaries).
    `chunks` and `pairs` are computed here unless given (`solve_milp` has them already)."""
    if chunks is None:
        chunks = _chunks(problem, cands, windows)
    if pairs is None:
        pairs = _disjunctive(problem.num_instances, chunks)
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
        cands, windows = _restrict(problem, generated, greedy.objective)
        chunks = _chunks(problem, cands, windows)
        pairs = _disjunctive(problem.num_instances, chunks)
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
    built = _build(problem, cands, windows, chunks, pairs, abort_at)
    if built is not None and opts.warm_start:
        _warm_start(problem, built, cands, greedy.plans)
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
