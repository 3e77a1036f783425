"""Independent plan validator: checks any planner's output against the problem's rules.

Deliberately shares no code with the planners (only the data types), so that a bug in a planner's
own feasibility logic cannot hide here too. Every violation is collected rather than stopping at
the first, so a failing test or simulator run shows the whole picture at once.

Codes: unknown_request, duplicate_plan, missing_plan, empty_plan, coverage, block, max_chunks,
instance_range, max_sp, nesting, order, too_early, duration, overlap, bad_time, kv_memory.

KV memory is checked per request under the runtime's layout: a chunk's tokens are spread evenly
(rounded up) over its group, and KV already prefilled evenly over `kv_instances`; no instance may
hold more of one request's KV than `cost_model.kv_capacity_tokens`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tetris.solver.plan import ChunkPlan, RequestPlan
from tetris.solver.problem import PendingRequest, Problem

DURATION_ABS_TOL_S = 1e-12
# Times are absolute (a monotonic clock, a long simulation): end − start of a chunk carries a
# rounding error of about one ulp of the clock value, so tolerances grow with the clock.
ULPS = 4


def _clock_tol(tol: float, *times: float) -> float:
    return tol + ULPS * math.ulp(max(abs(t) for t in times))


@dataclass(frozen=True, slots=True)
class Violation:
    code: str
    request_id: str | None
    message: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class InvalidPlanError(RuntimeError):
    """Raised by `ensure_valid`; `violations` holds every problem found."""

    def __init__(self, violations: Sequence[Violation]) -> None:
        self.violations: list[Violation] = list(violations)
        lines = "\n".join(f"  {v}" for v in self.violations)
        super().__init__(f"{len(self.violations)} plan violation(s):\n{lines}")

    def __reduce__(self) -> tuple[type[InvalidPlanError], tuple[list[Violation]]]:
        # The default pickling would call __init__ with the message string (multiprocessing).
        return (type(self), (self.violations,))


def _t(x: float) -> str:
    return f"{x:.9g}s"


def _where(rid: str, k: int, c: ChunkPlan) -> str:
    return (
        f"request {rid!r} chunk {k} (tokens [{c.start_token}, {c.end_token}), "
        f"instances {c.instances}, [{_t(c.start_s)}, {_t(c.end_s)}))"
    )


# (start_s, end_s, request_id, chunk index) of one chunk on one instance.
_Busy = tuple[float, float, str, int]


def _check_plan(
    problem: Problem,
    req: PendingRequest,
    plan: RequestPlan,
    busy: list[list[_Busy]],
    out: list[Violation],
    time_tol_s: float,
    duration_rel_tol: float,
    timing: bool,
) -> None:
    rid = req.request_id
    chunks = plan.chunks
    n_inst = problem.num_instances
    avail = problem.availability_s
    block = problem.block_tokens
    cost = problem.cost_model

    def bad(code: str, message: str) -> None:
        out.append(Violation(code, rid, message))

    if not chunks:
        bad("empty_plan", f"request {rid!r}: plan has no chunks")
        return
    cap = problem.max_chunks
    if cap is not None and len(chunks) > cap:
        bad("max_chunks", f"request {rid!r}: {len(chunks)} chunks > max_chunks {cap}")

    def at(code: str, message: str) -> None:
        # Reads the loop's current k and c: the chunk description is built only on failure,
        # which keeps the common all-valid path cheap.
        out.append(Violation(code, rid, f"{_where(rid, k, c)}: {message}"))

    last = len(chunks) - 1
    prev: ChunkPlan | None = None
    prev_group: frozenset[int] = frozenset(req.kv_instances)
    kv_held = dict.fromkeys(req.kv_instances, -(-req.prefilled_tokens // max(1, len(prev_group))))
    for k, c in enumerate(chunks):
        # -- tokens ------------------------------------------------------------------------
        expected_start = req.prefilled_tokens if prev is None else prev.end_token
        if c.start_token != expected_start:
            what = "prefilled_tokens" if prev is None else "previous end_token"
            at("coverage", f"starts at token {c.start_token}, {what} is {expected_start}")
        if c.end_token <= c.start_token:
            at("coverage", "empty or reversed token range")
        if k == last:
            if c.end_token != req.prompt_tokens:
                at("coverage", f"ends at token {c.end_token}, prompt has {req.prompt_tokens}")
        elif c.end_token % block != 0:
            at("block", f"end_token {c.end_token} is not a multiple of {block}")

        # -- instances -----------------------------------------------------------------------
        group = frozenset(c.instances)
        valid_ids = [g for g in group if 0 <= g < n_inst]
        if not c.instances:
            at("instance_range", "empty instance group")
        if len(valid_ids) != len(group):
            out_of_range = sorted(g for g in group if not 0 <= g < n_inst)
            at("instance_range", f"instances {out_of_range} outside [0, {n_inst})")
        if len(group) != len(c.instances):
            at("instance_range", "duplicate instance in group")
        if problem.max_sp is not None and len(c.instances) > problem.max_sp:
            at("max_sp", f"SP size {len(c.instances)} > max_sp {problem.max_sp}")
        if not group >= prev_group:
            what = "kv_instances" if prev is None else "previous chunk's group"
            lacks = sorted(prev_group - group)
            at("nesting", f"group lacks {lacks} of {what} {tuple(sorted(prev_group))}")
        prev_group = group

        # -- times ---------------------------------------------------------------------------
        if not timing:
            prev = c
            continue
        if not (math.isfinite(c.start_s) and math.isfinite(c.end_s)):
            at("bad_time", "non-finite time")
            prev = c
            continue
        tol = _clock_tol(time_tol_s, c.start_s, c.end_s)
        if prev is not None and math.isfinite(prev.end_s) and c.start_s < prev.end_s - tol:
            at("order", f"starts before chunk {k - 1} ends at {_t(prev.end_s)}")
        if k == 0:
            if c.start_s < req.earliest_start_s - tol:
                at("too_early", f"starts before the request is ready at {_t(req.earliest_start_s)}")
            if c.start_s < problem.now_s - tol:
                at("too_early", f"starts before now {_t(problem.now_s)}")
        for g in sorted(valid_ids):
            if c.start_s < avail[g] - tol:
                at("too_early", f"instance {g} is busy until {_t(avail[g])}")
        # A malformed chunk has no meaningful cost (and sp=0 would divide by zero); it is
        # already reported above.
        if c.instances and c.end_token > c.start_token:
            want = cost.chunk_seconds_on(c.tokens, c.start_token, c.instances)
            got = c.end_s - c.start_s
            if abs(got - want) > duration_rel_tol * abs(want) + _clock_tol(
                    DURATION_ABS_TOL_S, c.start_s, c.end_s):
                at("duration", f"lasts {_t(got)}, cost model says {_t(want)}")
        for g in valid_ids:
            busy[g].append((c.start_s, c.end_s, rid, k))
        prev = c
    _check_kv_memory(problem, plan, kv_held, out)


def _check_kv_memory(
    problem: Problem, plan: RequestPlan, kv_held: dict[int, int], out: list[Violation]
) -> None:
    for c in plan.chunks:
        if c.instances and c.end_token > c.start_token:
            share = -(-(c.end_token - c.start_token) // len(c.instances))
            for g in set(c.instances):
                kv_held[g] = kv_held.get(g, 0) + share
    capacity = problem.cost_model.kv_capacity_tokens
    if kv_held and max(kv_held.values()) > capacity:
        g = max(kv_held, key=lambda i: kv_held[i])
        out.append(Violation(
            "kv_memory", plan.request_id,
            f"request {plan.request_id!r}: instance {g} would hold {kv_held[g]} KV tokens, "
            f"capacity {capacity}",
        ))


def _check_overlaps(busy: list[list[_Busy]], out: list[Violation], time_tol_s: float) -> None:
    for g, items in enumerate(busy):
        if len(items) < 2:
            continue
        items.sort()
        # Sorted by start, the earlier interval reaching furthest right is the only one that
        # can give the largest intersection with the next, so one sweep finds every clash.
        reach = items[0]
        for cur in items[1:]:
            s, e, rid, k = cur
            if min(reach[1], e) - s > _clock_tol(time_tol_s, s, e):
                out.append(Violation(
                    "overlap", rid,
                    f"instance {g}: request {rid!r} chunk {k} [{_t(s)}, {_t(e)}) overlaps "
                    f"request {reach[2]!r} chunk {reach[3]} [{_t(reach[0])}, {_t(reach[1])})",
                ))
            if e > reach[1]:
                reach = cur


def validate_plans(
    problem: Problem,
    plans: Sequence[RequestPlan],
    *,
    time_tol_s: float = 1e-9,
    duration_rel_tol: float = 1e-9,
    timing: bool = True,
) -> list[Violation]:
    """Every way `plans` break the problem's rules; empty means the plans are valid.

    `timing=False` checks structure only (tokens, groups, KV memory, not times): for plans that
    carry no schedule, like a chunking given by hand to `tetris generate`."""
    out: list[Violation] = []
    busy: list[list[_Busy]] = [[] for _ in range(problem.num_instances)]
    index = problem.index_of
    seen: set[str] = set()
    for plan in plans:
        rid = plan.request_id
        i = index.get(rid)
        if i is None:
            out.append(Violation("unknown_request", rid, f"plan for unknown request {rid!r}"))
            continue
        if rid in seen:
            # Checking the copy too would only repeat its errors as overlaps with the first.
            out.append(Violation("duplicate_plan", rid, f"more than one plan for request {rid!r}"))
            continue
        seen.add(rid)
        _check_plan(problem, problem.requests[i], plan, busy, out, time_tol_s, duration_rel_tol,
                    timing)
    for r in problem.requests:
        if r.request_id not in seen:
            out.append(Violation("missing_plan", r.request_id,
                                 f"no plan for pending request {r.request_id!r}"))
    if timing:
        _check_overlaps(busy, out, time_tol_s)
    return out


def ensure_valid(
    problem: Problem,
    plans: Sequence[RequestPlan],
    *,
    time_tol_s: float = 1e-9,
    duration_rel_tol: float = 1e-9,
) -> None:
    """Raise `InvalidPlanError` listing every violation, if there is any."""
    violations = validate_plans(
        problem, plans, time_tol_s=time_tol_s, duration_rel_tol=duration_rel_tol
    )
    if violations:
        raise InvalidPlanError(violations)
