"""Instance failures in the disaggregated simulator: schedules, hand-worked timelines, windows."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.helpers import linear_cost_model
from tetris.cli.main import main
from tetris.evaluation.metrics import failure_metrics, per_request_rows
from tetris.evaluation.sim_config import SimConfig
from tetris.evaluation.whatif import failure_run, simulate_at_rate
from tetris.evaluation.workload_spec import load_workload
from tetris.simulator.disaggregated import DisaggregatedSimulator, SimOptions
from tetris.simulator.events import PRIORITY_COMPLETE, EventQueue
from tetris.simulator.failures import (
    FailureSpec,
    check_outages,
    down_intervals,
    merge_outages,
    node_instances,
    parse_failure,
)
from tetris.simulator.records import Outage, SimOutcome, SimRequest
from tetris.solver.cluster import ClusterSpec
from tetris.solver.cost_model import CostModel
from tetris.solver.policy.cdsp import GREEDY_BASE_S, GREEDY_PER_PAIR_S, CdspPolicy
from tetris.solver.policy.settings import PolicySettings
from tetris.solver.policy.view import SolverClock

MS = 1e-3  # the linear model: a prefill token and a decode step of one sequence take 1 ms


def cost_model(prefill: int, decode: int = 1, *, kv_capacity: int | None = None) -> CostModel:
    """T(c, p, s) = 1 ms·c/s; a decode step = 1 ms per sequence; no fixed costs."""
    base = linear_cost_model(prefill, kv_capacity=kv_capacity)
    cluster = ClusterSpec(prefill_instances=prefill, decode_instances=decode)
    return CostModel(base.model, base.hardware, cluster, base.coefficients)


def req(rid: str, prompt: int, output: int = 1, arrival: float = 0.0) -> SimRequest:
    return SimRequest(rid, arrival, prompt, output, 100.0, 1.0)


def greedy(cm: CostModel, clock: SolverClock = SolverClock.FREE) -> CdspPolicy:
    return CdspPolicy("tetris-greedy", cm, PolicySettings(quantum_s=None), clock=clock)


def run(requests: list[SimRequest], cm: CostModel, *outages: Outage,
        clock: SolverClock = SolverClock.FREE, noise_cv: float = 0.0
        ) -> tuple[SimOutcome, DisaggregatedSimulator]:
    sim = DisaggregatedSimulator(requests, greedy(cm, clock),
                                 SimOptions(noise_cv=noise_cv, outages=tuple(outages)))
    return sim.run(), sim


# -- schedules --------------------------------------------------------------------------------
def test_fixed_syntax_parses_and_refuses_bad_specs() -> None:
    """ROLE:INDEX@DOWN[-UP]; no UP is for good; UP must follow DOWN."""
    assert parse_failure("prefill:3@120").up_s is None
    e = parse_failure("node:1@120-300")
    assert (e.target, e.index, e.down_s, e.up_s) == ("node", 1, 120.0, 300.0)
    for bad in ("prefill:3", "gpu:1@5", "decode:0@80-50", "prefill:-1@3"):
        with pytest.raises(ValueError):
            parse_failure(bad)


def test_nodes_are_prefill_nodes_then_decode_nodes() -> None:
    """8 prefill + 6 decode on 4-GPU nodes: nodes 0-1 prefill, 2-3 decode (3 holds 2)."""
    cluster = ClusterSpec(prefill_instances=8, decode_instances=6, gpus_per_node=4)
    assert node_instances(cluster, 1) == [("prefill", g) for g in range(4, 8)]
    assert node_instances(cluster, 3) == [("decode", 4), ("decode", 5)]
    with pytest.raises(ValueError, match="4 nodes"):
        node_instances(cluster, 4)
    outages = FailureSpec(events=("node:2@10-20",)).outages(cluster, 0.0)
    assert [(o.role, o.index) for o in outages] == [("decode", j) for j in range(4)]
    with pytest.raises(ValueError, match="prefill instance 8"):
        FailureSpec(events=("prefill:8@1",)).outages(cluster, 0.0)


def test_overlapping_outages_of_one_instance_merge_and_windows_union() -> None:
    """Down 10-20 and 15-30 is down 10-30; across instances the down time is their union."""
    merged = merge_outages([Outage("prefill", 0, 15, 30), Outage("prefill", 0, 10, 20),
                            Outage("decode", 0, 40, None), Outage("decode", 0, 50, 60)])
    assert merged == (Outage("prefill", 0, 10, 30), Outage("decode", 0, 40, None))
    assert down_intervals([Outage("prefill", 0, 10, 20), Outage("decode", 1, 15, 25),
                           Outage("prefill", 1, 30, 31)]) == [(10, 25), (30, 31)]


def test_a_schedule_that_loses_a_whole_pool_for_good_is_refused() -> None:
    """Nothing could ever finish without a prefill (or decode) instance left."""
    cluster = ClusterSpec(prefill_instances=2, decode_instances=1)
    assert check_outages([Outage("prefill", 0, 1.0)], cluster) == (1, 1)
    with pytest.raises(ValueError, match="every decode instance"):
        check_outages([Outage("decode", 0, 1.0)], cluster)
    with pytest.raises(ValueError, match="mtbf_s and mttr_s"):
        FailureSpec(mtbf_s=10.0)


def test_mtbf_schedule_is_seeded_and_a_longer_horizon_only_appends() -> None:
    """Same seed, same outages; another seed, others; every failure starts in the horizon."""
    cluster = ClusterSpec(prefill_instances=4, decode_instances=4, gpus_per_node=4)
    spec = FailureSpec(mtbf_s=50.0, mttr_s=5.0, seed=3)
    short, long = spec.outages(cluster, 100.0), spec.outages(cluster, 400.0)
    assert short == spec.outages(cluster, 100.0) and short
    assert short != FailureSpec(mtbf_s=50.0, mttr_s=5.0, seed=4).outages(cluster, 100.0)
    assert all(0 <= o.down_s < 100.0 and o.up_s is not None and o.up_s > o.down_s
               for o in short)
    assert set(short) <= set(long)
    nodes = FailureSpec(mtbf_s=50.0, mttr_s=5.0, unit="node").outages(cluster, 400.0)
    by_time: dict[float, set[str]] = {}
    for o in nodes:
        by_time.setdefault(o.down_s, set()).add(o.role)
    assert all(len(roles) == 1 for roles in by_time.values())  # one node, one pool


# -- hand-worked timelines ----------------------------------------------------------------------
def test_chunk_on_a_failed_instance_is_redone_from_token_0_on_the_survivor() -> None:
    """2 prefill + 1 decode, modelled planner latency w = 0.1 ms + 5 µs × 1 request × 2
    instances. 'a' (1,000 tokens) arrives at 0: decided at 0, it runs on {0, 1} from w
    (SP 2: 0.5 s). Prefill 1 fails at T = 0.3: the chunk is aborted (lost, [w, 0.3]); the
    decision at T puts all 1,000 tokens on instance 0 alone from T + w (1 ms/token: 1.0 s),
    so TTFT = T + w + 1.0 and the request counts one redo."""
    cm = cost_model(2)
    w = GREEDY_BASE_S + GREEDY_PER_PAIR_S * 1 * 2
    out, sim = run([req("a", 1000)], cm, Outage("prefill", 1, 0.3),
                   clock=SolverClock.MODELED)
    rec = out.records[0]
    assert rec.ttft_s == pytest.approx(0.3 + w + 1.0)
    assert rec.redone == 1 and out.stats["redos"] == 1 and out.stats["failures"] == 1
    (lost,) = rec.lost_chunks
    assert (lost.start_token, lost.end_token, lost.instances) == (0, 1000, (0, 1))
    assert (lost.start_s, lost.end_s) == pytest.approx((w, 0.3))
    (chunk,) = rec.chunks
    assert (chunk.start_token, chunk.end_token, chunk.instances) == (0, 1000, (0,))
    assert chunk.start_s == pytest.approx(0.3 + w)
    # Instance 1's busy time ends at the failure; instance 0 ran both chunks.
    assert sim.ledger.busy_s == pytest.approx([0.3 - w + 1.0, 0.3 - w])
    assert sim.ledger.lost == [False, True] and out.outages == (Outage("prefill", 1, 0.3),)


def test_decoding_request_on_a_failed_decode_instance_reprefills_and_continues() -> None:
    """1 prefill + 2 decode, planner free. 'a': 1,000-token prompt, 10 output tokens. Token 1
    at 1.0 s (prefill on 1 instance); its KV (x = transfer of 1,000 tokens) reaches decode 0
    and token i ≥ 2 comes at 1.0 + x + (i − 1) ms. Decode 0 fails at T = 1.0 + x + 3.5 ms,
    after k = 4 tokens: 'a' re-prefills 1,004 tokens (prompt + 4) from T, 1.004 s, whose
    last chunk samples token 5 at T + 1.004; its KV (x' for 1,004 tokens) goes to decode 1
    and tokens 6..10 follow 1 ms apart. Ten tokens in all; the first four keep their times."""
    cm = cost_model(1, decode=2)
    x, x2 = cm.kv_transfer_seconds(1000), cm.kv_transfer_seconds(1004)
    t = 1.0 + x + 3.5 * MS
    out, sim = run([req("a", 1000, output=10)], cm, Outage("decode", 0, t))
    rec = out.records[0]
    before = [1.0] + [1.0 + x + i * MS for i in range(1, 4)]
    five = t + 1.004
    after = [five] + [five + x2 + i * MS for i in range(1, 6)]
    assert list(rec.token_times) == pytest.approx(before + after)
    assert rec.redone == 1 and rec.decode_instances == (1,)
    assert [(c.start_token, c.end_token) for c in rec.chunks] == [(0, 1004)]
    assert [(c.start_token, c.end_token) for c in rec.lost_chunks] == [(0, 1000)]
    assert rec.kv_transfer_s == pytest.approx(x2)
    assert sim.ledger.is_empty() and sim.decode.idle()


def test_instances_back_serve_again() -> None:
    """1 prefill + 1 decode, planner free. Prefill 0 is down 0.5-2.0: 'a' (1,000 tokens, 5
    out, at 0) loses its chunk at 0.5; 'b' (1,500 tokens, 1 out) arrives at 1.0 while nothing
    can prefill. Back at 2.0, the shorter 'a' goes first (total TTFT 3.0 + 3.5 beats
    2.5 + 4.5): 'a' 2.0-3.0, 'b' 3.0-4.5 (TTFT 3.5). 'a' decodes: token i at
    3.0 + x + (i − 1) ms. Decode 0 is down from td = 3.0 + x + 2.5 ms (3 tokens out) to 6.0:
    'a' re-prefills 1,003 tokens after 'b', 4.5-5.503 (token 4 at 5.503), waits for decode 0,
    and its KV (x' for 1,003 tokens) leaves at 6.0: token 5 at 6.0 + x' + 1 ms."""
    cm = cost_model(1, decode=1)
    x, x2 = cm.kv_transfer_seconds(1000), cm.kv_transfer_seconds(1003)
    td = 3.0 + x + 2.5 * MS
    out, sim = run([req("a", 1000, output=5), req("b", 1500, output=1, arrival=1.0)], cm,
                   Outage("prefill", 0, 0.5, 2.0), Outage("decode", 0, td, 6.0))
    a, b = out.records
    assert [c.start_s for c in a.lost_chunks] == pytest.approx([0.0, 2.0])
    assert b.chunks[0].start_s == pytest.approx(3.0) and b.ttft_s == pytest.approx(3.5)
    assert list(a.token_times) == pytest.approx(
        [3.0, 3.0 + x + MS, 3.0 + x + 2 * MS, 5.503, 6.0 + x2 + MS])
    assert a.redone == 2 and b.redone == 0
    assert out.stats["failures"] == out.stats["recoveries"] == 2 and sim.ledger.is_empty()


def test_failure_at_a_chunks_end_aborts_only_the_kv_transfer() -> None:
    """2 prefill + 1 decode, planner free: 'a' (1,000 tokens) runs on {0, 1}, 0-0.5 s, and
    prefill 1 fails at exactly 0.5. Completions come first, so the chunk is done (token 1 at
    0.5); with 1 output token 'a' is finished, but with 2 its KV was leaving {0, 1} for decode:
    that transfer is aborted, and 'a' re-prefills 1,001 tokens on instance 0, 0.5-1.501,
    whose last chunk samples token 2 — done, without ever decoding."""
    one, _ = run([req("a", 1000, output=1)], cost_model(2), Outage("prefill", 1, 0.5))
    assert one.records[0].redone == 0 and list(one.records[0].token_times) == [0.5]
    two, sim = run([req("a", 1000, output=2)], cost_model(2), Outage("prefill", 1, 0.5))
    rec = two.records[0]
    assert rec.redone == 1 and list(rec.token_times) == pytest.approx([0.5, 1.501])
    assert [(c.end_token, c.instances) for c in rec.chunks] == [(1001, (0,))]
    assert sim.decode.steps == 0 and sim.ledger.is_empty()


def test_a_healthy_run_is_unchanged_by_the_failure_machinery() -> None:
    """No outages: no failure events, no failure stats, every record never redone."""
    cm = cost_model(2, decode=2)
    rs = [req(str(i), 300 + 97 * i, output=1 + i % 4, arrival=0.03 * i) for i in range(12)]
    out, sim = run(rs, cm)
    assert sim.failures is None and "redos" not in out.stats and out.outages == ()
    assert all(r.redone == 0 and not r.lost_chunks for r in out.records)


def test_event_cancel_removes_only_the_matching_events() -> None:
    """Cancelled events never pop; the rest keep their order."""
    q = EventQueue()
    for i, kind in enumerate("abcab"):
        q.push(float(5 - i), PRIORITY_COMPLETE, kind, i)
    gone = q.cancel(lambda e: e[3] == "a")
    assert sorted(e[4] for e in gone) == [0, 3]
    assert [q.pop()[4] for _ in range(len(q))] == [4, 2, 1]


# -- every request still finishes -----------------------------------------------------------------
outage = st.tuples(st.sampled_from(["prefill", "decode"]), st.integers(0, 2),
                   st.floats(0.0, 3.0), st.one_of(st.none(), st.floats(0.01, 2.0)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(outage, max_size=6),
       lengths=st.lists(st.tuples(st.integers(100, 4000), st.integers(1, 12),
                                  st.floats(0.0, 2.0)), min_size=1, max_size=10),
       noise=st.sampled_from([0.0, 0.3]))
def test_with_random_failures_every_request_finishes_and_the_ledger_empties(
        specs: list[tuple[str, int, float, float | None]],
        lengths: list[tuple[int, int, float]], noise: float) -> None:
    """Any schedule that leaves a prefill and a decode instance for good: every request gets
    exactly its output tokens, in order, and the ledger ends empty (3 prefill, 2 decode; KV
    room of 3,000 tokens, so long prompts need SP on prefill and split decode KV)."""
    cm = cost_model(3, decode=2, kv_capacity=3000)
    outages = [Outage(role, i % (3 if role == "prefill" else 2), down,
                      None if up is None else down + up) for role, i, down, up in specs]
    for role, count in (("prefill", 3), ("decode", 2)):
        if {o.index for o in outages if o.role == role and o.up_s is None} == set(range(count)):
            outages = [o for o in outages if not (o.role == role and o.index == 0)]
    alive = check_outages(merge_outages(outages), cm.cluster)
    # Whatever must fit on the survivors (the simulator refuses the rest up front).
    assume(all(p + n <= 3000 * min(alive) for p, n, _ in lengths))
    rs = [req(str(k), p, output=n, arrival=a) for k, (p, n, a) in enumerate(lengths)]
    out, sim = run(rs, cm, *merge_outages(outages), noise_cv=noise)
    for r in out.records:
        assert len(r.token_times) == r.request.output_tokens
        assert list(r.token_times) == sorted(r.token_times)
        c, prompt = r.chunks, r.request.prompt_tokens
        assert c[0].start_token == 0
        assert all(x.end_token == y.start_token for x, y in itertools.pairwise(c))
        # The last prefill fed the prompt plus the tokens out before its redo.
        assert prompt <= c[-1].end_token < prompt + r.request.output_tokens
        assert r.redone or c[-1].end_token == prompt
    assert sim.ledger.is_empty() and sim.decode.idle()
    assert all(i.kv_tokens == 0 for i in sim.decode.instances)
    assert sum(r.redone for r in out.records) == out.stats.get("redos", 0)


# -- metrics and what-if ------------------------------------------------------------------------
TRACE = ("synthetic:n=60,rate=2,prompt=uniform(lo=1000;hi=8000),"
         "output=uniform(lo=3;hi=12),seed=1")
SMALL = SimConfig(model="llama3-8b", prefill_instances=2, decode_instances=2, gpus_per_node=2)


def test_windows_split_requests_by_arrival() -> None:
    """Arrivals before 5 s, in [5, 10) and after 10 s land in before / during / after."""
    cm = cost_model(2, decode=1)
    rs = [req(str(i), 500, output=2, arrival=float(i)) for i in range(15)]
    out, _ = run(rs, cm, Outage("prefill", 1, 5.0, 10.0))
    m = failure_metrics(out.records, down_intervals(out.outages))
    w = m["failure_windows"]
    assert [w[k]["requests"] for k in ("before", "during", "after")] == [5, 5, 5]
    assert m["failures"]["down_intervals"] == [[5.0, 10.0]]
    assert all(0.0 <= w[k]["slo_attainment"] <= 1.0 for k in w)
    assert {row["redone"] for row in per_request_rows(out.records)} <= {0, 1}


def test_whatif_reports_before_during_after_next_to_the_healthy_run() -> None:
    """Losing prefill 1 (half the prefill pool) for 10 s at the trace's own rate: the three
    windows cover every request, the same windows of the healthy run are there too, and
    losing an instance never helps the requests that arrived while it was down."""
    workload = load_workload(TRACE)
    spec = FailureSpec(events=("prefill:1@8-18",))
    result = failure_run(workload, "tetris-greedy", SMALL, None, spec)
    w, h = result.metrics["failure_windows"], result.metrics["healthy_windows"]
    assert sum(w[k]["requests"] for k in w) == 60
    assert [w[k]["requests"] for k in w] == [h[k]["requests"] for k in h]
    assert w["during"]["requests"] > 0 and w["after"]["requests"] > 0
    assert w["during"]["ttft_p90_s"] >= h["during"]["ttft_p90_s"]
    assert result.stats["failures"] == 1 and result.stats["recoveries"] == 1
    assert result.metrics["finished"] == 60
    with pytest.raises(ValueError, match="disaggregated"):
        simulate_at_rate(workload, "loongserve", SMALL, None, failures=spec)


CLI = ["--trace", TRACE, "--model", "llama3-8b", "--prefill-instances", "2",
       "--decode-instances", "2", "--gpus-per-node", "2", "--static-sp", "1",
       "--distserve-group", "1", "--format", "json"]


def cli(capsys: pytest.CaptureFixture[str], *args: str, rc: int = 0) -> tuple[Any, str]:
    code = main([*args, *CLI])
    out, err = capsys.readouterr()
    assert code == rc, err
    return (json.loads(out) if rc == 0 else None), err


def test_whatif_cli_lose_node_at_the_traces_rate(capsys: pytest.CaptureFixture[str]) -> None:
    """`whatif --fail node:0@8-18`: no search, one row per policy at the trace's own rate with
    the windows of the failing and the healthy run; LoongServe is left out of the default."""
    out, _ = cli(capsys, "whatif", "--fail", "node:0@8-18", "--fail", "decode:1@5")
    assert out["failures"]["events"] == ["node:0@8-18", "decode:1@5"]
    assert "loongserve" not in out["policies"]
    for res in out["policies"].values():
        assert res["search"] is None
        (row,) = res["at_rates"]
        assert row["rate_rps"] == pytest.approx(out["trace"]["mean_rate_rps"])
        assert set(row["failure_windows"]) == set(row["healthy_windows"]) == {
            "before", "during", "after"}
        assert row["failures"]["down_intervals"] == [[5.0, None]]
        assert row["failure_windows"]["after"]["requests"] == 0  # decode 1 never comes back


def test_simulate_cli_random_failures_are_reproducible(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`simulate --mtbf-s --mttr-s`: seeded; the metrics carry windows and redo counts."""
    args = ("simulate", "--policy", "tetris-greedy", "--mtbf-s", "20", "--mttr-s", "3")
    first, _ = cli(capsys, *args)
    again, _ = cli(capsys, *args)
    m = first["metrics"]
    assert m["failures"] == again["metrics"]["failures"] and m["failures"]["down_intervals"]
    assert m["finished"] == m["requests"] == 60
    assert sum(w["requests"] for w in m["failure_windows"].values()) == 60
    assert first["stats"]["failures"] >= 1


@pytest.mark.parametrize(("args", "message"), [
    (("simulate", "--mtbf-s", "10"), "--mttr-s"),
    (("simulate", "--fail", "node:7@1"), "node 7"),
    (("simulate", "--fail", "prefill:0@1", "--fail", "prefill:1@2"), "every prefill"),
    (("simulate", "--fail", "prefill:0@oops"), "ROLE:INDEX@DOWN"),
    (("simulate", "--policy", "loongserve", "--fail", "prefill:0@1"), "disaggregated"),
    (("whatif", "--policy", "loongserve", "--fail", "prefill:0@1"), "disaggregated"),
])
def test_failure_options_refuse_bad_input_in_one_line(
        capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str) -> None:
    """Each bad failure option exits 2 with one line naming what is wrong."""
    _, err = cli(capsys, *args, rc=2)
    assert message in err and len(err.strip().splitlines()) == 1
