"""CP-SAT refinement off the decision path: greedy decides now, CP-SAT improves what is left.

At a decision the greedy plan is launched at once. Then CP-SAT (warm-started from greedy) plans
the state as it stands after those launches — every request still waiting — in the background:
its result becomes usable only once it is ready (`refinement_runs`: the simulator charges its
time limit or its measured wall time; the runtime runs it on a thread of its own and uses it once
done), and only while no request it planned has moved on. At the next decision the refined plan
is re-timed against the instances' actual availability (chunks keep their tokens and groups, in
the refined plan's start order), requests that arrived meanwhile are fitted in after it by
greedy's rule, and the result is validated and launched instead of greedy's plan when its exact
objective is lower.

Why not refine before launching: charging CP-SAT's tens of milliseconds to every decision under
load delays every launch, and the queue pays more than the better plan gains (measured: see
docs/simulator.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from tetris.solver.expansion import occupy
from tetris.solver.greedy import best_cap_plan
from tetris.solver.objective import total_objective
from tetris.solver.plan import ChunkPlan, RequestPlan
from tetris.solver.policy.refinement_runs import RefinementRun
from tetris.solver.problem import PendingRequest, Problem
from tetris.solver.validator import validate_plans

Progress = tuple[int, tuple[int, ...]]


def problem_after(problem: Problem, launched: Sequence[RequestPlan], now_s: float) -> Problem:
    """The planning problem once the `launched` chunks (one per request, planned times) run."""
    availability = list(problem.availability_s)
    progressed: dict[str, ChunkPlan] = {}
    for plan in launched:
        (c,) = plan.chunks
        for g in c.instances:
            availability[g] = max(availability[g], c.end_s)
        progressed[plan.request_id] = c
    requests = []
    for r in problem.requests:
        ran = progressed.get(r.request_id)
        if ran is None:
            requests.append(r)
        elif ran.end_token < r.prompt_tokens:
            requests.append(replace(r, prefilled_tokens=ran.end_token,
                                    kv_instances=ran.instances, ready_s=ran.end_s))
    return replace(problem, availability_s=tuple(availability), requests=tuple(requests),
                   now_s=now_s)


def _progress(r: PendingRequest) -> Progress:
    return r.prefilled_tokens, tuple(sorted(r.kv_instances))


@dataclass
class BackgroundRefiner:
    """Starts CP-SAT runs on `run` (one at a time) and repairs their plans for later decisions."""

    run: RefinementRun
    min_waiting: int = 2

    def start(self, problem: Problem) -> bool:
        """Refine `problem` (the state after this decision's launches); False if not worth it:
        fewer than `min_waiting` requests wait to start, or a refinement is still running."""
        if self.run.busy(problem.now_s):
            return False
        waiting = sum(1 for r in problem.requests if r.prefilled_tokens == 0)
        if waiting < self.min_waiting:
            return False
        return self.run.start(problem)

    def take(self, problem: Problem, greedy_objective: float | None) -> list[RequestPlan] | None:
        """The refined plan repaired for `problem`, if it is ready, passes the validator and
        beats greedy's objective; else None. Used at most once.

        Repair: requests it planned keep their chunks (tokens, groups) and order, re-timed to
        the instances' actual availability; requests that arrived since are planned after
        them by greedy's own rule, earliest deadline first. A request it planned that has
        moved on since (a chunk launched by a decision in between) voids the plan."""
        done = self.run.take(problem.now_s)
        if done is None:
            return None
        planned, result = done
        progress = {r.request_id: _progress(r) for r in planned.requests}
        by_id = {p.request_id: p for p in result.plans}
        kept = []
        newcomers = []
        for r in problem.requests:
            seen = progress.get(r.request_id)
            if seen is None:
                newcomers.append(r)
            elif seen != _progress(r):
                return None
            else:
                kept.append(by_id[r.request_id])
        plans = retime(problem, kept)
        free = [problem.free_at(g) for g in range(problem.num_instances)]
        for plan in plans:
            occupy(free, plan)
        for r in sorted(newcomers, key=lambda q: (q.deadline_s, q.arrival_s)):
            found = best_cap_plan(problem, r, free)
            if found is None:
                return None
            occupy(free, found[0])
            plans.append(found[0])
        plans.sort(key=lambda p: problem.index_of[p.request_id])
        if validate_plans(problem, plans):
            return None
        if greedy_objective is not None and \
                total_objective(problem, plans) >= greedy_objective - 1e-12:
            return None
        return plans


def retime(problem: Problem, plans: Sequence[RequestPlan]) -> list[RequestPlan]:
    """Same chunks (tokens, groups), placed in their old start order as early as the problem
    allows: each after its request's previous chunk, its release, and its instances' free time."""
    cm = problem.cost_model
    free = [problem.free_at(g) for g in range(problem.num_instances)]
    order = sorted(((c.start_s, i, k) for i, p in enumerate(plans)
                    for k, c in enumerate(p.chunks)))
    new: list[list[ChunkPlan]] = [[] for _ in plans]
    for _, i, k in order:
        c = plans[i].chunks[k]
        r = problem.requests[problem.index_of[plans[i].request_id]]
        t = max(problem.now_s, r.earliest_start_s, *(free[g] for g in c.instances))
        if k:
            t = max(t, new[i][-1].end_s)
        end = t + cm.chunk_seconds_on(c.tokens, c.start_token, c.instances)
        for g in c.instances:
            free[g] = end
        new[i].append(ChunkPlan(c.start_token, c.end_token, c.instances, t, end))
    return [RequestPlan(p.request_id, tuple(chunks)) for p, chunks in zip(plans, new,
                                                                           strict=True)]
