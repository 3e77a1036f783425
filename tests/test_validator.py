"""The independent plan validator: a hand-made valid plan, then one broken invariant per test."""

from __future__ import annotations

import ast
import math
import pickle
from dataclasses import replace
from pathlib import Path

import pytest

from tests.helpers import linear_cost_model
from tetris.solver import validator
from tetris.solver.cluster import ClusterSpec
from tetris.solver.cost_model import CostModel
from tetris.solver.hardware import HARDWARE_PRESETS
from tetris.solver.model_spec import MODEL_PRESETS
from tetris.solver.plan import ChunkPlan, RequestPlan
from tetris.solver.problem import PendingRequest, Problem
from tetris.solver.validator import InvalidPlanError, Violation, ensure_valid, validate_plans

COST = CostModel(
    MODEL_PRESETS["llama3-8b"],
    HARDWARE_PRESETS["h100"],
    ClusterSpec(prefill_instances=4, gpus_per_node=2),
)
# "a" is fresh; "b" already has 512 tokens of KV on instance 2 and is ready at 0.5.
REQ_A = PendingRequest("a", arrival_s=0.0, prompt_tokens=1500, ttft_slo_s=5.0)
REQ_B = PendingRequest(
    "b", arrival_s=0.0, prompt_tokens=2048, ttft_slo_s=5.0,
    prefilled_tokens=512, kv_instances=(2,), ready_s=0.5,
)
PROBLEM = Problem(COST, availability_s=(0.0, 0.0, 1.0, 1.0), requests=(REQ_A, REQ_B))


def chunk(start: int, end: int, instances: tuple[int, ...], start_s: float) -> ChunkPlan:
    """A chunk whose duration is exactly the cost model's."""
    dur = COST.chunk_seconds_on(end - start, start, instances)
    return ChunkPlan(start, end, instances, start_s, start_s + dur)


def then(prev: ChunkPlan, end_token: int, instances: tuple[int, ...]) -> ChunkPlan:
    """The next chunk, starting where `prev` ends in tokens and in time."""
    return chunk(prev.end_token, end_token, instances, prev.end_s)


def plan_a() -> RequestPlan:
    c0 = chunk(0, 1024, (0,), 0.0)
    return RequestPlan("a", (c0, then(c0, 1500, (0, 1))))


def plan_b(start_s: float = 1.0, first: tuple[int, ...] = (2, 3)) -> RequestPlan:
    c0 = chunk(512, 1536, first, start_s)
    return RequestPlan("b", (c0, then(c0, 2048, (2, 3))))


def codes(plans: list[RequestPlan], problem: Problem = PROBLEM) -> set[str]:
    return {v.code for v in validate_plans(problem, plans)}


def test_valid_plan_has_no_violations() -> None:
    """The hand-made plan obeys every rule."""
    assert validate_plans(PROBLEM, [plan_a(), plan_b()]) == []
    ensure_valid(PROBLEM, [plan_b(), plan_a()])


def test_unknown_request() -> None:
    """A plan for a request the problem does not have is flagged (and not checked further)."""
    stray = replace(plan_a(), request_id="zzz")
    assert codes([plan_a(), plan_b(), stray]) == {"unknown_request"}


def test_duplicate_plan() -> None:
    """Two plans for one request are flagged once, not as a flood of overlaps."""
    found = validate_plans(PROBLEM, [plan_a(), plan_b(), plan_a()])
    assert [(v.code, v.request_id) for v in found] == [("duplicate_plan", "a")]


def test_missing_plan() -> None:
    """A pending request left without a plan is flagged."""
    found = validate_plans(PROBLEM, [plan_a()])
    assert [(v.code, v.request_id) for v in found] == [("missing_plan", "b")]


def test_empty_plan() -> None:
    """A plan with no chunks is flagged."""
    assert codes([replace(plan_a(), chunks=()), plan_b()]) == {"empty_plan"}


@pytest.mark.parametrize(
    "bounds",
    [
        [(0, 1024), (1024, 1400)],  # stops short of the prompt
        [(0, 512), (1024, 1500)],  # gap between chunks
        [(512, 1024), (1024, 1500)],  # skips tokens that were never prefilled
        [(0, 1024), (1024, 1024), (1024, 1500)],  # an empty chunk
    ],
)
def test_coverage(bounds: list[tuple[int, int]]) -> None:
    """Chunks must tile [prefilled_tokens, prompt_tokens) exactly, each non-empty."""
    t = 0.0
    chunks = []
    for s, e in bounds:
        c = chunk(s, e, (0,), t)
        chunks.append(c)
        t = c.end_s
    assert codes([RequestPlan("a", tuple(chunks)), plan_b()]) == {"coverage"}


def test_coverage_of_prefilled_request() -> None:
    """A request with KV already must not restart from token 0."""
    c0 = chunk(0, 1536, (2, 3), 1.0)
    assert codes([plan_a(), RequestPlan("b", (c0, then(c0, 2048, (2, 3))))]) == {"coverage"}


def test_block() -> None:
    """A chunk boundary other than the prompt's end must sit on a block boundary."""
    c0 = chunk(0, 1000, (0,), 0.0)
    assert codes([RequestPlan("a", (c0, then(c0, 1500, (0, 1)))), plan_b()]) == {"block"}


def test_last_chunk_may_end_off_block() -> None:
    """Only the last chunk may end off a block boundary (1500 is not a multiple of 512)."""
    assert plan_a().chunks[-1].end_token % PROBLEM.block_tokens != 0
    assert codes([plan_a(), plan_b()]) == set()


def test_max_chunks() -> None:
    """More chunks than max_chunks is flagged."""
    assert codes([plan_a(), plan_b()], replace(PROBLEM, max_chunks=1)) == {"max_chunks"}
    assert codes([plan_a(), plan_b()], replace(PROBLEM, max_chunks=2)) == set()


@pytest.mark.parametrize("group", [(0, 1, 4), (0, 0), (-1, 0)])
def test_instance_range(group: tuple[int, ...]) -> None:
    """Instance ids must be in range and distinct within a chunk."""
    c0 = chunk(0, 1024, (0,), 0.0)
    assert codes([RequestPlan("a", (c0, then(c0, 1500, group))), plan_b()]) == {"instance_range"}


def test_empty_group() -> None:
    """A chunk on no instance at all is flagged."""
    c0 = ChunkPlan(0, 1024, (), 0.0, 0.01)
    c1 = chunk(1024, 1500, (0, 1), 0.01)
    assert codes([RequestPlan("a", (c0, c1)), plan_b()]) == {"instance_range"}


def test_max_sp() -> None:
    """A group wider than max_sp is flagged."""
    assert codes([plan_a(), plan_b()], replace(PROBLEM, max_sp=1)) == {"max_sp"}


def test_nesting_first_group_must_hold_kv() -> None:
    """A prefilled request's first group must contain the instances holding its KV."""
    c0 = chunk(512, 1536, (3,), 1.0)
    found = validate_plans(PROBLEM, [plan_a(), RequestPlan("b", (c0, then(c0, 2048, (3,))))])
    assert [(v.code, v.request_id) for v in found] == [("nesting", "b")]
    assert "kv_instances" in found[0].message


def test_nesting_groups_must_not_shrink() -> None:
    """A later group must contain the previous one."""
    c0 = chunk(0, 1024, (0, 1), 0.0)
    assert codes([RequestPlan("a", (c0, then(c0, 1500, (1,)))), plan_b()]) == {"nesting"}


def test_order() -> None:
    """A chunk starting before its predecessor ends is out of order (and, as nested groups
    share an instance, also overlaps it)."""
    c0 = chunk(0, 1024, (0,), 0.0)
    c1 = chunk(1024, 1500, (0, 1), c0.end_s - 1e-3)
    assert codes([RequestPlan("a", (c0, c1)), plan_b()]) == {"order", "overlap"}


def test_too_early_before_ready() -> None:
    """The first chunk may not start before the request is ready."""
    late_a = replace(REQ_A, arrival_s=0.5)
    problem = replace(PROBLEM, requests=(late_a, REQ_B))
    assert codes([plan_a(), plan_b()], problem) == {"too_early"}


def test_too_early_before_now() -> None:
    """No chunk may start before now."""
    assert codes([plan_a(), plan_b()], replace(PROBLEM, now_s=0.01)) == {"too_early"}


def test_too_early_before_availability() -> None:
    """No chunk may start on an instance before that instance is free."""
    found = validate_plans(PROBLEM, [plan_a(), plan_b(start_s=0.9)])
    assert {v.code for v in found} == {"too_early"}
    assert {v.request_id for v in found} == {"b"}


@pytest.mark.parametrize("delta", [1e-6, -1e-6])
def test_duration(delta: float) -> None:
    """A chunk's length must match the cost model (prefix = its start_token)."""
    a = plan_a()
    last = a.chunks[-1]
    bad = replace(a, chunks=(a.chunks[0], replace(last, end_s=last.end_s + delta)))
    assert codes([bad, plan_b()]) == {"duration"}


def test_duration_uses_start_token_as_prefix() -> None:
    """Costing the second chunk with prefix 0 (a common slip) is caught."""
    a = plan_a()
    c0, c1 = a.chunks
    wrong = c1.start_s + COST.chunk_seconds_on(c1.tokens, 0, c1.instances)
    assert codes([replace(a, chunks=(c0, replace(c1, end_s=wrong))), plan_b()]) == {"duration"}


def test_overlap_between_requests() -> None:
    """Two requests may not use a shared instance at the same time."""
    c0 = chunk(0, 1024, (0,), 0.0)
    a = RequestPlan("a", (c0, chunk(1024, 1500, (0, 1, 2), 1.0)))
    found = validate_plans(PROBLEM, [a, plan_b()])
    assert [v.code for v in found] == ["overlap"]
    assert "instance 2" in found[0].message


def test_back_to_back_is_not_overlap() -> None:
    """A chunk may start on an instance at the very instant another request's chunk ends there."""
    c0 = chunk(0, 1024, (0,), 0.0)
    c1 = chunk(1024, 1500, (0, 1, 2), 1.0)
    assert codes([RequestPlan("a", (c0, c1)), plan_b(start_s=c1.end_s)]) == set()


def test_overlap_with_a_long_earlier_chunk() -> None:
    """A late chunk clashing with a long one is caught even when another chunk sits between."""
    problem = replace(
        PROBLEM,
        requests=(REQ_A, replace(REQ_B, ready_s=None), PendingRequest("c", 0.0, 512, 5.0)),
        availability_s=(0.0, 0.0, 0.0, 0.0),
    )
    long = chunk(0, 1500, (0,), 0.0)
    mid = chunk(0, 512, (0,), 1e-4)  # inside `long`, and over well before `late` starts
    late = chunk(512, 2048, (0, 2), long.end_s - 1e-3)
    assert mid.end_s < late.start_s
    plans = [RequestPlan("a", (long,)), RequestPlan("b", (late,)), RequestPlan("c", (mid,))]
    found = validate_plans(problem, plans)
    assert {(v.code, v.request_id) for v in found} == {("overlap", "b"), ("overlap", "c")}
    assert all("request 'a'" in v.message for v in found)


@pytest.mark.parametrize("field", ["start_s", "end_s"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_bad_time(field: str, value: float) -> None:
    """NaN or infinite times are flagged."""
    a = plan_a()
    c1 = a.chunks[1]
    c1 = replace(c1, start_s=value) if field == "start_s" else replace(c1, end_s=value)
    bad = replace(a, chunks=(a.chunks[0], c1))
    assert codes([bad, plan_b()]) == {"bad_time"}


def test_ensure_valid_raises() -> None:
    """ensure_valid raises InvalidPlanError carrying every violation, listed in its text."""
    with pytest.raises(InvalidPlanError) as info:
        ensure_valid(PROBLEM, [plan_a()])
    err = info.value
    # An invalid plan is a planner bug, not bad user input: the CLI must not report it as one.
    assert not isinstance(err, ValueError)
    assert err.violations == [Violation("missing_plan", "b", err.violations[0].message)]
    assert "missing_plan" in str(err) and "'b'" in str(err)
    assert pickle.loads(pickle.dumps(err)).violations == err.violations


def test_validator_imports_only_data_types() -> None:
    """The validator shares no code with any planner."""
    tree = ast.parse(Path(validator.__file__).read_text())
    imported = {
        node.module for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tetris")
    }
    allowed = {f"tetris.solver.{m}" for m in ("problem", "plan", "cost_model", "cluster")}
    assert imported <= allowed


def test_kv_memory() -> None:
    """With room for 1000 KV tokens an instance, request b's plan puts ⌈512/1⌉ = 512 prefilled
    tokens plus ⌈1024/2⌉ + ⌈512/2⌉ = 768 on instance 2: 1280 > 1000 is flagged; a's plan
    (1024 + 238 = 1262 on instance 0) too."""
    small = linear_cost_model(4, gpus_per_node=2, kv_capacity=1000)
    problem = Problem(small, availability_s=(0.0, 0.0, 1.0, 1.0), requests=(REQ_A, REQ_B))

    def timed(p: RequestPlan) -> RequestPlan:
        # Same chunks, durations from the small model so only memory is wrong.
        out, t = [], 0.0
        for c in p.chunks:
            t = max(t, c.start_s)
            d = small.chunk_seconds_on(c.tokens, c.start_token, c.instances)
            out.append(replace(c, start_s=t, end_s=t + d))
            t += d
        return replace(p, chunks=tuple(out))

    found = validate_plans(problem, [timed(plan_a()), timed(plan_b())])
    assert {(v.code, v.request_id) for v in found} == {("kv_memory", "a"), ("kv_memory", "b")}
    messages = {v.request_id: v.message for v in found}
    assert "instance 0 would hold 1262" in messages["a"]
    assert "instance 2 would hold 1280" in messages["b"]


def test_structure_only_mode_ignores_times() -> None:
    """timing=False skips time, duration and overlap checks but still checks the structure."""
    a = plan_a()
    late = replace(a, chunks=(replace(a.chunks[0], start_s=-5.0, end_s=99.0), a.chunks[1]))
    assert validate_plans(PROBLEM, [late, plan_b()], timing=False) == []
    unnested = replace(a, chunks=(replace(a.chunks[0], instances=(1,)), a.chunks[1]))
    unnested = replace(unnested, chunks=(unnested.chunks[0], replace(a.chunks[1], instances=(0,))))
    found = {v.code for v in validate_plans(PROBLEM, [unnested, plan_b()], timing=False)}
    assert found == {"nesting"}


def test_large_absolute_clock_times() -> None:
    """On a clock reading 1.7e9 s, a plan timed exactly by the cost model validates: tolerances
    grow with the ulp of the clock (end − start is rounded there)."""
    now = 1.7e9
    req = PendingRequest("late", arrival_s=now, prompt_tokens=1500, ttft_slo_s=5.0)
    problem = Problem(COST, availability_s=(now,) * 4, requests=(req,), now_s=now)
    c0 = chunk(0, 1024, (0,), now)
    plan = RequestPlan("late", (c0, then(c0, 1500, (0, 1))))
    assert validate_plans(problem, [plan]) == []
