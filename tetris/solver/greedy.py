"""The greedy planner: the decision path (microseconds to a few milliseconds).

Requests are planned one after another against running per-instance free times. Each gets the
Tetris shape (`expansion.expand_shape`) under the SP cap — among powers of two up to `max_sp` —
that minimises its own term of the objective; λ in that term is what caps SP under load.

Node-aware (`nodes`): first the caps up to a node's width inside one node — the node where the
request would finish cheapest as one chunk (`GreedyPlanner.pick_node`), or the node of its KV;
then groups that may span nodes, only at the caps where the cost model says crossing may pay
(`nodes.worth_crossing`), and the better term wins. Most requests thus look at one node's few
instances, not the whole cluster, which with per-node orders kept as plans take instances
(`nodes.NodeFree`) keeps planning fast at 100+ instances. On a single node this is the
cluster-wide plan, unchanged.

The whole pass is repeated for a few request orders (earliest deadline, shortest work, arrival)
and the order with the lowest total objective wins; an order is abandoned once what it has
spent plus a lower bound on the rest (`_RequestInfo.floor`) exceeds the best order so far.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Sequence

from tetris.solver.expansion import EPS_S, Shape, expand_shape, to_plan
from tetris.solver.nodes import (
    TIE_EPS,
    Layout,
    NodeFree,
    cap_levels,
    single_chunk_seconds,
    worth_crossing,
)
from tetris.solver.objective import MISS_EPS_S, request_cost
from tetris.solver.plan import RequestPlan, SolveResult, SolveStatus
from tetris.solver.problem import PendingRequest, Problem

__all__ = ["GreedyPlanner", "best_cap_plan", "cap_levels", "greedy_plans", "solve_greedy"]

OrderKey = Callable[[PendingRequest], tuple[float, ...]]
SPANS_NODES = -1  # `_RequestInfo.kv_node` of a request whose KV already spans nodes


def request_orders(problem: Problem) -> dict[str, OrderKey]:
    cm = problem.cost_model

    def work(r: PendingRequest) -> float:
        return cm.chunk_seconds(r.prompt_tokens - r.prefilled_tokens, r.prefilled_tokens, 1)

    return {
        "edf": lambda r: (r.deadline_s, r.prompt_tokens, r.arrival_s),
        "spt": lambda r: (work(r), r.deadline_s, r.arrival_s),
        "fcfs": lambda r: (r.arrival_s, r.deadline_s, r.prompt_tokens),
    }


class _RequestInfo:
    """What the greedy needs of one request, independent of the order it is planned in."""

    __slots__ = ("cross_offset", "cross_seconds", "floor", "kv_node", "ready_s",
                 "same_seconds", "score", "slope", "width_seconds")

    def __init__(self, problem: Problem, layout: Layout, r: PendingRequest) -> None:
        self.ready_s = max(problem.now_s, r.earliest_start_s)
        nodes = {layout.node_index[g] for g in r.kv_instances}
        self.kv_node = None if not nodes else nodes.pop() if len(nodes) == 1 else SPANS_NODES
        # Node choice (`GreedyPlanner.pick_node`): one chunk at same-node level k from `start`
        # costs slope·start + offset_k, plus the miss penalty once start > due_k.
        self.slope = slope = r.weight / r.ttft_slo_s
        lam = problem.gpu_cost_weight
        penalty = r.weight * problem.miss_penalty
        self.same_seconds = single_chunk_seconds(problem, r, layout.same_levels, False)
        self.score = []
        for j, (k, t) in enumerate(zip(layout.same_levels, self.same_seconds, strict=True)):
            if math.isfinite(t):
                due = r.arrival_s + r.ttft_slo_s + MISS_EPS_S - t
                self.score.append((j, slope * (t - r.arrival_s + lam * k * t), due, penalty))
        self.cross_seconds: list[float] | None = None  # filled in by `cross_screen`
        self.cross_offset = math.inf
        self.width_seconds: dict[int, float] = {}  # one chunk of the rest on one node, by SP
        # A lower bound on the request's term under any plan, assuming (as every cost model
        # here satisfies) that s instances are at most s times faster than one and use at least
        # as many GPU-seconds, and that cutting a chunk never saves one instance time.
        one = problem.cost_model.chunk_seconds(r.prompt_tokens - r.prefilled_tokens,
                                               r.prefilled_tokens, 1)
        end = self.ready_s + one / problem.sp_limit
        self.floor = request_cost(problem, r, end, one)

    def cross_screen(self, problem: Problem, layout: Layout, r: PendingRequest) -> float:
        """Least start-independent part (the term less slope·start and any miss penalty) of
        one chunk at any cross-node level: no cross level can pay unless slope·start plus
        this is below the same-node bar."""
        if self.cross_seconds is None:
            self.cross_seconds = single_chunk_seconds(problem, r, layout.cross_levels, True)
            lam = problem.gpu_cost_weight
            self.cross_offset = min(
                (self.slope * (t - r.arrival_s + lam * k * t)
                 for k, t in zip(layout.cross_levels, self.cross_seconds, strict=True)),
                default=math.inf)
        return self.cross_offset

    def one_chunk_seconds(self, problem: Problem, r: PendingRequest, sp: int) -> float:
        found = self.width_seconds.get(sp)
        if found is None:
            found = self.width_seconds[sp] = problem.cost_model.chunk_seconds(
                r.prompt_tokens - r.prefilled_tokens, r.prefilled_tokens, sp)
        return found


class GreedyPlanner:
    """Per-problem constants and per-request tables, shared by every request order."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.layout = Layout.of(problem)
        self._info: dict[str, _RequestInfo] = {}

    def info(self, request: PendingRequest) -> _RequestInfo:
        found = self._info.get(request.request_id)
        if found is None:
            found = self._info[request.request_id] = _RequestInfo(self.problem, self.layout,
                                                                  request)
        return found

    def state(self, free_s: list[float] | None = None) -> NodeFree:
        p = self.problem
        if free_s is None:
            free_s = [p.free_at(g) for g in range(p.num_instances)]
        return NodeFree(self.layout, free_s)

    def plan(self, request: PendingRequest, state: NodeFree,
             info: _RequestInfo | None = None) -> tuple[Shape, float] | None:
        """The request's own best plan (as a shape) given what others already hold, and its
        term of the objective; None if its KV fits nowhere."""
        p, layout = self.problem, self.layout
        if info is None:
            info = self.info(request)
        best: list[tuple[float, float, Shape]] = []
        if info.kv_node == SPANS_NODES:
            self._try_caps(request, state, state.by_free(), cap_levels(p.sp_limit), best)
        else:
            node = info.kv_node if info.kv_node is not None else self.pick_node(info, state)
            self._try_node(request, info, state, node, best)
            if layout.cross_levels:
                self._try_crossing(request, info, state, best)
        if not best:
            # The reserve rule is a heuristic under block rounding; one chunk on the widest
            # group, once it is free, holds the KV whenever anything can.
            shape = expand_shape(p, request, state.free_s, p.sp_limit, max_chunks=1,
                                 by_free=state.by_free())
            if not shape:
                return None
            self._keep(request, shape, best)
        return best[0][2], best[0][0]

    def pick_node(self, info: _RequestInfo, state: NodeFree, from_node: int = 0) -> int:
        """The node where the request finishes cheapest as one chunk started once enough of
        the node's instances are free — a proxy for its Tetris shape there, which starts on
        fewer and grows. Ties go to the first node from `from_node` on, cyclically (first fit:
        it packs requests onto the first nodes and leaves the last ones whole for wide
        requests; on the bench it beat best fit, the node with the fewest instances free, by
        1% of the objective)."""
        free_s, ready, slope = state.free_s, info.ready_s, info.slope
        if not info.score:
            # No single chunk inside a node holds its KV: the widest node, whole soonest.
            return min(range(len(state.order)), key=lambda n: (
                -len(state.order[n]), free_s[state.order[n][-1]], n))
        best = math.inf
        picks: list[tuple[int, float]] = []  # (level index, start) scoring best
        for j, offset, due, penalty in info.score:
            start = min(state.level_free[j])
            if start == math.inf:
                continue  # no node is that wide
            if start < ready:
                start = ready
            cost = slope * start + offset + (penalty if start > due else 0.0)
            if cost < best - TIE_EPS:
                best, picks = cost, [(j, start)]
            elif cost <= best + TIE_EPS:
                picks.append((j, start))
        count = len(state.order)
        first = count  # cyclic distance from `from_node` of the first tying node
        for j, start in picks:
            limit = start + EPS_S
            column = state.level_free[j]
            for d in range(first):
                if column[(from_node + d) % count] <= limit:
                    first = d
                    break
        return (from_node + first) % count

    def _try_node(self, request: PendingRequest, info: _RequestInfo, state: NodeFree, node: int,
                  best: list[tuple[float, float, Shape]]) -> None:
        """`_try_caps` over the same-node levels on `node`, with `expand_shape`'s two common
        cases inlined (same results, without building its state): `cap` instances free at the
        start make one chunk; fewer, which finish the rest before the next one frees up, make
        one chunk on them for this and every larger cap."""
        order, times = state.order[node], state.times[node]
        levels = self.layout.same_levels
        if request.kv_instances:
            self._try_caps(request, state, order, levels, best)
            return
        p = self.problem
        prefix, total = request.prefilled_tokens, request.prompt_tokens
        start = max(info.ready_s, times[0])
        free = bisect.bisect_right(times, start + EPS_S)  # instances free by the start
        for cap, seconds in zip(levels, info.same_seconds, strict=True):
            if cap <= free:
                if seconds == math.inf:
                    continue  # the rest's KV does not fit on `cap` instances
                sp = cap
            elif self._one_chunk_until(request, free, times, start):
                sp = free
                seconds = info.one_chunk_seconds(p, request, sp)
            else:
                shape = expand_shape(p, request, state.free_s, cap, by_free=order)
                if shape:
                    self._keep(request, shape, best)
                    if len(shape[-1][2]) < cap:
                        break  # the cap never bound: larger caps give this same plan
                if cap >= len(order):
                    break
                continue
            end = start + seconds
            gpu_seconds = (end - start) * sp
            cost = request_cost(p, request, end, gpu_seconds)
            if not best or (cost, gpu_seconds) < best[0][:2]:
                best[:] = [(cost, gpu_seconds,
                            [(prefix, total, tuple(order[:sp]), start, end)])]
            if sp < cap or cap >= len(order):
                break  # the group holds all it can take by the time the rest is done

    def _one_chunk_until(self, request: PendingRequest, sp: int, times: list[float],
                         start: float) -> bool:
        """Whether `expand_shape` makes the rest one chunk on the `sp` instances free at
        `start`: none other frees up before it would cut the chunk (block rounding to
        nearest), and the rest's KV fits on them."""
        p = self.problem
        prefix, total = request.prefilled_tokens, request.prompt_tokens
        if -(-(total - prefix) // sp) > p.cost_model.kv_capacity_tokens:
            return False  # the KV reserve rule applies: leave it to `expand_shape`
        if sp == len(times) or p.max_chunks == 1:
            return True  # nothing left to grow onto, or no second chunk allowed
        # It cuts at the block boundary nearest to prefix + max_tokens_within(...): before
        # `total` unless that reaches total's block less half a block.
        block = p.block_tokens
        need = block * -(-total // block) - block // 2 - prefix
        if need <= 0:
            return True
        return p.cost_model.chunk_seconds(need, prefix, sp) <= times[sp] - start

    def _try_crossing(self, request: PendingRequest, info: _RequestInfo, state: NodeFree,
                      best: list[tuple[float, float, Shape]]) -> None:
        p, layout = self.problem, self.layout
        if not best:
            levels = list(layout.cross_levels)  # nothing fits inside one node: must cross
        else:
            bar = best[0][0]
            start = max(info.ready_s, state.earliest_free_s())
            screen = info.slope * start + info.cross_screen(p, layout, request)
            if screen > bar + 1e-9 * max(1.0, abs(bar)):
                return  # not even the cheapest cross level could pay
            levels = worth_crossing(p, request, layout, start, bar, info.cross_seconds)
        if levels:
            self._try_caps(request, state, state.by_free(), levels, best)

    def _try_caps(self, request: PendingRequest, state: NodeFree, by_free: Sequence[int],
                  caps: Sequence[int], best: list[tuple[float, float, Shape]]) -> None:
        for cap in caps:
            shape = expand_shape(self.problem, request, state.free_s, cap, by_free=by_free)
            if not shape:
                continue  # too narrow for its KV
            self._keep(request, shape, best)
            if len(shape[-1][2]) < cap or cap >= len(by_free):
                # The cap never bound or the group holds every instance it may take (groups
                # only grow): larger caps give this same plan.
                break

    def _keep(self, request: PendingRequest, shape: Shape,
              best: list[tuple[float, float, Shape]]) -> None:
        gpu_seconds = sum((end - start) * len(group) for _, _, group, start, end in shape)
        cost = request_cost(self.problem, request, shape[-1][4], gpu_seconds)
        if not best or (cost, gpu_seconds) < best[0][:2]:
            best[:] = [(cost, gpu_seconds, shape)]

    def plan_in_order(
        self, order: Sequence[PendingRequest], cutoff: float = math.inf
    ) -> tuple[list[Shape], float] | PendingRequest | None:
        """Shapes in `order` and their objective; the first request whose KV fits nowhere; or
        None once the objective so far plus the rest's lower bounds exceeds `cutoff` (this
        order has lost). Shapes, not plans: only the winning order's become plans."""
        state = self.state()
        infos = [self.info(r) for r in order]
        left = sum(i.floor for i in infos) if math.isfinite(cutoff) else 0.0
        shapes = []
        total = 0.0
        for request, info in zip(order, infos, strict=True):
            found = self.plan(request, state, info)
            if found is None:
                return request
            shape, cost = found
            total += cost
            left -= info.floor
            if total + max(0.0, left) > cutoff:
                return None
            state.occupy(shape)
            shapes.append(shape)
        return shapes, total


def best_cap_plan(
    problem: Problem, request: PendingRequest, free_s: list[float]
) -> tuple[RequestPlan, float] | None:
    """Greedy's plan for one request against per-instance free times `free_s` (each ≥ now)
    and its term of the objective; None if its KV fits nowhere."""
    planner = GreedyPlanner(problem)
    found = planner.plan(request, planner.state(list(free_s)))
    return None if found is None else (to_plan(request, found[0]), found[1])


def plan_in_order(
    problem: Problem, order: list[PendingRequest], cutoff: float = math.inf
) -> tuple[list[RequestPlan], float] | PendingRequest | None:
    """`GreedyPlanner.plan_in_order` on a planner of its own, as plans."""
    found = GreedyPlanner(problem).plan_in_order(order, cutoff)
    if found is None or isinstance(found, PendingRequest):
        return found
    shapes, total = found
    return [to_plan(r, shape) for r, shape in zip(order, shapes, strict=True)], total


def greedy_plans(problem: Problem) -> tuple[list[RequestPlan], float, str] | PendingRequest:
    """Best plans over the request orders: (plans in problem order, objective, order name), or
    a request whose KV fits nowhere."""
    planner = GreedyPlanner(problem)
    best: tuple[list[PendingRequest], list[Shape], float, str] | None = None
    tried: set[tuple[str, ...]] = set()
    for name, key in request_orders(problem).items():
        order = sorted(problem.requests, key=key)
        ids = tuple(r.request_id for r in order)
        if ids in tried:
            continue  # orders often coincide (e.g. EDF and SPT when SLOs scale with length)
        tried.add(ids)
        found = planner.plan_in_order(order, math.inf if best is None else best[2] - 1e-12)
        if isinstance(found, PendingRequest):
            return found  # KV fit does not depend on the order (the one-chunk fallback)
        if found is None:
            continue  # pruned: worse than the best order so far
        shapes, objective = found
        if best is None or objective < best[2] - 1e-12:
            best = (order, shapes, objective, name)
    assert best is not None
    order, shapes, objective, name = best
    plans = [to_plan(r, shape) for r, shape in zip(order, shapes, strict=True)]
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
