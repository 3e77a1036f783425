"""The greedy planner: the decision path (microseconds to a few milliseconds).

Requests are planned one after another against running per-instance free times. Each gets the
Tetris shape (`expansion.expand_plan`) under the SP cap — among powers of two up to `max_sp` —
that minimises its own term of the objective; λ in that term is what caps SP under load. The
whole pass is repeated for a few request orders (earliest deadline, shortest work, arrival) and
the order with the lowest total objective wins.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from tetris.solver.expansion import Shape, expand_shape, occupy, to_plan
from tetris.solver.objective import request_cost
from tetris.solver.plan import RequestPlan, SolveResult, SolveStatus
from tetris.solver.problem import PendingRequest, Problem

OrderKey = Callable[[PendingRequest], tuple[float, ...]]


def cap_levels(limit: int) -> list[int]:
    """1, 2, 4, ... up to `limit`, and `limit` itself."""
    levels = []
    cap = 1
    while cap < limit:
        levels.append(cap)
        cap *= 2
    levels.append(limit)
    return levels


def request_orders(problem: Problem) -> dict[str, OrderKey]:
    cm = problem.cost_model

    def work(r: PendingRequest) -> float:
        return cm.chunk_seconds(r.prompt_tokens - r.prefilled_tokens, r.prefilled_tokens, 1)

    return {
        "edf": lambda r: (r.deadline_s, r.prompt_tokens, r.arrival_s),
        "spt": lambda r: (work(r), r.deadline_s, r.arrival_s),
        "fcfs": lambda r: (r.arrival_s, r.deadline_s, r.prompt_tokens),
    }


def best_cap_plan(
    problem: Problem, request: PendingRequest, free_s: list[float], caps: list[int]
) -> tuple[RequestPlan, float] | None:
    """The request's own best plan over the SP caps, given what others already hold, and its
    term of the objective; None if its KV fits under no cap."""
    best: Shape = []
    best_key = (0.0, 0.0)
    by_free = sorted(range(len(free_s)), key=lambda g: (free_s[g], g))
    for cap in caps:
        shape = expand_shape(problem, request, free_s, cap, by_free=by_free)
        if not shape:
            continue  # too narrow for its KV
        gpu_seconds = sum((end - start) * len(group) for _, _, group, start, end in shape)
        key = (request_cost(problem, request, shape[-1][4], gpu_seconds), gpu_seconds)
        if not best or key < best_key:
            best, best_key = shape, key
        if len(shape[-1][2]) < cap:
            break  # the cap never bound (groups only grow): larger caps give this same plan
    if not best:
        # The reserve rule is a heuristic under block rounding; one chunk on the widest group,
        # once it is free, holds the KV whenever anything can.
        best = expand_shape(problem, request, free_s, caps[-1], max_chunks=1, by_free=by_free)
        if not best:
            return None
        gpu_seconds = sum((end - start) * len(group) for _, _, group, start, end in best)
        best_key = (request_cost(problem, request, best[-1][4], gpu_seconds), gpu_seconds)
    return to_plan(request, best), best_key[0]


def plan_in_order(
    problem: Problem, order: list[PendingRequest], cutoff: float = math.inf
) -> tuple[list[RequestPlan], float] | PendingRequest | None:
    """Plans in `order` and their objective; the first request whose KV fits nowhere; or None
    once the objective so far exceeds `cutoff` (every term is ≥ 0, so this order has lost)."""
    free_s = [problem.free_at(g) for g in range(problem.num_instances)]
    caps = cap_levels(problem.sp_limit)
    plans = []
    total = 0.0
    for request in order:
        found = best_cap_plan(problem, request, free_s, caps)
        if found is None:
            return request
        plan, cost = found
        total += cost
        if total > cutoff:
            return None
        occupy(free_s, plan)
        plans.append(plan)
    return plans, total


def greedy_plans(problem: Problem) -> tuple[list[RequestPlan], float, str] | PendingRequest:
    """Best plans over the request orders: (plans in problem order, objective, order name), or
    a request whose KV fits nowhere."""
    best: tuple[list[RequestPlan], float, str] | None = None
    tried: set[tuple[str, ...]] = set()
    for name, key in request_orders(problem).items():
        order = sorted(problem.requests, key=key)
        ids = tuple(r.request_id for r in order)
        if ids in tried:
            continue  # orders often coincide (e.g. EDF and SPT when SLOs scale with length)
        tried.add(ids)
        found = plan_in_order(problem, order, math.inf if best is None else best[1] - 1e-12)
        if isinstance(found, PendingRequest):
            return found  # KV fit does not depend on the order (the one-chunk fallback)
        if found is None:
            continue  # pruned: worse than the best order so far
        plans, objective = found
        if best is None or objective < best[1] - 1e-12:
            best = (plans, objective, name)
    assert best is not None
    plans, objective, name = best
    plans.sort(key=lambda p: problem.index_of[p.request_id])
    return plans, objective, name


def solve_greedy(problem: Problem, time_limit_ms: float | None = None) -> SolveResult:
    del time_limit_ms  # greedy always finishes in milliseconds
    started = time.perf_counter()
    if not problem.requests:
        return SolveResult("greedy", SolveStatus.OPTIMAL, 0.0, 0.0, 0.0)
    found = greedy_plans(problem)
    wall_ms = (time.perf_counter() - started) * 1e3
    if isinstance(found, PendingRequest):
        rest = found.prompt_tokens - found.prefilled_tokens
        if len(found.kv_instances) > problem.sp_limit:
            why = (f"request {found.request_id!r}: its KV already spans "
                   f"{len(found.kv_instances)} instances, more than max_sp {problem.sp_limit}")
        else:
            why = (f"request {found.request_id!r}: KV of {rest} more tokens fits on no group "
                   f"of at most {problem.sp_limit} instances "
                   f"({problem.cost_model.kv_capacity_tokens} tokens each)")
        return SolveResult("greedy", SolveStatus.INFEASIBLE, None, None, wall_ms,
                           stats={"infeasible": why})
    plans, objective, order = found
    return SolveResult(
        "greedy", SolveStatus.FEASIBLE, objective, None, wall_ms, tuple(plans), {"order": order}
    )
