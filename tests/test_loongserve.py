"""LoongServe baseline: hand-checked schedules on linear cost models, plus its building blocks."""

from __future__ import annotations

import random

import pytest

from tetris.simulator.loongserve import LoongServeOptions, simulate_loongserve
from tetris.simulator.loongserve.predictor import PrefillPredictor
from tetris.simulator.loongserve.prefill_plan import place_prefill_kv, plan_prefill_batches
from tetris.simulator.loongserve.reservation import Reservation
from tetris.simulator.records import SimOutcome, SimRequest
from tetris.solver.cluster import ClusterSpec
from tetris.solver.cost_model import DEFAULT_MEM_UTIL, CostCoefficients, CostModel
from tetris.solver.hardware import HARDWARE_PRESETS
from tetris.solver.model_spec import MODEL_PRESETS

LIN = 1e-3  # s per prompt token on one instance; also the per-sequence decode term


def unified(n: int, *, cap: int = 10_000, step: float = 0.0, decode_fixed: float = 0.0,
            decode_kv: float = 0.0, per_node: int = 8) -> CostModel:
    """N unified instances: prefill T = step·(s−1) + LIN·Σl/s, decode step
    decode_fixed + decode_kv·K + LIN·b, exactly `cap` KV tokens per instance."""
    coefficients = CostCoefficients(
        fixed_s=0.0, step_intra_s=step, step_inter_s=step, lin_s_per_token=LIN,
        attn_s_per_pair=0.0, comm_intra_s_per_token=0.0, comm_inter_s_per_token=0.0,
        decode_fixed_s=decode_fixed, decode_kv_s_per_token=decode_kv,
    )
    model, hardware = MODEL_PRESETS["llama3-8b"], HARDWARE_PRESETS["h100"]
    room = model.weight_bytes + (cap + 0.5) * model.kv_bytes_per_token
    hardware = hardware.model_copy(update={"hbm_bytes": room / DEFAULT_MEM_UTIL})
    cluster = ClusterSpec(prefill_instances=n, decode_instances=0, gpus_per_node=per_node)
    cm = CostModel(model, hardware, cluster, coefficients)
    assert cm.kv_capacity_tokens == cap
    return cm


def req(rid: str, prompt: int, output: int, arrival: float = 0.0) -> SimRequest:
    return SimRequest(rid, arrival, prompt, output, ttft_slo_s=10.0, tbt_slo_s=0.1)


def run(cm: CostModel, *requests: SimRequest, **kw: object) -> SimOutcome:
    out = simulate_loongserve(list(requests), cm, **kw)  # type: ignore[arg-type]
    for rec in out.records:
        assert len(rec.token_times) == rec.request.output_tokens
    return out


def test_lone_request_takes_the_sp_size_the_dp_picks() -> None:
    """T(s) = 0.02(s−1) + 1/s is least at s = 7: the prompt runs there, TTFT = T(7)."""
    out = run(unified(8, step=0.02), req("a", 1000, 1))
    rec = out.records[0]
    assert rec.chunks[0].instances == (0, 1, 2, 3, 4, 5, 6)
    assert rec.ttft_s == pytest.approx(0.12 + 1 / 7)
    assert out.stats["mean_prefill_sp"] == 7


def test_two_requests_together_form_one_batch_under_their_pruned_dp() -> None:
    """Their pruned DP keeps both prompts in one batch on all 4 instances: both TTFTs 1 s."""
    out = run(unified(4), req("long", 3000, 1), req("short", 1000, 1))
    assert [r.chunks[0].instances for r in out.records] == [(0, 1, 2, 3)] * 2
    assert [r.ttft_s for r in out.records] == pytest.approx([1.0, 1.0])


def test_two_requests_together_are_split_by_the_full_dp() -> None:
    """Σ T·Σ1/l: 2+2 instances (1e-3) beats one batch on 4 (1.33e-3): TTFTs 1.5 s and 0.5 s."""
    opts = LoongServeOptions(dp_pruning=False)
    out = run(unified(4), req("long", 3000, 1), req("short", 1000, 1), options=opts)
    long, short = out.records
    assert long.chunks[0].instances == (0, 1) and long.ttft_s == pytest.approx(1.5)
    assert short.chunks[0].instances == (2, 3) and short.ttft_s == pytest.approx(0.5)


def test_one_instance_batches_both_prompts_into_one_iteration() -> None:
    """With one instance the DP has one choice: both prompts in one 4 s iteration."""
    out = run(unified(1), req("a", 3000, 1), req("b", 1000, 1))
    assert [r.ttft_s for r in out.records] == pytest.approx([4.0, 4.0])
    assert out.stats["prefill_iterations"] == 1


def test_decode_steps_follow_the_decode_cost() -> None:
    """One instance: steps of 0.01 + 1e-6·K + 1e-3·1 with K the KV held at the step."""
    out = run(unified(1, decode_fixed=0.01, decode_kv=1e-6), req("a", 1000, 3))
    times = list(out.records[0].token_times)
    assert times == pytest.approx([1.0, 1.012, 1.012 + 0.012001])
    assert out.records[0].decode_instances == (0,)


def test_kv_split_over_instances_decodes_multi_master() -> None:
    """1500 tokens over two 1000-slot instances: the step reads the larger share + one hop."""
    cm = unified(2, cap=1000, step=0.002, decode_fixed=0.01, decode_kv=1e-5)
    out = run(cm, req("a", 1500, 3))
    rec = out.records[0]
    assert rec.chunks[0].instances == (0, 1)
    ttft = 0.002 + LIN * 1500 / 2
    step = 0.01 + 1e-5 * 1000 + LIN * 1 + 0.002
    assert list(rec.token_times) == pytest.approx([ttft, ttft + step, ttft + 2 * step])
    assert rec.decode_instances == (0, 1)


def test_prefill_on_a_decode_instance_stalls_that_decode() -> None:
    """N=1: b's 2 s prefill takes a's instance; a's token gap = 2 s + the next decode step."""
    cm = unified(1, decode_fixed=0.1)
    opts = LoongServeOptions(avg_decoding_time_s=1.0)
    out = run(cm, req("a", 1000, 40), req("b", 2000, 2, arrival=0.5), options=opts)
    a, b = out.records
    admit = 1.0 + 10 * 0.101  # a's prefill, then max_wait_tokens decode steps
    assert a.token_times[10] == pytest.approx(admit)
    assert b.chunks[0].start_s == pytest.approx(admit)
    assert b.ttft_s == pytest.approx(admit + 2.0 - 0.5)
    assert a.token_times[11] - a.token_times[10] == pytest.approx(2.0 + 0.102)
    assert out.stats["stalled_batches"] == 1


def test_cost_benefit_keeps_a_young_decode_batch_running() -> None:
    """Taking a's instance would save b 5e-4 s/token but cost a 0.5/11 s/token: a decodes on."""
    cm = unified(2, decode_fixed=0.1)
    out = run(cm, req("a", 1000, 60), req("b", 1000, 2, arrival=0.1))
    a, b = out.records
    admit = 0.5 + 10 * 0.101
    assert b.chunks[0].instances == (1,)
    assert b.chunks[0].start_s == pytest.approx(admit)
    assert b.ttft_s == pytest.approx(admit + 1.0 - 0.1)
    gaps = [y - x for x, y in zip(a.token_times, a.token_times[1:], strict=False)]
    assert max(gaps) < 0.11
    assert out.stats["stalled_batches"] == 0


def test_cost_benefit_scales_a_short_prefill_into_the_decode_instance() -> None:
    """b = 10 tokens: speedup 5e-4 >= slowdown 0.005/11, so b runs on both instances."""
    cm = unified(2, decode_fixed=0.1)
    out = run(cm, req("a", 1000, 60), req("b", 10, 2, arrival=0.1))
    a, b = out.records
    admit = 0.5 + 10 * 0.101
    assert b.chunks[0].instances == (0, 1)
    assert b.ttft_s == pytest.approx(admit + 0.005 - 0.1)
    assert a.token_times[11] - a.token_times[10] == pytest.approx(0.005 + 0.102)
    assert b.decode_instances == (0,)  # its KV went to the fullest instance (proactive)


def test_memory_limit_makes_a_request_wait() -> None:
    """3000 KV slots: b (1500) cannot be reserved beside a (2000 + 4) until a is done."""
    cm = unified(1, cap=3000, decode_fixed=0.1)
    out = run(cm, req("a", 2000, 5), req("b", 1500, 5, arrival=0.1))
    a, b = out.records
    assert a.finish_s == pytest.approx(2.0 + 4 * 0.101)
    assert b.chunks[0].start_s == pytest.approx(a.finish_s)
    assert out.stats["preemptions"] == 0


def test_compaction_migrates_kv_and_charges_the_transfer() -> None:
    """a decodes on 0, b on 1; before c's prefill b's KV moves onto 0 (the less loaded one
    empties) and c's prefill on 1 starts only after the transfer (the router waits for it)."""
    cm = unified(2, decode_fixed=0.1)
    out = run(cm, req("a", 1000, 100), req("b", 1000, 40, arrival=0.1),
              req("c", 500, 2, arrival=2.6))
    a, b, c = out.records
    assert (a.decode_instances, b.chunks[0].instances) == ((0,), (1,))
    moved = 1000 + 10  # b's prompt and ten decode steps
    transfer = cm.kv_transfer_seconds(moved, cross_node=False)
    assert c.chunks[0].instances == (1,)
    assert c.chunks[0].start_s == pytest.approx(b.token_times[10] + transfer)
    assert b.kv_transfer_s == pytest.approx(transfer)
    assert b.decode_instances == (0,)
    assert out.stats["migrations"] == 1 and out.stats["migrated_tokens"] == moved


def test_request_that_never_fits_is_refused_by_name() -> None:
    """1500 + 600 tokens of KV exceed 2 × 1000 slots: ValueError naming the request."""
    with pytest.raises(ValueError, match="'huge'"):
        simulate_loongserve([req("ok", 10, 2), req("huge", 1500, 600)], unified(2, cap=1000))


def _workload(seed: int, n: int = 40) -> list[SimRequest]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for k in range(n):
        t += rng.expovariate(4.0)
        out.append(req(f"r{k}", rng.randint(50, 6000), rng.randint(1, 60), arrival=t))
    return out


def test_every_token_once_in_order_under_load() -> None:
    """A busy mixed workload: all tokens out, in order, first token at the prefill's end."""
    cm = unified(4, cap=4000, step=1e-3, decode_fixed=0.01, decode_kv=1e-6, per_node=2)
    out = run(cm, *_workload(1), noise_cv=0.2, seed=5)
    for rec in out.records:
        times = list(rec.token_times)
        assert times == sorted(times)
        assert rec.chunks and times[0] == rec.chunks[-1].end_s
        assert rec.chunks[0].start_s >= rec.request.arrival_s
    st = out.stats
    assert int(st["invariant_checks"]) > 100 and int(st["decode_steps"]) > 0
    assert int(st["events"]) > 0 and float(st["wall_s"]) >= 0 and int(st["decisions"]) > 0


def test_deterministic_for_a_seed() -> None:
    """Same seed, same noisy run; another seed, another run."""
    cm = unified(4, cap=4000, decode_fixed=0.01, per_node=2)
    work = _workload(2)
    first = [list(r.token_times) for r in run(cm, *work, noise_cv=0.3, seed=7).records]
    again = [list(r.token_times) for r in run(cm, *work, noise_cv=0.3, seed=7).records]
    other = [list(r.token_times) for r in run(cm, *work, noise_cv=0.3, seed=8).records]
    assert first == again and first != other


def test_predictor_matches_the_cost_model() -> None:
    """`actual` is chunk_seconds(l, 0, s) on both links; the fitted A[s] + B[s]·l + C[s]·l²
    reproduces it without ring overlap (a quadratic) and stays within 30% with overlap."""
    cluster = ClusterSpec(prefill_instances=16, decode_instances=0, gpus_per_node=8)
    cm = CostModel(MODEL_PRESETS["lwm-7b-1m"], HARDWARE_PRESETS["h100"], cluster)
    additive = CostModel(cm.model, cm.hardware, cluster,
                         cm.coefficients.model_copy(update={"ring_overlap": False}))
    for model, rel in ((additive, 1e-6), (cm, 0.3)):
        pred = PrefillPredictor(model)
        for sp in (1, 2, 5, 8, 9, 16):
            for length in (1, 777, 120_000):
                for cross in (False, True):
                    want = model.chunk_seconds(length, 0, sp, cross)
                    assert pred.actual(sp, cross, length, length * length) == \
                        pytest.approx(want)
                assert pred.predict(sp, length, length * length) == \
                    pytest.approx(model.chunk_seconds(length, 0, sp, sp > 8), rel=rel)


def test_reservation_peak_matches_their_formula() -> None:
    """peak_with(held, left) = max_k left_k·k + Σ held over the list sorted by left, desc."""
    rng = random.Random(3)
    for _ in range(200):
        entries = [(rng.randint(1, 50), rng.randint(0, 30)) for _ in range(rng.randint(0, 8))]
        held, left = rng.randint(1, 50), rng.randint(0, 30)
        full = sorted([*entries, (held, left)], key=lambda e: -e[1])
        cum, want = 0, 0
        for k, (h, lft) in enumerate(full, 1):
            cum += h
            want = max(want, lft * k + cum)
        assert Reservation(entries).peak_with(held, left) == want


def test_dp_respects_free_slots_and_covers_everything() -> None:
    """Full DP: every request in one batch, batches on disjoint instance runs that hold them."""
    cm = unified(6)
    pred = PrefillPredictor(cm)
    lengths, left = [9000, 4000, 3000, 800, 20], [10_000, 10_000, 2_000, 10_000, 500, 10_000]
    assert len(plan_prefill_batches(lengths, left, pred) or ()) == 1  # their pruning: one batch
    layout = plan_prefill_batches(lengths, left, pred, prune=False)
    assert layout is not None and len(layout) > 1
    reqs = sorted(i for pb in layout for i in range(pb.first_req, pb.end_req))
    insts = sorted(i for pb in layout for i in range(pb.first_inst, pb.end_inst))
    assert reqs == list(range(5)) and insts == sorted(set(insts))
    for pb in layout:
        assert sum(lengths[pb.first_req:pb.end_req]) <= sum(left[pb.first_inst:pb.end_inst])
    assert plan_prefill_batches([30_000], [10_000, 10_000], pred) is None


def test_prefill_kv_packs_onto_the_fullest_instances() -> None:
    """The migration plan fills the fullest instance of the group first, request by request."""
    order, pieces = place_prefill_kv([700, 500], [3, 1, 2], [0, 900, 200, 0], 1000)
    assert order == [1, 2, 3]
    assert pieces == [[(1, 100), (2, 600)], [(2, 200), (3, 300)]]
