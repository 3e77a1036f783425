"""Tetris's prefill policy: chunked, dynamic-SP plans from `tetris.solver` at every decision.

The planners (`greedy`, `cp`, `milp`) plan every pending request; only chunks that start now are
launched (receding horizon: the rest is re-planned at the next event). With `cp`, greedy decides
and CP-SAT refines in the background (`refinement.py`); `milp` plans every decision itself and
its time is charged in full. Every plan — the planner's, a refined one, a time slice — passes the
independent validator before it is launched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from tetris.solver.api import solve
from tetris.solver.cost_model import CostModel
from tetris.solver.plan import ChunkPlan, ChunkSpec, RequestPlan, SolveStatus
from tetris.solver.policy.refinement import BackgroundRefiner, problem_after, retime
from tetris.solver.policy.settings import PolicySettings
from tetris.solver.policy.view import (
    Decision,
    Launch,
    PrefillView,
    SolverClock,
    launches_now,
    startable,
)
from tetris.solver.problem import PendingRequest, Problem
from tetris.solver.validator import ensure_valid

# Modelled planner latency (reproducible mode), from `tetris bench solver` on this machine:
# greedy ≈ 0.1 ms + 5 µs per (pending request × prefill instance), e.g. 2.6 ms at 32 × 16.
GREEDY_BASE_S = 1e-4
GREEDY_PER_PAIR_S = 5e-6
AUTO_QUANTUM_OVERHEADS = 20


@dataclass
class CdspPolicy:
    name: str
    cost_model: CostModel
    settings: PolicySettings = field(default_factory=PolicySettings)
    solver: str = "greedy"
    clock: SolverClock = SolverClock.MODELED
    # Set for `solver="cp"` with background refinement (registry.make_policy builds it).
    refiner: BackgroundRefiner | None = None

    def __post_init__(self) -> None:
        if self.solver not in ("greedy", "cp", "milp"):
            raise ValueError(f"unknown solver {self.solver!r}: use greedy, cp or milp")
        if self.refiner is not None and self.solver != "cp":
            raise ValueError("only the cp solver refines in the background")

    @property
    def time_limit_ms(self) -> float:
        s = self.settings
        return s.milp_time_limit_ms if self.solver == "milp" else s.time_limit_ms

    def decide(self, view: PrefillView) -> Decision:
        if not startable(view):
            return Decision()
        s = self.settings
        requests = self._window(view)
        problem = s.problem(self.cost_model, view.availability_s, requests, view.now_s, view.load)
        # `cp` decides with greedy and refines in the background, or, in the "before_launch"
        # ablation, plans with CP-SAT itself when requests queue.
        solver = self.solver
        if solver == "cp" and (self.refiner is not None or sum(
                1 for r in requests if r.prefilled_tokens == 0) < s.refine_min_waiting):
            solver = "greedy"
        started = time.perf_counter()
        result = solve(problem, solver, self.time_limit_ms)
        if not result.status.has_plans:
            why = result.stats.get("infeasible", result.status.value)
            raise RuntimeError(f"{self.name}: planner found no plan at t={view.now_s:.3f}s: {why}")
        plans = list(result.plans)
        validated = len(plans)  # `solve` validated every one
        stats = {f"solver_{solver}": 1}
        if result.status is SolveStatus.OPTIMAL:
            stats["solver_optimal"] = 1
        if self.refiner is not None:
            refined = self.refiner.take(problem, result.objective)
            if refined is not None:
                plans = refined
                validated += len(refined)
                stats["refined_plan_used"] = 1
        wall_s = time.perf_counter() - started
        launches = launches_now(view, plans)
        if s.quantum_s is not None:
            quantum = (AUTO_QUANTUM_OVERHEADS * self.cost_model.chunk_seconds(1, 0, 1)
                       if s.quantum_s == "auto" else float(s.quantum_s))
            launches, cut = self._time_slice(problem, launches, quantum,
                                             {p.request_id: p for p in plans})
            validated += cut
            stats["chunks_sliced"] = cut
        solver_s = self._charge(solver, wall_s, len(requests), problem.num_instances)
        if self.refiner is not None:
            launch_s = view.now_s + solver_s
            running = [RequestPlan(x.request_id, (self._planned(x.chunk, launch_s),))
                       for x in launches]
            if self.refiner.start(problem_after(problem, running, launch_s)):
                stats["refinements"] = 1
        return Decision(launches, solver_s=solver_s, plans_validated=validated, stats=stats,
                        problem=problem, result=replace(result, plans=tuple(plans)))

    def _planned(self, chunk: ChunkSpec, start_s: float) -> ChunkPlan:
        end = start_s + self.cost_model.chunk_seconds_on(chunk.tokens, chunk.start_token,
                                                         chunk.instances)
        return ChunkPlan(chunk.start_token, chunk.end_token, chunk.instances, start_s, end)

    def _time_slice(self, problem: Problem, launches: list[Launch], quantum_s: float,
                    plans: dict[str, RequestPlan]) -> tuple[list[Launch], int]:
        """Cut every launched chunk longer than the quantum at a block boundary.

        Planners see only the requests present; a long chunk on a wide group shuts out every
        request that arrives while it runs. Ending it after about `quantum_s` lets the next
        decision weigh the newcomers against the rest of this prompt (which keeps its KV
        group, so it can go on right away if nobody more urgent came). The cut plan is
        validated like any other, under the same settings, with room for the one extra chunk
        the cut makes (a slice keeps its group, so the SP shape is unchanged)."""
        cm = problem.cost_model
        block = problem.block_tokens
        out = []
        cut = 0
        for launch in launches:
            r = problem.requests[problem.index_of[launch.request_id]]
            start, end, group = launch.chunk.start_token, launch.chunk.end_token, \
                launch.chunk.instances
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
            single = replace(problem, requests=(r,), max_chunks=None if problem.max_chunks
                             is None else problem.max_chunks + 1)
            ensure_valid(single, retime(single, [RequestPlan(r.request_id, tuple(pieces))]))
            out.append(Launch(launch.request_id, ChunkSpec(start, new_end, group)))
            cut += 1
        return out, cut

    def _window(self, view: PrefillView) -> tuple[PendingRequest, ...]:
        """Requests already holding KV (they must continue) plus the earliest deadlines, up to
        `max_planned`: planning hundreds of queued requests at every event buys nothing when
        only the first few can start before the next event."""
        started = [r for r in view.pending if r.prefilled_tokens > 0]
        waiting = sorted((r for r in view.pending if r.prefilled_tokens == 0),
                         key=lambda r: (r.deadline_s, r.arrival_s))
        room = max(0, self.settings.max_planned - len(started))
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
