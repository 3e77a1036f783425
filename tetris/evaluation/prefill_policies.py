"""Prefill policies of the disaggregated simulator: what to launch at a decision instant.

A policy sees a `PrefillView` (the planner's snapshot: instance availability, pending requests
with their progress, recent load) and returns a `Decision`: the chunks to start now and how long
the decision itself took. The simulator starts those chunks only after that time has passed, so
a slow planner pays for its thinking.

Every policy turns its choice into `RequestPlan`s and puts them through the independent
validator before returning (`plans_validated` counts them):
- `CdspPolicy`: Tetris. The planners of `tetris.solver` over all pending requests (receding
  horizon: only chunks that start now are launched; the rest is re-planned at the next event).
- `StaticSpPolicy`: every request is one chunk on exactly `sp` instances, first come first served.
- `DistServePolicy`: prefill instances statically partitioned into groups of `group_size`
  (DistServe's fixed intra-op parallelism per prefill instance); FCFS, one request per group.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from tetris.evaluation.refinement import (
    BackgroundRefiner,
    problem_after,
    retime,
)
from tetris.solver.api import solve
from tetris.solver.cp_sat import CpOptions
from tetris.solver.objective import gpu_cost_weight_for_load
from tetris.solver.plan import ChunkPlan, RequestPlan, SolveResult, SolveStatus
from tetris.solver.problem import PendingRequest, Problem
from tetris.solver.validator import ensure_valid

START_TOL_S = 1e-9
# Modelled planner latency (reproducible mode), from `tetris bench solver` on this machine:
# greedy ≈ 0.1 ms + 5 µs per (pending request × prefill instance), e.g. 2.6 ms at 32 × 16.
GREEDY_BASE_S = 1e-4
GREEDY_PER_PAIR_S = 5e-6
AUTO_QUANTUM_OVERHEADS = 20


class SolverClock(enum.Enum):
    """How a decision's own time is charged to the simulated clock."""

    MEASURED = "measured"  # the planner's measured wall time (honest, not reproducible)
    MODELED = "modeled"  # a deterministic model of it (reproducible; see GREEDY_* and limits)
    FREE = "free"  # zero: an idealised, infinitely fast planner (ablation only)


@dataclass(frozen=True, slots=True)
class PrefillView:
    now_s: float
    # Planner's view: an instance still running a chunk is available from its planned end
    # (never at or before now, even if the chunk overran its plan).
    availability_s: tuple[float, ...]
    idle: tuple[bool, ...]
    # Requests with prompt left to prefill, in arrival order; one whose chunk is running has
    # `ready_s` after now.
    pending: tuple[PendingRequest, ...]
    load: float  # recent share of prefill instances busy, in [0, 1]


def planner_availability(busy: Sequence[bool], planned_end: Sequence[float], now: float,
                         overrun_s: float) -> tuple[float, ...]:
    """`PrefillView.availability_s` from each instance's state: a busy instance is free at its
    chunk's planned end, or `overrun_s` after now if the chunk has overrun its plan."""
    return tuple(max(end, now + overrun_s) if b else now
                 for b, end in zip(busy, planned_end, strict=True))


def ready_after(running: bool, planned_ready_s: float, now: float,
                overrun_s: float) -> float | None:
    """`PendingRequest.ready_s` of a request whose chunk may be running (same overrun rule)."""
    return max(planned_ready_s, now + overrun_s) if running else None


@dataclass
class LoadTracker:
    """The recent share of prefill instances busy (`PrefillView.load`, behind λ): an
    exponential average over time with memory `tau_s`."""

    tau_s: float
    load: float = 0.0
    t: float = 0.0

    def update(self, now: float, busy_share: float) -> float:
        dt = now - self.t
        if dt > 0:
            self.load += -math.expm1(-dt / self.tau_s) * (busy_share - self.load)
            self.t = now
        return self.load


@dataclass(frozen=True, slots=True)
class Launch:
    request_id: str
    start_token: int
    end_token: int
    instances: tuple[int, ...]


@dataclass
class Decision:
    launches: list[Launch] = field(default_factory=list)
    solver_s: float = 0.0
    plans_validated: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    # The plan behind the launches (receding horizon: the rest is re-planned later); what the
    # runtime shows at /v1/tetris/plan.
    problem: Problem | None = None
    result: SolveResult | None = None


class PrefillPolicy(Protocol):
    name: str

    def decide(self, view: PrefillView, problem_base: Problem) -> Decision: ...


def startable(view: PrefillView) -> bool:
    """Anything at all can start now: an idle instance and a request not mid-chunk."""
    return any(view.idle) and any(
        r.ready_s is None or r.ready_s <= view.now_s for r in view.pending
    )


def launches_now(view: PrefillView, plans: Sequence[RequestPlan]) -> list[Launch]:
    """The chunks of `plans` that start at the decision instant (receding horizon)."""
    out = []
    for plan in plans:
        first = plan.chunks[0]
        if first.start_s <= view.now_s + START_TOL_S and all(view.idle[g] for g in first.instances):
            out.append(Launch(plan.request_id, first.start_token, first.end_token,
                              first.instances))
    return out


@dataclass
class CdspPolicy:
    """Tetris: chunked, dynamic-SP plans from `tetris.solver` (`greedy`, `cp`, `milp`).

    With `solver="cp"`, greedy decides and CP-SAT refines in the background whenever at least
    `refine_min_waiting` requests wait to start (`refinement.BackgroundRefiner`): a refined plan
    is launched at a later decision when it is still valid and better. `milp` plans every
    decision itself and its time is charged in full."""

    name: str
    solver: str = "greedy"
    time_limit_ms: float = 50.0
    clock: SolverClock = SolverClock.MODELED
    max_planned: int = 32
    refine_min_waiting: int = 2
    cp_options: CpOptions | None = None
    # Longest launched chunk (seconds); "auto" = AUTO_QUANTUM_OVERHEADS × a chunk's fixed cost,
    # so slicing never costs more than 1/AUTO_QUANTUM_OVERHEADS of the time; None = no slicing.
    quantum_s: float | str | None = "auto"

    refine: str = "background"  # or "before_launch": CP-SAT's time delays every launch
    _refiner: BackgroundRefiner | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.quantum_s, str) and self.quantum_s != "auto":
            raise ValueError(f"quantum_s must be seconds, 'auto' or None, got {self.quantum_s!r}")
        if self.refine not in ("background", "before_launch"):
            raise ValueError(f"refine must be 'background' or 'before_launch', got {self.refine!r}")
        if self.solver == "cp" and self.refine == "background":
            self._refiner = BackgroundRefiner(
                self.time_limit_ms, charge_measured=self.clock is SolverClock.MEASURED,
                min_waiting=self.refine_min_waiting, cp_options=self.cp_options)

    def decide(self, view: PrefillView, problem_base: Problem) -> Decision:
        if not startable(view):
            return Decision()
        requests = self._window(view)
        problem = Problem(
            problem_base.cost_model, view.availability_s, requests, now_s=view.now_s,
            block_tokens=problem_base.block_tokens, max_chunks=problem_base.max_chunks,
            max_sp=problem_base.max_sp, gpu_cost_weight=gpu_cost_weight_for_load(view.load),
            miss_penalty=problem_base.miss_penalty,
        )
        # `cp` decides with greedy and refines in the background (see refinement.py), or, in
        # the "before_launch" ablation, plans with CP-SAT itself when requests queue.
        solver = self.solver
        if solver == "cp" and (self._refiner is not None or sum(
                1 for r in requests if r.prefilled_tokens == 0) < self.refine_min_waiting):
            solver = "greedy"
        started = time.perf_counter()
        result = solve(problem, solver, self.time_limit_ms, cp_options=self.cp_options)
        if not result.status.has_plans:
            why = result.stats.get("infeasible", result.status.value)
            raise RuntimeError(f"{self.name}: planner found no plan at t={view.now_s:.3f}s: {why}")
        plans = list(result.plans)
        validated = len(plans)  # `solve` validated every one
        stats = {f"solver_{solver}": 1}
        if result.status is SolveStatus.OPTIMAL:
            stats["solver_optimal"] = 1
        if self._refiner is not None:
            refined = self._refiner.take(problem, result.objective)
            if refined is not None:
                plans = refined
                validated += len(refined)
                stats["refined_plan_used"] = 1
        wall_s = time.perf_counter() - started
        launches = launches_now(view, plans)
        if self.quantum_s is not None:
            quantum = (AUTO_QUANTUM_OVERHEADS * problem.cost_model.chunk_seconds(1, 0, 1)
                       if self.quantum_s == "auto" else float(self.quantum_s))
            launches, cut = self._time_slice(problem, launches, quantum,
                                             {p.request_id: p for p in plans})
            validated += cut
            stats["chunks_sliced"] = cut
        solver_s = self._charge(solver, wall_s, len(requests), problem.num_instances)
        if self._refiner is not None:
            launch_s = view.now_s + solver_s
            cm = problem.cost_model
            running = [RequestPlan(x.request_id, (ChunkPlan(
                x.start_token, x.end_token, x.instances, launch_s,
                launch_s + cm.chunk_seconds_on(x.end_token - x.start_token, x.start_token,
                                               x.instances)),)) for x in launches]
            after = problem_after(problem, running, launch_s)
            if self._refiner.start(after):
                stats["refinements"] = 1
        return Decision(launches, solver_s=solver_s, plans_validated=validated, stats=stats,
                        problem=problem, result=replace(result, plans=tuple(plans)))

    def _time_slice(self, problem: Problem, launches: list[Launch], quantum_s: float,
                    plans: dict[str, RequestPlan]) -> tuple[list[Launch], int]:
        """Cut every launched chunk longer than the quantum at a block boundary.

        Planners see only the requests present; a long chunk on a wide group shuts out every
        request that arrives while it runs. Ending it after about `quantum_s` lets the next
        decision weigh the newcomers against the rest of this prompt (which keeps its KV
        group, so it can go on right away if nobody more urgent came). The cut plan is
        validated like any other."""
        cm = problem.cost_model
        block = problem.block_tokens
        out = []
        cut = 0
        for launch in launches:
            r = problem.requests[problem.index_of[launch.request_id]]
            start, end, group = launch.start_token, launch.end_token, launch.instances
            cross = cm.cluster.spans_nodes(group)
            if cm.chunk_seconds(end - start, start, len(group), cross) <= quantum_s:
                out.append(launch)
                continue
            fit = cm.max_tokens_within(quantum_s, start, len(group), cross)
            new_end = max((start + fit) // block * block, (start // block + 1) * block)
            if new_end >= end:
                out.append(launch)
                continue
            # The plan it stands for: this slice, the rest of its chunk on the same group
            # (same KV per instance), then the planner's later chunks, re-timed in order.
            first, *later = plans[launch.request_id].chunks
            pieces = [ChunkPlan(start, new_end, group, first.start_s, first.start_s),
                      ChunkPlan(new_end, end, group, first.start_s, first.start_s), *later]
            single = Problem(cm, problem.availability_s, (r,), now_s=problem.now_s,
                             block_tokens=block)
            ensure_valid(single, retime(single, [RequestPlan(r.request_id, tuple(pieces))]))
            out.append(Launch(launch.request_id, start, new_end, group))
            cut += 1
        return out, cut

    def _window(self, view: PrefillView) -> tuple[PendingRequest, ...]:
        """Requests already holding KV (they must continue) plus the earliest deadlines, up to
        `max_planned`: planning hundreds of queued requests at every event buys nothing when
        only the first few can start before the next event."""
        started = [r for r in view.pending if r.prefilled_tokens > 0]
        waiting = sorted((r for r in view.pending if r.prefilled_tokens == 0),
                         key=lambda r: (r.deadline_s, r.arrival_s))
        room = max(0, self.max_planned - len(started))
        return tuple(started + waiting[:room])

    def _charge(self, solver: str, wall_s: float, requests: int, instances: int) -> float:
        if self.clock is SolverClock.FREE:
            return 0.0
        if self.clock is SolverClock.MEASURED:
            return wall_s
        greedy = GREEDY_BASE_S + GREEDY_PER_PAIR_S * requests * instances
        if solver == "greedy":
            return greedy
        return greedy + self.time_limit_ms / 1e3


def _validated_single_chunks(
    view: PrefillView, problem_base: Problem, picks: list[tuple[PendingRequest, tuple[int, ...]]]
) -> list[Launch]:
    """One-chunk plans starting now, checked by the validator like any planner's."""
    if not picks:
        return []
    cm = problem_base.cost_model
    plans = [
        RequestPlan(r.request_id, (ChunkPlan(0, r.prompt_tokens, group, view.now_s,
                                             view.now_s + cm.chunk_seconds_on(
                                                 r.prompt_tokens, 0, group)),))
        for r, group in picks
    ]
    problem = Problem(cm, view.availability_s, tuple(r for r, _ in picks), now_s=view.now_s,
                      block_tokens=problem_base.block_tokens)
    ensure_valid(problem, plans)
    return [Launch(r.request_id, 0, r.prompt_tokens, group) for r, group in picks]


@dataclass
class StaticSpPolicy:
    """Each request is one chunk on exactly `sp` instances (the `sp` idle ones that share a node
    where possible), first come first served: the head of the queue waits for `sp` idle
    instances and nobody overtakes it."""

    name: str
    sp: int

    def decide(self, view: PrefillView, problem_base: Problem) -> Decision:
        if not startable(view):
            return Decision()
        cluster = problem_base.cost_model.cluster
        idle = [g for g, free in enumerate(view.idle) if free]
        picks: list[tuple[PendingRequest, tuple[int, ...]]] = []
        for r in view.pending:
            if len(idle) < self.sp:
                break
            # Fill from the node with the most idle instances, so groups stay inside a node.
            by_node: dict[int, list[int]] = {}
            for g in idle:
                by_node.setdefault(cluster.node_of(g), []).append(g)
            ordered = sorted(by_node.values(), key=lambda gs: (-len(gs), gs[0]))
            group = tuple(sorted([g for gs in ordered for g in gs][: self.sp]))
            picks.append((r, group))
            idle = [g for g in idle if g not in group]
        launches = _validated_single_chunks(view, problem_base, picks)
        return Decision(launches, plans_validated=len(launches))


@dataclass
class DistServePolicy:
    """Prefill instances in fixed groups of `group_size` (the rest, if it does not divide,
    stay unused); a request takes the first idle group, first come first served."""

    name: str
    group_size: int

    def decide(self, view: PrefillView, problem_base: Problem) -> Decision:
        if not startable(view):
            return Decision()
        n = len(view.idle)
        groups = [tuple(range(k, k + self.group_size))
                  for k in range(0, n - self.group_size + 1, self.group_size)]
        free_groups = [g for g in groups if all(view.idle[i] for i in g)]
        picks = list(zip(view.pending, free_groups, strict=False))
        launches = _validated_single_chunks(view, problem_base, picks)
        return Decision(launches, plans_validated=len(launches))
