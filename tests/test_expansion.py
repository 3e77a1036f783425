"""The Tetris shape of one request: start on what is free, grow at availability breakpoints."""

from __future__ import annotations

import pytest

from tests.helpers import linear_cost_model, problem, request
from tetris.solver.expansion import expand_plan
from tetris.solver.problem import PendingRequest


def test_starts_on_free_instances_and_expands_at_breakpoint() -> None:
    """4096 tokens, 2 instances free at 0 and 2 more at 1 s, T = 1 ms·c/s.

    By t = 1 the pair prefills 2000 tokens; the nearest block boundary is 2048 (4 blocks), ending
    at 2048/2 ms = 1.024 s. The remaining 2048 tokens on all 4 take 0.512 s: TTFT 1.536 s
    (vs 2.048 s on the pair alone, or 1 + 1.024 s waiting for all four)."""
    cm = linear_cost_model(4)
    p = problem(cm, (0, 0, 1, 1), request("a", 4096))
    plan = expand_plan(p, p.requests[0], [p.free_at(g) for g in range(4)], cap=4)
    assert [(c.start_token, c.end_token, c.instances) for c in plan.chunks] == [
        (0, 2048, (0, 1)), (2048, 4096, (0, 1, 2, 3)),
    ]
    assert plan.chunks[0].end_s == pytest.approx(1.024)
    assert plan.chunks[1].start_s == pytest.approx(1.024)
    assert plan.prefill_end_s == pytest.approx(1.536)


def test_rounding_down_waits_and_up_overruns() -> None:
    """Same case: "down" cuts at 1536 tokens (0.768 s), then 464 tokens fit before 1 s, under
    one block, so it waits for all four: 2560 tokens / 4 → 1 + 0.64 = 1.64 s. "up" is nearest's
    2048 here (1.536 s)."""
    cm = linear_cost_model(4)
    p = problem(cm, (0, 0, 1, 1), request("a", 4096))
    free = [0.0, 0.0, 1.0, 1.0]
    down = expand_plan(p, p.requests[0], free, cap=4, rounding="down")
    assert [c.end_token for c in down.chunks] == [1536, 4096]
    assert down.chunks[1].start_s == pytest.approx(1.0)
    assert down.prefill_end_s == pytest.approx(1.64)
    up = expand_plan(p, p.requests[0], free, cap=4, rounding="up")
    assert up.prefill_end_s == pytest.approx(1.536)


def test_cap_and_max_chunks_limit_the_shape() -> None:
    """cap=2 never grows past the pair (one chunk, 2.048 s); max_chunks=1 is one chunk too."""
    cm = linear_cost_model(4)
    p = problem(cm, (0, 0, 1, 1), request("a", 4096))
    free = [0.0, 0.0, 1.0, 1.0]
    capped = expand_plan(p, p.requests[0], free, cap=2)
    assert [(c.end_token, c.sp) for c in capped.chunks] == [(4096, 2)]
    assert capped.prefill_end_s == pytest.approx(2.048)
    single = expand_plan(p, p.requests[0], free, cap=4, max_chunks=1)
    assert len(single.chunks) == 1


def test_prefilled_request_keeps_its_kv_group() -> None:
    """A request with 1024 tokens already on instance 3 must keep 3 in every later group."""
    cm = linear_cost_model(4)
    req = PendingRequest("b", 0.0, 3072, 10.0, prefilled_tokens=1024, kv_instances=(3,))
    p = problem(cm, (0, 0, 0, 0.5), req)
    plan = expand_plan(p, req, [p.free_at(g) for g in range(4)], cap=4)
    assert plan.chunks[0].start_token == 1024
    assert plan.chunks[0].start_s == pytest.approx(0.5)
    assert all(3 in c.instances for c in plan.chunks)


def test_prefers_instances_on_the_groups_node() -> None:
    """With 2 GPUs per node and instances 1 and 2 both free, a group holding 0 grows onto 1."""
    cm = linear_cost_model(4, gpus_per_node=2)
    req = PendingRequest("c", 0.0, 4096, 10.0, prefilled_tokens=512, kv_instances=(0,))
    p = problem(cm, (0, 0.2, 0.2, 5), req)
    plan = expand_plan(p, req, [p.free_at(g) for g in range(4)], cap=2)
    assert plan.chunks[-1].instances == (0, 1)


def test_kv_capacity_holds_back_the_first_chunk() -> None:
    """4096 tokens, 2 instances free at 0 and 2 at 1 s, 1280 KV tokens fit per instance.

    Reserve rule: after chunk 0 on 2 instances, the first two must still hold an even share of
    the rest over 4: c/2 + (4096 − c)/4 ≤ 1280 → c ≤ 1024 (ends at 0.512 s). Then nothing more
    fits until all four are free (512 + c/2 + (3072 − c)/4 ≤ 1280 → c ≤ 0): wait to 1 s, and
    the last 3072 tokens on four take 0.768 s: 1.768 s. Instances 0 and 1 end with exactly
    512 + 768 = 1280 tokens (uncapped, the plan ends at 1.536 s with 1536 on them)."""
    cm = linear_cost_model(4, kv_capacity=1280)
    p = problem(cm, (0, 0, 1, 1), request("a", 4096))
    plan = expand_plan(p, p.requests[0], [0.0, 0.0, 1.0, 1.0], cap=4)
    assert [(c.start_token, c.end_token, c.sp) for c in plan.chunks] == [
        (0, 1024, 2), (1024, 4096, 4),
    ]
    assert plan.chunks[0].end_s == pytest.approx(0.512)
    assert plan.chunks[1].start_s == pytest.approx(1.0)
    assert plan.prefill_end_s == pytest.approx(1.768)


def test_kv_capacity_makes_a_single_chunk_wait_for_a_wide_group() -> None:
    """One chunk of 4096 tokens needs ⌈4096/s⌉ ≤ 1280, so s = 4: start at 1 s, end 2.024 s; a
    cap of 2 cannot hold it at all (empty shape)."""
    cm = linear_cost_model(4, kv_capacity=1280)
    p = problem(cm, (0, 0, 1, 1), request("a", 4096), max_chunks=1)
    free = [0.0, 0.0, 1.0, 1.0]
    plan = expand_plan(p, p.requests[0], free, cap=4)
    assert [(c.start_s, c.sp) for c in plan.chunks] == [(1.0, 4)]
    assert plan.prefill_end_s == pytest.approx(2.024)
    assert expand_plan(p, p.requests[0], free, cap=2).chunks == ()
