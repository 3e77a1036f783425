"""Alternative plans per request — the "modes" that the exact planners (CP-SAT, MILP) choose from.

A candidate fixes a request's chunk boundaries and instance groups, hence every chunk's duration;
the exact planners then pick one candidate per request and place its chunks in time. Candidates
are built against the decision's base availability: the Tetris shape under each SP cap (block
boundaries rounded to nearest, down and up), the Tetris shape also cut where other requests
arrive (so they can be fitted in between), one chunk at each SP cap, and the greedy planner's own
plan (built against what the requests before it took), which is always candidate 0 so it can be
the hint. Like the greedy (`nodes`), caps up to a node's width stay inside one node, and
cross-node candidates are built only at the caps where the cost model says crossing may pay.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tetris.solver.expansion import expand_plan
from tetris.solver.greedy import SPANS_NODES, GreedyPlanner
from tetris.solver.nodes import NodeFree, cap_levels, worth_crossing
from tetris.solver.objective import request_cost
from tetris.solver.plan import RequestPlan
from tetris.solver.problem import Problem

DEFAULT_MAX_CANDIDATES = 16


@dataclass(frozen=True, slots=True)
class CandidateChunk:
    start_token: int
    end_token: int
    instances: tuple[int, ...]
    duration_s: float
    release_s: float  # earliest start: now, the request's readiness, its instances' availability


@dataclass(frozen=True, slots=True)
class Candidate:
    request_index: int
    chunks: tuple[CandidateChunk, ...]
    gpu_seconds: float
    label: str


def candidate_from_plan(problem: Problem, index: int, plan: RequestPlan, label: str) -> Candidate:
    request = problem.requests[index]
    ready = max(problem.now_s, request.earliest_start_s)
    chunks = tuple(
        CandidateChunk(
            c.start_token,
            c.end_token,
            c.instances,
            c.end_s - c.start_s,
            max(ready, *(problem.free_at(g) for g in c.instances)),
        )
        for c in plan.chunks
    )
    gpu_seconds = sum(c.duration_s * len(c.instances) for c in chunks)
    return Candidate(index, chunks, gpu_seconds, label)


def _variants(
    problem: Problem, index: int, greedy: RequestPlan, planner: GreedyPlanner, state: NodeFree,
) -> Iterator[tuple[str, RequestPlan]]:
    """A request's candidate plans, most useful first (built lazily: callers stop early)."""
    request = problem.requests[index]
    layout = planner.layout
    info = planner.info(request)
    free = state.free_s
    yield "greedy", greedy
    node: int | None = None
    alt: int | None = None
    members: Sequence[int] = range(problem.num_instances)
    if info.kv_node == SPANS_NODES:
        # Its KV already spans nodes: every group does, so plan over the whole cluster.
        caps, by_free = cap_levels(problem.sp_limit), state.by_free()
    else:
        node = info.kv_node if info.kv_node is not None else planner.pick_node(info, state)
        # Another node for the rotated variants, so that identical requests are not all
        # offered the same node.
        alt = node if info.kv_node is not None else planner.pick_node(
            info, state, index % len(layout.members))
        caps, members, by_free = list(layout.same_levels), layout.members[node], state.order[node]
    best_same = math.inf
    for cap in caps:
        plan = expand_plan(problem, request, free, cap, by_free=by_free)
        if plan.chunks:
            best_same = min(best_same, request_cost(problem, request, plan.prefill_end_s,
                                                    plan.gpu_seconds))
        yield f"expand-{cap}", plan
        yield f"single-{cap}", expand_plan(problem, request, free, cap, max_chunks=1,
                                           by_free=by_free)
    if node is not None and layout.cross_levels:
        # Cross-node groups only where the cost model says they may pay (the greedy's test).
        ready = max(problem.now_s, request.earliest_start_s)
        start = max(ready, state.earliest_free_s())
        cross = (list(layout.cross_levels) if best_same == math.inf
                 else worth_crossing(problem, request, layout, start, best_same))
        everyone = state.by_free()
        for cap in cross:
            yield f"expand-x-{cap}", expand_plan(problem, request, free, cap, by_free=everyone)
            yield f"single-x-{cap}", expand_plan(problem, request, free, cap, max_chunks=1,
                                                 by_free=everyone)
    n = problem.num_instances
    rot_members = members if alt is None else layout.members[alt]
    for cap in caps[:-1]:
        offset = index * cap % n
        rotated = sorted(rot_members, key=lambda g: (free[g], (g - offset) % n))
        yield f"expand-rot-{cap}", expand_plan(problem, request, free, cap, by_free=rotated)
        yield f"single-rot-{cap}", expand_plan(problem, request, free, cap, max_chunks=1,
                                               by_free=rotated)
    ready = max(problem.now_s, request.earliest_start_s)
    cuts = sorted({r.earliest_start_s for r in problem.requests if r.earliest_start_s > ready})
    if cuts:
        for cap in caps:
            yield f"expand-cut-{cap}", expand_plan(problem, request, free, cap,
                                                   by_free=by_free, cuts=cuts)
    for rounding in ("down", "up"):
        for cap in caps:
            yield f"expand-{rounding}-{cap}", expand_plan(problem, request, free, cap,
                                                          rounding=rounding, by_free=by_free)


def generate_candidates(
    problem: Problem, greedy: Sequence[RequestPlan],
    max_per_request: int = DEFAULT_MAX_CANDIDATES,
) -> list[list[Candidate]]:
    """Per request (problem order): up to `max_per_request` distinct candidates, the greedy plan
    first, then in order of usefulness: the Tetris shape and one chunk at each SP cap inside
    the request's node (`GreedyPlanner.pick_node`; the node of its KV if it has some); the same
    at the cross-node caps that may pay (`nodes.worth_crossing`, as the greedy decides); the
    same-node shapes on another node and other instances (ties in free time broken from a
    per-request offset, so identical requests can be placed side by side — otherwise every
    request's capped candidates crowd onto the lowest-numbered free instances); cut at other
    requests' arrivals; block boundaries rounded down and up. On one node this is every SP
    cap over the whole cluster."""
    planner = GreedyPlanner(problem)
    state = planner.state()
    out = []
    for index in range(len(problem.requests)):
        seen: set[tuple[tuple[int, tuple[int, ...]], ...]] = set()
        cands = []
        for label, plan in _variants(problem, index, greedy[index], planner, state):
            key = tuple((c.end_token, c.instances) for c in plan.chunks)
            if not key or key in seen:  # empty: its KV does not fit under that cap
                continue
            seen.add(key)
            cands.append(candidate_from_plan(problem, index, plan, label))
            if len(cands) == max_per_request:
                break
        out.append(cands)
    return out
