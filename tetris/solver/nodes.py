"""Node-aware planning: groups grow inside one node and cross nodes only when that pays.

Inside a node instances talk over NVLink; a group spanning nodes pays the network on every ring
step. So planners first plan a request inside one node (any cap up to `Layout.width`, the widest
node), and consider groups that may span nodes (`Layout.cross_levels`) only at the caps where
the cost model says such a group may pay (`worth_crossing`): its isolated one-chunk time over
the cross-node link, as an objective term from the earliest start any group could have, beats
the best same-node plan. Long prompts pass (their attention hides the network's transfers), and
so do requests whose node is busy while a few instances on other nodes are free; a short
prompt with a node to itself does not.

`NodeFree` holds each node's instances in the order they free up and keeps that order as plans
take instances, so a planner never re-sorts the whole cluster per request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tetris.solver.expansion import Shape
from tetris.solver.objective import request_cost
from tetris.solver.problem import PendingRequest, Problem

TIE_EPS = 1e-12


def cap_levels(limit: int) -> list[int]:
    """1, 2, 4, ... up to `limit`, and `limit` itself."""
    levels = []
    cap = 1
    while cap < limit:
        levels.append(cap)
        cap *= 2
    levels.append(limit)
    return levels


@dataclass(frozen=True)
class Layout:
    """The problem's nodes: `members[i]` are node i's prefill instances (i is a compact index,
    not the cluster's node number); `width` the most instances one node holds."""

    node_index: tuple[int, ...]  # compact node index of each prefill instance
    members: tuple[tuple[int, ...], ...]
    width: int
    same_levels: tuple[int, ...]  # SP caps a single node can hold
    cross_levels: tuple[int, ...]  # SP caps of groups that may span nodes (none on one node)

    @classmethod
    def of(cls, problem: Problem) -> Layout:
        compact: dict[int, int] = {}
        node_index = tuple(compact.setdefault(n, len(compact)) for n in problem.node_of)
        members: list[list[int]] = [[] for _ in compact]
        for g, i in enumerate(node_index):
            members[i].append(g)
        width = max(len(m) for m in members)
        limit = problem.sp_limit
        levels = cap_levels(limit)
        same = cap_levels(min(width, limit))
        # Crossing can pay below a node's width too: when every node is busy for a while but
        # a few instances on several nodes are free now.
        cross = tuple(c for c in levels if c > 1) if len(members) > 1 else ()
        return cls(node_index, tuple(tuple(m) for m in members), width, tuple(same), cross)


class NodeFree:
    """Running per-instance free times and, per node, its instances sorted by (free, id) —
    kept in step as plans take instances, so no planner re-sorts the cluster per request.

    `level_free[j][n]`: when node n has k = `layout.same_levels[j]` instances free (its k-th
    instance to free up; inf if it has fewer): min() over it is the soonest any node has k."""

    __slots__ = ("free_s", "layout", "level_free", "order", "times")

    def __init__(self, layout: Layout, free_s: list[float]) -> None:
        self.layout = layout
        self.free_s = free_s
        key = free_s.__getitem__  # members ascend, and the sort is stable: ties by id
        self.order = [sorted(m, key=key) for m in layout.members]
        self.times = [[free_s[g] for g in o] for o in self.order]
        self.level_free = [[t[k - 1] if k <= len(t) else math.inf for t in self.times]
                           for k in layout.same_levels]

    def occupy(self, shape: Shape) -> None:
        """Mark the shape's instances busy until its chunks end (free times only move later)."""
        free_s = self.free_s
        node_index = self.layout.node_index
        touched = set()
        for _, _, group, _, end in shape:
            for g in group:
                if end > free_s[g]:
                    free_s[g] = end
                    touched.add(node_index[g])
        key = free_s.__getitem__
        levels = self.layout.same_levels
        for n in touched:
            order = self.order[n] = sorted(self.layout.members[n], key=key)
            times = self.times[n] = [free_s[g] for g in order]
            size = len(times)
            for k, column in zip(levels, self.level_free, strict=True):
                if k > size:
                    break
                column[n] = times[k - 1]

    def by_free(self) -> list[int]:
        """All instances sorted by (free, id): for groups that may span nodes."""
        free_s = self.free_s
        return sorted(range(len(free_s)), key=free_s.__getitem__)

    def earliest_free_s(self) -> float:
        return min(self.level_free[0])


def isolated_cost(problem: Problem, request: PendingRequest, start_s: float, seconds: float,
                  sp: int) -> float:
    """The request's objective term for one chunk of `seconds` on `sp` instances from
    `start_s`."""
    return request_cost(problem, request, start_s + seconds, seconds * sp)


def single_chunk_seconds(problem: Problem, request: PendingRequest, levels: Sequence[int],
                         cross_node: bool) -> list[float]:
    """The rest of the request as one chunk at each SP level (inf where its KV does not fit)."""
    cm = problem.cost_model
    rest = request.prompt_tokens - request.prefilled_tokens
    prefix = request.prefilled_tokens
    held = len(request.kv_instances)
    load = -(-prefix // held) if held else 0
    out = []
    for sp in levels:
        fits = sp >= held and load + -(-rest // sp) <= cm.kv_capacity_tokens
        out.append(cm.chunk_seconds(rest, prefix, sp, cross_node) if fits else float("inf"))
    return out


def worth_crossing(problem: Problem, request: PendingRequest, layout: Layout, start_s: float,
                   bar: float, cross_seconds: Sequence[float] | None = None) -> list[int]:
    """The cross-node SP levels that may pay for this request: those whose isolated one-chunk
    term from `start_s` (the earliest the group could start) is below `bar`, the best term a
    same-node group gets. A screen on the cost model, not a proof (a Tetris shape starts on
    fewer instances and grows, rarely faster than one chunk on all of them from the start):
    the levels it names are then planned for real, and the better term wins."""
    if not layout.cross_levels:
        return []
    if cross_seconds is None:
        cross_seconds = single_chunk_seconds(problem, request, layout.cross_levels, True)
    return [sp for sp, seconds in zip(layout.cross_levels, cross_seconds, strict=True)
            if isolated_cost(problem, request, start_s, seconds, sp) < bar - TIE_EPS]

