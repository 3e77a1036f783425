"""Disaggregated simulator: event order, decode pool, dispatcher, charging, exact small runs."""

from __future__ import annotations

import pytest

from tests.helpers import linear_cost_model
from tetris.simulator.decode_pool import DecodePool
from tetris.simulator.disaggregated import SimOptions, simulate_disaggregated
from tetris.simulator.events import (
    PRIORITY_ARRIVAL,
    PRIORITY_COMPLETE,
    PRIORITY_DECIDE,
    EventQueue,
)
from tetris.simulator.noise import DurationNoise
from tetris.simulator.records import ChunkRecord, RequestRecord, SimRequest
from tetris.solver.cluster import ClusterSpec
from tetris.solver.cost_model import CostModel
from tetris.solver.plan import ChunkSpec
from tetris.solver.policy.baselines import DistServePolicy, StaticSpPolicy
from tetris.solver.policy.cdsp import GREEDY_BASE_S, GREEDY_PER_PAIR_S, CdspPolicy
from tetris.solver.policy.dispatch import DecodeLoad, choose_decode_instances
from tetris.solver.policy.ledger import Ledger
from tetris.solver.policy.settings import PolicySettings
from tetris.solver.policy.view import Launch, PrefillView, SolverClock
from tetris.solver.problem import PendingRequest


def cost_model(prefill: int, decode: int = 1, *, kv_capacity: int | None = None,
               gpus_per_node: int = 8) -> CostModel:
    """T(c, p, s) = 1 ms·c/s, decode step = 1 ms per sequence (zero fixed costs)."""
    base = linear_cost_model(prefill, gpus_per_node=gpus_per_node, kv_capacity=kv_capacity)
    cluster = ClusterSpec(prefill_instances=prefill, decode_instances=decode,
                          gpus_per_node=gpus_per_node)
    return CostModel(base.model, base.hardware, cluster, base.coefficients)


def req(rid: str, prompt: int, output: int = 1, arrival: float = 0.0,
        slo: float = 100.0) -> SimRequest:
    return SimRequest(rid, arrival, prompt, output, slo, 1.0)


def greedy(cm: CostModel, quantum_s: float | None = None,
           clock: SolverClock = SolverClock.FREE) -> CdspPolicy:
    return CdspPolicy("tetris-greedy", cm, PolicySettings(quantum_s=quantum_s), clock=clock)


def test_same_time_events_pop_completions_then_arrivals_then_decisions() -> None:
    """Events at one instant come out by priority, then in insertion order."""
    q = EventQueue()
    q.push(1.0, PRIORITY_DECIDE, "d")
    q.push(1.0, PRIORITY_ARRIVAL, "a1")
    q.push(1.0, PRIORITY_COMPLETE, "c")
    q.push(0.5, PRIORITY_DECIDE, "early")
    q.push(1.0, PRIORITY_ARRIVAL, "a2")
    assert [q.pop()[3] for _ in range(len(q))] == ["early", "c", "a1", "a2", "d"]


def test_event_queue_rejects_nan_time() -> None:
    """A NaN time would silently corrupt the heap order."""
    with pytest.raises(ValueError, match="NaN"):
        EventQueue().push(float("nan"), 0, "x")


def test_dispatcher_picks_least_loaded_instance_with_room() -> None:
    """Fewest reserved tokens among instances with room and a batch slot."""
    loads = [DecodeLoad(50, 1), DecodeLoad(10, 4), DecodeLoad(5, 8)]
    # Instance 2 has the least KV but a full batch (8 = max_batch).
    assert choose_decode_instances(loads, 40, 100, max_batch=8).instances == (1,)
    assert choose_decode_instances(loads, 60, 100, max_batch=8).instances == (1,)
    assert choose_decode_instances(loads, 95, 100, max_batch=8) is None


def test_dispatcher_splits_kv_over_fewest_instances_when_allowed() -> None:
    """With decode SP, KV too big for one instance is shared in proportion to free room."""
    loads = [DecodeLoad(60, 1), DecodeLoad(20, 1), DecodeLoad(0, 0)]
    placement = choose_decode_instances(loads, 150, 100, max_batch=8, max_sp=3)
    assert placement is not None
    assert placement.instances == (2, 1)  # 100 + 80 free covers 150
    assert sum(placement.shares) == 150
    assert placement.shares == (84, 66)  # 150·100/180 = 83.3, 150·80/180 = 66.7, remainder 1
    assert choose_decode_instances(loads, 230, 100, max_batch=8, max_sp=3) is None


def test_single_request_exact_timeline() -> None:
    """1,000 tokens on 2 free instances: SP 2, 0.5 s; then transfer; then 1 ms decode steps."""
    cm = cost_model(2)
    out = simulate_disaggregated([req("a", 1000, output=3)], greedy(cm))
    rec = out.records[0]
    assert [(c.start_token, c.end_token, c.instances) for c in rec.chunks] == [(0, 1000, (0, 1))]
    assert rec.chunks[0].end_s == pytest.approx(0.5)
    transfer = cm.kv_transfer_seconds(1000)
    assert list(rec.token_times) == pytest.approx(
        [0.5, 0.5 + transfer + 0.001, 0.5 + transfer + 0.002])
    assert rec.decode_instances == (0,)
    assert out.stats["plans_validated"] >= 1


def test_modeled_solver_time_delays_the_launch() -> None:
    """A decision that took w seconds (modelled) launches its chunks at now + w."""
    cm = cost_model(2)
    policy = greedy(cm, clock=SolverClock.MODELED)
    out = simulate_disaggregated([req("a", 1000, arrival=1.0)], policy)
    w = GREEDY_BASE_S + GREEDY_PER_PAIR_S * 1 * 2
    assert out.records[0].chunks[0].start_s == pytest.approx(1.0 + w)
    assert out.stats["solver_s"] == pytest.approx(w)


def test_second_request_waits_for_busy_instances_and_grows_into_them() -> None:
    """B arrives while A holds both instances: B starts when A ends (at 0.5 s), on both."""
    cm = cost_model(2)
    out = simulate_disaggregated([req("a", 1000), req("b", 512, arrival=0.1)], greedy(cm))
    b = out.records[1]
    assert b.chunks[0].start_s == pytest.approx(0.5)
    assert b.first_token_s == pytest.approx(0.5 + 0.512 / 2)


def test_time_slicing_cuts_long_chunks_at_block_boundaries() -> None:
    """Quantum 0.2 s at SP 2 (0.5 ms/token): 1,000 tokens go as 512 + 488 on the same group."""
    cm = cost_model(2)
    out = simulate_disaggregated([req("a", 1000)], greedy(cm, quantum_s=0.2))
    chunks = out.records[0].chunks
    # 0.2 s fits 400 tokens; the block boundary at or below is 0, so one block (512) is cut.
    assert [(c.start_token, c.end_token, c.instances) for c in chunks] == [
        (0, 512, (0, 1)), (512, 1000, (0, 1))]
    assert out.stats["chunks_sliced"] == 2 - 1


def test_static_sp_uses_exactly_its_size_fcfs() -> None:
    """static-sp 2 on 4 instances: two requests run side by side, the third waits."""
    cm = cost_model(4)
    rs = [req("a", 1000), req("b", 1000), req("c", 1000)]
    out = simulate_disaggregated(rs, StaticSpPolicy("static-sp", cm, PolicySettings(static_sp=2)))
    groups = [r.chunks[0].instances for r in out.records]
    assert groups[0] == (0, 1) and groups[1] == (2, 3)
    assert out.records[2].chunks[0].start_s == pytest.approx(0.5)
    assert all(len(r.chunks) == 1 for r in out.records)


def test_distserve_keeps_fixed_groups() -> None:
    """distserve groups of 2 on 5 instances: groups {0,1} and {2,3}; instance 4 never used."""
    cm = cost_model(5)
    rs = [req(str(i), 600) for i in range(5)]
    out = simulate_disaggregated(rs, DistServePolicy("distserve", cm,
                                                     PolicySettings(distserve_group=2)))
    used = {r.chunks[0].instances for r in out.records}
    assert used == {(0, 1), (2, 3)}


def test_decode_memory_limit_makes_requests_wait() -> None:
    """Decode KV room for one request at a time: the second decodes after the first frees."""
    cm = cost_model(1, kv_capacity=1100)
    rs = [req("a", 1000, output=5), req("b", 1000, output=5)]
    out = simulate_disaggregated(rs, greedy(cm))
    a, b = out.records
    assert b.token_times[1] > a.token_times[-1]


def test_decode_joins_at_step_boundaries() -> None:
    """Batch of 2 steps take 2 ms; a KV arriving mid-step joins the next step."""
    events = EventQueue()
    cm = cost_model(1)
    ledger = Ledger(1, 1, PolicySettings())
    pool = DecodePool(cm, ledger, events, DurationNoise())
    a = RequestRecord(req("a", 10, output=4))
    b = RequestRecord(req("b", 10, output=2))
    for r in (a, b):  # both prefilled on prefill instance 0, as the simulator reports it
        ledger.arrive(r.request_id, 0.0, 10, 100.0)
        ledger.launch(Launch(r.request_id, ChunkSpec(0, 10, (0,))), 0.0, 0.0)
        ledger.chunk_ended(r.request_id, 0.0)
    a.token_times.append(0.0)
    pool.chunk_ended(a, ChunkRecord(0, 10, (0,), 0.0, 0.0), True, 0.0)
    t_arrive = cm.kv_transfer_seconds(10)
    t_b = t_arrive + 0.0005  # b's first token, just after a's KV arrived
    b.token_times.append(t_b)
    b_ended = False
    while events:
        if not b_ended and (events.peek_time() or 0.0) > t_b:
            pool.chunk_ended(b, ChunkRecord(0, 10, (0,), 0.0, t_b), True, t_b)
            b_ended = True
        now, _, _, kind, payload = events.pop()
        pool.handle(kind, payload, now)
    # a: steps of 1 ms alone, then with b (2 ms) once b's KV is in.
    assert a.token_times[1] == pytest.approx(t_arrive + 0.001)
    assert b.token_times[1] == pytest.approx(a.token_times[2])
    assert a.token_times[2] - a.token_times[1] == pytest.approx(0.002)
    assert pool.idle() and ledger.is_empty()


def test_refuses_requests_that_can_never_fit() -> None:
    """A prompt whose KV exceeds every prefill instance together is refused up front."""
    cm = cost_model(2, kv_capacity=100)
    with pytest.raises(ValueError, match="request 'big'"):
        simulate_disaggregated([req("big", 500)], greedy(cm))


def test_refuses_up_front_what_a_baselines_fixed_group_cannot_hold() -> None:
    """KV of 100 tokens per instance on 4: 300 tokens fit a CDSP group of 4, but not
    distserve's or static-sp's group of 2, which refuse the request before running."""
    cm = cost_model(4, 4, kv_capacity=100)  # decode KV may spread over the 4 decode ones
    assert simulate_disaggregated([req("ok", 300)], greedy(cm)).records
    for policy in (DistServePolicy("distserve", cm, PolicySettings(distserve_group=2)),
                   StaticSpPolicy("static-sp", cm, PolicySettings(static_sp=2))):
        with pytest.raises(ValueError, match=r"request 'ok'.* 2 prefill instance"):
            simulate_disaggregated([req("ok", 300)], policy)


def test_noise_is_deterministic_for_a_seed() -> None:
    """Same seed, same records; another seed, other times."""
    cm = cost_model(4, decode=2)
    rs = [req(str(i), 600 + 100 * i, output=4, arrival=0.05 * i) for i in range(8)]

    def times(seed: int) -> list[float]:
        out = simulate_disaggregated(rs, greedy(cm), SimOptions(seed=seed, noise_cv=0.2))
        return [t for r in out.records for t in r.token_times]

    assert times(1) == times(1)
    assert times(1) != times(2)


def test_every_request_finishes_with_all_tokens_in_order() -> None:
    """A mixed load: every token produced once, times non-decreasing, plans validated."""
    cm = cost_model(4, decode=2)
    rs = [req(str(i), 300 + 97 * i, output=1 + i % 5, arrival=0.03 * i) for i in range(30)]
    out = simulate_disaggregated(rs, CdspPolicy("g", cm, PolicySettings(quantum_s=0.1)))
    for r in out.records:
        assert len(r.token_times) == r.request.output_tokens
        assert list(r.token_times) == sorted(r.token_times)
        assert r.chunks[0].start_s >= r.request.arrival_s
        assert r.chunks[-1].end_token == r.request.prompt_tokens
    assert int(out.stats["plans_validated"]) >= len(rs)


def test_time_slice_of_an_expanding_plan_keeps_kv_within_memory() -> None:
    """KV room for 2,000 tokens per instance: a 2,500-token prompt starting on the one idle
    instance must grow later; slicing its first chunk validates against that growth (the
    whole rest on the first instance alone would not fit)."""
    cm = cost_model(2, kv_capacity=2000)
    r = PendingRequest("a", 0.0, 2500, 100.0)
    view = PrefillView(0.0, (0.0, 5.0), (True, False), (r,), 0.0)
    decision = greedy(cm, quantum_s=0.1).decide(view)
    (launch,) = decision.launches
    assert launch.chunk.instances == (0,)
    assert launch.chunk.end_token == 512  # 0.1 s fits 100 tokens: one block
    assert decision.stats["chunks_sliced"] == 1
