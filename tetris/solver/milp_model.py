"""The MILP formulation (see `milp.py` for the model and why each big-M is valid): per-request
time windows that no plan as good as greedy's leaves, the flattened chunks, the disjunctive
pairs counted exactly before building, the PuLP model, and greedy's plan as its warm start."""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass
from typing import Any

import pulp

from tetris.solver.candidates import Candidate
from tetris.solver.objective import MISS_EPS_S
from tetris.solver.plan import RequestPlan
from tetris.solver.problem import Problem
from tetris.solver.schedule import serial_starts

# A flattened chunk: (request, candidate, chunk index).
ChunkRef = tuple[int, int, int]


@dataclass
class MilpModel:
    prob: Any
    x: list[list[Any]]
    s: list[list[list[Any]]]
    ends: list[Any]
    misses: list[Any]
    orders: dict[tuple[ChunkRef, ChunkRef], Any]  # y = 1: first chunk before second
    deadlines: list[float]


def alone_starts(cand: Candidate, now: float) -> list[float]:
    """Chunk starts of the candidate run alone: the earliest any schedule can give them."""
    starts, t = [], 0.0
    for c in cand.chunks:
        t = max(t, c.release_s - now)
        starts.append(t)
        t += c.duration_s
    return starts


def horizon(problem: Problem, cands: list[list[Candidate]]) -> float:
    now = problem.now_s
    latest = max(c.release_s - now for per in cands for cand in per for c in cand.chunks)
    work = sum(max(sum(c.duration_s for c in cand.chunks) for cand in per) for per in cands)
    h = latest + work
    return h + 1e-9 * (1.0 + h)  # float summation order must not push a valid end past H


@dataclass
class Window:
    """What any plan at least as good as greedy's can do for one request (relative times)."""

    floor: float  # no end earlier: the best candidate run alone
    cap: float  # no end later
    deadline: float
    may_miss: bool


def restrict(problem: Problem, cands: list[list[Candidate]],
              cutoff: float) -> tuple[list[list[Candidate]], list[Window]]:
    """Drop candidates and end times that no plan with objective ≤ `cutoff` (greedy's) can use.

    Each request's cost is at least its `low` (best alone end, least GPU-seconds, a miss only if
    even that misses), so in such a plan it exceeds `low` by at most slack = cutoff − Σ low. That
    bounds its end (E ≤ floor + S·slack/w), rules out candidates costing more than that on their
    own, and an avoidable miss when w·P > slack. Greedy's plan (candidate 0) always survives, so
    the optimum over the candidates does too."""
    now, lam, pen = problem.now_s, problem.gpu_cost_weight, problem.miss_penalty
    alone_end = [[alone_starts(c, now)[-1] + c.chunks[-1].duration_s for c in per] for per in cands]
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
    h = horizon(problem, kept)
    windows = []
    for r, per in enumerate(kept):
        req = problem.requests[r]
        floor = min(alone_starts(c, now)[-1] + c.chunks[-1].duration_s for c in per)
        may_miss = forced[r] or req.weight * pen <= slack
        cap = min(h, floor + req.ttft_slo_s * slack / req.weight)
        if not may_miss:
            cap = min(cap, deadlines[r])
        windows.append(Window(floor, max(cap, floor), deadlines[r], may_miss))
    return kept, windows


@dataclass
class Chunks:
    """Every chunk of every candidate, flattened in (request, candidate, chunk) order, with the
    window its start variable gets in the model: [lo, hi]."""

    refs: list[ChunkRef]
    lo: list[float]
    hi: list[float]
    duration: list[float]
    instances: list[tuple[int, ...]]
    first: list[int]  # first[r]: index of request r's first chunk; first[-1] = len(refs)


def flat_chunks(problem: Problem, cands: list[list[Candidate]], windows: list[Window]) -> Chunks:
    """lo: the start the chunk gets when its chain runs alone; hi: the window's cap less the
    chain's remaining duration (never below lo)."""
    out = Chunks([], [], [], [], [], [])
    for r, (per, win) in enumerate(zip(cands, windows, strict=True)):
        out.first.append(len(out.refs))
        for m, cand in enumerate(per):
            alone = alone_starts(cand, problem.now_s)
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


def disjunctive_pairs(num_instances: int, chunks: Chunks) -> list[int]:
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


def build_model(problem: Problem, cands: list[list[Candidate]], windows: list[Window],
           chunks: Chunks | None = None, pairs: list[int] | None = None,
           abort_at: float = math.inf) -> MilpModel | None:
    """The model; None if the clock passes `abort_at` (checked every 256 order binaries).
    `chunks` and `pairs` are computed here unless given (`solve_milp` has them already)."""
    if chunks is None:
        chunks = flat_chunks(problem, cands, windows)
    if pairs is None:
        pairs = disjunctive_pairs(problem.num_instances, chunks)
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
        alone = [alone_starts(cand, now) for cand in per]
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
    orders: dict[tuple[ChunkRef, ChunkRef], Any] = {}
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
                continue  # their windows cannot overlap (`disjunctive_pairs` leaves these out)
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
    return MilpModel(prob, xs, ss, ends, misses, orders, deadlines)


def warm_start(problem: Problem, built: MilpModel, cands: list[list[Candidate]],
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
    value: dict[ChunkRef, float] = {}
    for r, per in enumerate(cands):
        for m, cand in enumerate(per):
            times = starts[r] if m == 0 else alone_starts(cand, now)
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
