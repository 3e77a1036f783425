"""Turn chosen candidates and a chunk order into exact times (serial schedule generation).

Every chunk, in the given order, starts at the earliest moment its request's previous chunk has
ended, its release has passed and all of its instances are free. Given the order of any feasible
schedule (start times sorted), this never starts a chunk later than that schedule did — by
induction: each bound it takes is no later there — so it turns the exact planners' rounded or
tolerance-laden solutions into exact, left-shifted ones without losing objective.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from tetris.solver.candidates import Candidate
from tetris.solver.plan import ChunkPlan, RequestPlan
from tetris.solver.problem import Problem

ChunkRef = tuple[int, int]  # (position in `chosen`, chunk index)


def serial_starts(
    chosen: Sequence[Candidate],
    order: Iterable[ChunkRef],
    free: list[float],
    release: Callable[[ChunkRef], float],
    duration: Callable[[ChunkRef], float],
) -> list[list[float]]:
    """Start of every chunk; `free` (per instance) is updated in place."""
    starts = [[0.0] * len(c.chunks) for c in chosen]
    for pos, k in order:
        chunk = chosen[pos].chunks[k]
        t = release((pos, k))
        if k:
            t = max(t, starts[pos][k - 1] + duration((pos, k - 1)))
        for g in chunk.instances:
            t = max(t, free[g])
        starts[pos][k] = t
        end = t + duration((pos, k))
        for g in chunk.instances:
            free[g] = end
    return starts


def left_shift(
    problem: Problem, chosen: Sequence[Candidate], order: Iterable[ChunkRef]
) -> list[RequestPlan]:
    """Exact plans (problem order) for the chosen candidates, chunks placed in `order`."""
    free = [problem.free_at(g) for g in range(problem.num_instances)]
    starts = serial_starts(
        chosen,
        order,
        free,
        lambda ref: chosen[ref[0]].chunks[ref[1]].release_s,
        lambda ref: chosen[ref[0]].chunks[ref[1]].duration_s,
    )
    plans = []
    for pos, cand in enumerate(chosen):
        chunks = tuple(
            ChunkPlan(c.start_token, c.end_token, c.instances, s, s + c.duration_s)
            for c, s in zip(cand.chunks, starts[pos], strict=True)
        )
        plans.append(RequestPlan(problem.requests[cand.request_index].request_id, chunks))
    plans.sort(key=lambda p: problem.index_of[p.request_id])
    return plans
