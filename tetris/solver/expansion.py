"""One request's Tetris shape: start on what is free, grow the SP group as instances free up.

At time t the group is G ∪ {instances free by t} (at most `cap`). The chunk is cut so that it ends
when the next instance frees up: at the block boundary nearest to the token count that fits
exactly before that breakpoint (`rounding` "down" never overruns it, "up" always does), and the
next chunk starts there on the grown group. Rounding to the nearest boundary trades a group idling
until the breakpoint against new instances waiting for the chunk, whichever is shorter. Groups
only grow, so earlier chunks' KV stays inside them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from tetris.solver.plan import ChunkPlan, RequestPlan
from tetris.solver.problem import PendingRequest, Problem

EPS_S = 1e-12
Rounding = Literal["nearest", "down", "up"]


# (start_token, end_token, instances, start_s, end_s): plain tuples while shapes are compared.
Shape = list[tuple[int, int, tuple[int, ...], float, float]]


def expand_plan(
    problem: Problem, request: PendingRequest, free_s: Sequence[float], cap: int,
    **options: Any,
) -> RequestPlan:
    """The plan against per-instance free times `free_s` (each already ≥ now); `options` are
    `expand_shape`'s (rounding, max_chunks, by_free, cuts)."""
    return to_plan(request, expand_shape(problem, request, free_s, cap, **options))


def to_plan(request: PendingRequest, shape: Shape) -> RequestPlan:
    return RequestPlan(request.request_id, tuple(ChunkPlan(*chunk) for chunk in shape))


def expand_shape(
    problem: Problem,
    request: PendingRequest,
    free_s: Sequence[float],
    cap: int,
    *,
    rounding: Rounding = "nearest",
    max_chunks: int | None = None,
    by_free: Sequence[int] | None = None,
    cuts: Sequence[float] = (),
) -> Shape:
    """The Tetris shape as plain tuples (the greedy compares many before building one plan).

    `by_free` (instances sorted by free time) may be passed in when planning several caps
    against the same free times, to sort once; only its instances (and the request's KV
    group) may join, so a node's own list keeps the shape inside that node. `cuts` are extra
    times at which to end a chunk without growing the group (e.g. other requests' arrivals),
    so an exact planner can fit those requests in between. Empty when the request's KV cannot
    fit under this cap (see `_kv_room`)."""
    cm = problem.cost_model
    chunk_seconds = cm.chunk_seconds
    node_of = problem.node_of
    block = problem.block_tokens
    limit = max_chunks if max_chunks is not None else problem.max_chunks
    total = request.prompt_tokens
    prefix = request.prefilled_tokens
    group = list(request.kv_instances)
    if len(group) > problem.sp_limit:
        return []  # its KV already spans more instances than any chunk may use
    nodes = {node_of[g] for g in group}
    cap = max(cap, len(group), 1)
    if by_free is None:
        by_free = sorted(range(len(free_s)), key=lambda g: (free_s[g], g))
    # Instances not in the group and not yet free at `start`, in the order they free up.
    kv_set = set(group)
    waiting = [g for g in by_free if g not in kv_set] if kv_set else by_free
    capacity = cm.kv_capacity_tokens
    # The widest group these instances allow (a lost one never joins).
    lost = problem.unreachable
    reach = min(cap, len(group) + len(waiting) - (len(lost.intersection(waiting)) if lost else 0))
    # KV tokens of this request on the group's first member, the most loaded one: every chunk
    # spreads its tokens evenly over its group and every group contains the first member.
    top_load = -(-prefix // len(group)) if group else 0
    start = max(problem.now_s, request.earliest_start_s)
    if group:
        start = max(start, *(free_s[g] for g in group))
    elif waiting:
        start = max(start, free_s[waiting[0]])
    num_waiting = len(waiting)
    if (not group and not cuts and num_waiting >= cap
            and free_s[waiting[cap - 1]] <= start + EPS_S and total - prefix <= capacity * cap):
        # The common case, exactly what the loop below would do: `cap` instances are free at
        # the start, so the group is full at once, nothing can join later, and the whole rest
        # is one chunk on the first `cap` of them.
        members = tuple(waiting[:cap])
        cross = len({node_of[g] for g in members}) > 1
        end_s = start + chunk_seconds(total - prefix, prefix, cap, cross)
        return [(prefix, total, members, start, end_s)]
    pool: list[int] = []  # free by `start` but not in the group
    nxt = 0
    chunks: Shape = []
    while prefix < total:
        if len(group) < cap:
            while nxt < num_waiting and free_s[waiting[nxt]] <= start + EPS_S:
                pool.append(waiting[nxt])
                nxt += 1
            if pool:
                if len(pool) > cap - len(group) and nodes:
                    # Same-node instances first: a group spanning nodes pays the slower link.
                    pool.sort(key=lambda g: (node_of[g] not in nodes, free_s[g], g))
                take = cap - len(group)
                joining = pool[:take]
                del pool[:take]
                for g in joining:
                    group.append(g)
                    nodes.add(node_of[g])
        grow_s = free_s[waiting[nxt]] if len(group) < cap and nxt < num_waiting else None
        breakpoint_s = grow_s
        if cuts:
            cut = next((c for c in cuts if c > start + EPS_S), None)
            if cut is not None and (breakpoint_s is None or cut < breakpoint_s):
                breakpoint_s = cut
        sp = len(group)
        cross = len(nodes) > 1
        forced_last = limit is not None and len(chunks) == limit - 1
        if breakpoint_s is None or forced_last:
            end_token = total
        else:
            fit = cm.max_tokens_within(breakpoint_s - start, prefix, sp, cross)
            end_token = (prefix + fit) // block * block
            partial = (prefix + fit) - end_token
            if rounding == "up" or (rounding == "nearest" and 2 * partial >= block):
                end_token += block
            end_token = min(end_token, total)
            if end_token <= prefix:
                # Not even one block fits before more instances free up: wait for them.
                start = breakpoint_s
                continue
        if not _fits(top_load, end_token - prefix, total - end_token, sp, reach, capacity):
            room = _kv_room(top_load, total - prefix, sp, reach, capacity)
            mem_end = (prefix + room) // block * block if prefix + room < total else total
            # Ceilings make the reserve rule non-monotone in c: re-check after rounding.
            while mem_end > prefix and not _fits(top_load, mem_end - prefix, total - mem_end,
                                                 sp, reach, capacity):
                mem_end = (mem_end - 1) // block * block
            if (forced_last and mem_end < total) or mem_end <= prefix:
                if grow_s is None:
                    return []  # the rest cannot fit even on the widest group this cap allows
                start = grow_s  # wait for more instances to spread the KV over
                continue
            end_token = min(end_token, mem_end)
        end_s = start + chunk_seconds(end_token - prefix, prefix, sp, cross)
        top_load += -(-(end_token - prefix) // sp)
        chunks.append((prefix, end_token, tuple(group), start, end_s))
        prefix = end_token
        start = end_s
    return chunks


def _fits(load: int, c: int, rest_after: int, sp: int, reach: int, capacity: int) -> bool:
    return load + -(-c // sp) + -(-rest_after // reach) <= capacity


def _kv_room(load: int, rest: int, sp: int, reach: int, capacity: int) -> int:
    """Most tokens the next chunk (on `sp` instances) may take so that the most loaded member
    still has room for an even share of what is left over the widest group, `reach` instances:
        load + ⌈c/sp⌉ + ⌈(rest − c)/reach⌉ ≤ capacity.
    Keeping that reserve means a plan exists whenever the rest fits at all; without it early,
    narrow chunks could fill the first members and strand the request."""
    if load + -(-rest // sp) <= capacity:
        return rest
    if sp >= reach:
        return max(0, (capacity - load) * sp)
    slack = capacity - load - rest / reach
    c = int(slack / (1 / sp - 1 / reach)) if slack > 0 else 0
    c = min(c, rest)
    while c > 0 and not _fits(load, c, rest - c, sp, reach, capacity):
        c -= 1
    return c


def occupy(free_s: list[float], plan: RequestPlan) -> None:
    """Mark the plan's instances busy until its chunks end (free times only move later)."""
    for chunk in plan.chunks:
        for g in chunk.instances:
            if chunk.end_s > free_s[g]:
                free_s[g] = chunk.end_s
