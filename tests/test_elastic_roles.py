"""Elastic roles: the cluster layout, the decision checks, both role planners on hand-made
states, and role changes executed by the simulator (scripted, with hand-worked timelines)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import linear_cost_model
from tests.test_network import drain
from tetris.cli.main import main
from tetris.simulator.disaggregated import DisaggregatedSimulator, SimOptions
from tetris.simulator.events import EventQueue
from tetris.simulator.network import Network
from tetris.simulator.records import Outage, SimOutcome, SimRequest
from tetris.solver.cluster import ClusterSpec
from tetris.solver.cost_model import CostModel
from tetris.solver.plan import ChunkSpec
from tetris.solver.policy.cdsp import CdspPolicy
from tetris.solver.policy.ledger import Ledger, LedgerError
from tetris.solver.policy.roles import (
    DECODE,
    PREFILL,
    TO_PREFILL,
    RoleDecision,
    RoleError,
    RoleState,
    ThresholdRoles,
    check_role_decision,
    pick_to_decode,
    pick_to_prefill,
)
from tetris.solver.policy.roles_cp_sat import OptimizedRoles
from tetris.solver.policy.settings import PolicySettings
from tetris.solver.policy.view import Launch, SolverClock

CAP = 100_000


def state(roles: str, *, free: str = "", kv: tuple[int, ...] = (), **kw: Any) -> RoleState:
    """roles as letters: p prefill, d decode, x draining; `free`: the GPUs (by index) that
    may decode now."""
    names = {"p": PREFILL, "d": DECODE, "x": TO_PREFILL}
    n = len(roles)
    fields: dict[str, Any] = dict(
        now_s=100.0, roles=tuple(names[c] for c in roles), changed_s=(-math.inf,) * n,
        prefill_free=tuple(str(g) in free.split(",") for g in range(n)),
        decode_kv=kv or (0,) * n, kv_capacity=CAP, prefill_backlog_s=0.0,
        decode_waiting_kv=0, prefill_kv=0, prefill_rate=0.0, kv_in_rate=0.0,
        kv_out_rate=0.0)
    fields.update(kw)
    return RoleState(**fields)


# -- layout ------------------------------------------------------------------------------------
def test_an_elastic_cluster_puts_both_roles_of_gpu_i_on_its_node() -> None:
    """12 GPUs on 8-GPU nodes: prefill i and decode 12+i on node i // 8, GPU i, NIC i."""
    c = ClusterSpec(prefill_instances=12, decode_instances=12, gpus_per_node=8, elastic=True)
    assert c.total_gpus == 12 and c.num_instances == 24
    assert [c.node_of(i) for i in (0, 7, 8, 11, 12, 19, 20, 23)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert c.gpu_of(20) == 8 and c.local_rank(20) == c.local_rank(8) == 0
    assert c.local_rank(19) == 7
    with pytest.raises(ValueError, match="one prefill and one decode instance per GPU"):
        ClusterSpec(prefill_instances=4, decode_instances=3, elastic=True)
    with pytest.raises(ValueError, match="must be prefill instance i's"):
        ClusterSpec(prefill_instances=2, decode_instances=2, elastic=True, nodes=(0, 1, 1, 0))


def test_the_network_gives_both_roles_of_a_gpu_its_own_links() -> None:
    """GPU 1's decode role (instance 3) receives on GPU 1's NVLink: a send 0 -> 3 and a send
    2 -> 1 share the way into GPU 1, so each runs at half; a GPU's own KV moves at once."""
    cm = linear_cost_model(2)
    cluster = ClusterSpec(prefill_instances=2, decode_instances=2, elastic=True)
    events = EventQueue()
    net = Network(cluster, cm.hardware, events)
    bw = cm.hardware.intra_node_bandwidth
    assert net.path(0, 3)[0] == net.path(2, 1)[0] == (0, 3)  # out of GPU 0, into GPU 1
    net.start(0, 3, bw, 0.0, "a")
    net.start(2, 1, bw, 0.0, "b")  # GPU 0 (decode role) to GPU 1 (prefill role)
    local = net.start(1, 3, 1e12, 0.0, "own")
    ends = drain(net, events)
    assert ends["own"] == 0.0 and local.links == ()
    lat = cm.hardware.intra_node_latency_s
    assert ends["a"] == pytest.approx(2.0 + lat) and ends["b"] == pytest.approx(2.0 + lat)


# -- the ledger --------------------------------------------------------------------------------
def test_parking_never_strands_kv_of_a_request_still_prefilling() -> None:
    """A prefill instance holding a half-prefilled prompt cannot park; once the prompt is done
    (its KV waits for decode) it can, and its KV still leaves by its hand-off; a parked or
    closed instance takes no work and shows no decode room."""
    ledger = Ledger(2, 2, PolicySettings(), elastic=True)
    ledger.arrive("a", 0.0, 200, 10.0)
    ledger.launch(Launch("a", ChunkSpec(0, 100, (0,))), 0.0, 0.1)
    ledger.chunk_ended("a", 0.1)
    assert not ledger.may_park(0) and ledger.may_park(1)
    with pytest.raises(LedgerError, match="still prefilling"):
        ledger.park(0)
    ledger.launch(Launch("a", ChunkSpec(100, 200, (0,))), 0.1, 0.1)
    assert not ledger.may_park(0)  # busy
    ledger.chunk_ended("a", 0.1)
    assert ledger.may_park(0)
    ledger.park(0)
    assert not ledger.idle((0,)) and ledger.view(1.0).availability_s[0] > 1e5
    # GPU 0's decode role: its room is less the 200 prefill KV tokens still there.
    assert ledger.decode_loads()[0].reserved_tokens == 200
    ledger.close_decode(1)
    assert ledger.decode_loads()[1].reserved_tokens > 1 << 60
    ledger.open_decode(1)
    assert ledger.decode_loads()[1].reserved_tokens == 0 and ledger.decode_empty(1)


# -- decisions ---------------------------------------------------------------------------------
def test_a_decision_that_could_strand_work_or_empty_a_role_is_refused() -> None:
    s = state("ppdd", free="1")
    check_role_decision(RoleDecision(to_decode=(1,), to_prefill=(2,)), s)
    for bad, match in (((0,), "not an idle prefill GPU"), ((2,), "not an idle prefill GPU"),
                       ((7,), "does not exist")):
        with pytest.raises(RoleError, match=match):
            check_role_decision(RoleDecision(to_decode=bad), s)
    with pytest.raises(RoleError, match="its role is prefill"):
        check_role_decision(RoleDecision(to_prefill=(0,)), s)
    with pytest.raises(RoleError, match="twice"):
        check_role_decision(RoleDecision(to_decode=(1,), to_prefill=(1,)), s)
    with pytest.raises(RoleError, match=r"1 decode GPU.*decode 2"):  # the floor: 2
        check_role_decision(RoleDecision(to_prefill=(2,)), replace(s, decode_floor=2))
    with pytest.raises(RoleError, match="leaves 0 prefill"):
        check_role_decision(RoleDecision(to_decode=(0,)), state("pddd", free="0"))


def test_threshold_moves_one_gpu_to_the_side_over_its_mark() -> None:
    """4 GPUs 2+2, interval 2 s. Decode KV 190k + 10k waiting of 200k: 1.0 > 0.85, prefill
    at 0.2 one-GPU s/s is 0.1 per GPU (0.2 with one GPU: < 0.5): GPU 1 (free) decodes.
    Prefill arriving at 1.9 one-GPU s/s is 0.95 per GPU (> 0.85) with decode at 50k of 200k
    (0.5 with one GPU: < 0.85): the emptier decode GPU, 3, goes to prefill."""
    planner = ThresholdRoles(interval_s=2.0, dwell_s=10.0)
    busy_decode = state("ppdd", free="1", kv=(0, 0, 100_000, 90_000), decode_waiting_kv=10_000,
                        prefill_rate=0.2)
    assert planner.decide(busy_decode) == RoleDecision(to_decode=(1,))
    busy_prefill = state("ppdd", kv=(0, 0, 30_000, 20_000), prefill_rate=1.9)
    assert planner.decide(busy_prefill) == RoleDecision(to_prefill=(3,))
    # Within its dwell a GPU stays; both sides under their marks: nothing moves.
    recent = replace(busy_prefill, changed_s=(0.0, 0.0, 95.0, 95.0))
    assert planner.decide(recent).empty
    assert planner.decide(state("ppdd", free="0,1", prefill_rate=0.5)).empty


def test_prefill_leaves_its_emptiest_node_first_and_joins_its_fullest() -> None:
    """Two 4-GPU nodes, prefill on GPUs 0-2 and 4: GPU 4 (node 1, one prefill GPU) decodes
    first even though GPU 1 is free too; a GPU joins prefill on node 0 (3 prefill GPUs), the
    emptier decode GPU there (3) rather than the empty one on node 1."""
    s = state("pppdpddd", free="1,4", kv=(0, 0, 0, 5, 0, 0, 9, 7), nodes=(0,) * 4 + (1,) * 4)
    assert pick_to_decode(s, 2, 0.0) == (4,)
    assert pick_to_prefill(s, 2, 0.0) == (3,)


def test_the_optimizer_moves_gpus_where_the_horizon_is_short() -> None:
    """16 GPUs 8+8, decode full (8 × 100k) with 400k waiting, prefill needing 2 GPUs: it turns
    free prefill GPUs to decode, at most 16 // 8 = 2 per decision, highest-numbered first.
    The mirror case (prefill
    backlog of 60 one-GPU seconds, decode nearly empty, KV freed at 2,500 tokens/s per GPU)
    turns two decode GPUs to prefill: of those that drain within one 2 s step (up to 5,000
    tokens: GPUs 9, 11, 15, 8) the fullest two, 8 and 15, which leave the least room idle while
    they drain. Balanced: nothing moves."""
    planner = OptimizedRoles(interval_s=2.0, horizon_s=20.0, dwell_s=10.0)
    decode_short = state("p" * 8 + "d" * 8, free="4,5,6,7", kv=(0,) * 8 + (CAP,) * 8,
                         decode_waiting_kv=400_000, prefill_rate=2.0, kv_out_rate=50_000.0,
                         kv_in_rate=50_000.0)
    d = planner.decide(decode_short)
    assert d.to_decode == (7, 6) and not d.to_prefill and d.solver_s > 0
    kv = (0,) * 8 + (5_000, 1_000, 9_000, 3_000, 8_000, 7_000, 6_000, 4_000)
    prefill_short = state("p" * 8 + "d" * 8, kv=kv, prefill_backlog_s=60.0, prefill_rate=8.0,
                          kv_out_rate=20_000.0, kv_in_rate=20_000.0)
    d = planner.decide(prefill_short)
    assert sorted(d.to_prefill) == [8, 15] and not d.to_decode
    check_role_decision(d, prefill_short)
    balanced = state("p" * 8 + "d" * 8, free="7", kv=(0,) * 8 + (50_000,) * 8,
                     prefill_rate=4.0, kv_out_rate=10_000.0, kv_in_rate=10_000.0)
    assert planner.decide(balanced).empty


# -- the simulator -----------------------------------------------------------------------------
@dataclass
class Scripted:
    """At t = 0 GPU 1 turns to decode; at t = 2 the decode GPU holding the most KV turns to
    prefill."""

    name: str = "scripted"

    def decide(self, s: RoleState) -> RoleDecision:
        if s.now_s == 0.0:
            return RoleDecision(to_decode=(1,))
        if s.now_s == 2.0:
            busiest = max((g for g, r in enumerate(s.roles) if r == DECODE),
                          key=lambda g: s.decode_kv[g])
            return RoleDecision(to_prefill=(busiest,))
        return RoleDecision()


def elastic_cost_model(gpus: int) -> CostModel:
    base = linear_cost_model(gpus)
    cluster = ClusterSpec(prefill_instances=gpus, decode_instances=gpus, elastic=True)
    return CostModel(base.model, base.hardware, cluster, base.coefficients)


def run_scripted(requests: list[SimRequest], monkeypatch: pytest.MonkeyPatch
                 ) -> tuple[SimOutcome, DisaggregatedSimulator]:
    import tetris.simulator.disaggregated as disaggregated

    monkeypatch.setattr(disaggregated, "make_role_planner", lambda settings: Scripted())
    settings = PolicySettings(quantum_s=None, roles="threshold", role_interval_s=2.0)
    policy = CdspPolicy("tetris-greedy", elastic_cost_model(3), settings,
                        clock=SolverClock.FREE)
    sim = DisaggregatedSimulator(requests, policy, SimOptions(initial_prefill=2))
    return sim.run(), sim


def test_role_changes_move_prefill_and_decode_between_gpus(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """3 GPUs starting 2 prefill + 1 decode; T(c) = 1 ms·c/s, a decode step 1 ms per sequence.
    GPU 1 decodes from t = 0, so 'a' (1,000 tokens at 0.5 s) prefills on GPU 0 alone,
    0.5-1.5 s (on GPUs 0 and 1 it would take 0.5 s). At 2 s a's decode GPU g (it decodes 2,000
    tokens, ~2 s) stops taking requests: 'b' (2.5 s) prefills on GPU 0 alone and decodes on
    the other decode GPU. When 'a' finishes, g prefills: 'c' (arriving after) runs on GPUs 0
    and g, 0.5 s."""
    reqs = [SimRequest("a", 0.5, 1000, 2000, 100.0, 1.0),
            SimRequest("b", 2.5, 1000, 2, 100.0, 1.0),
            SimRequest("c", 6.0, 1000, 2, 100.0, 1.0)]
    out, sim = run_scripted(reqs, monkeypatch)
    a, b, c = out.records
    assert [(k.instances, k.start_s, k.end_s) for k in a.chunks] == [((0,), 0.5, 1.5)]
    (g,) = a.decode_instances
    assert g in (1, 2)
    assert [(k.instances, k.start_s) for k in b.chunks] == [((0,), 2.5)]
    assert b.decode_instances != (g,)
    done = a.finish_s
    assert done is not None and 3.4 < done < 4.0
    assert [(k.instances, k.start_s, k.end_s) for k in c.chunks] == [
        (tuple(sorted((0, g))), 6.0, 6.5)]
    assert out.roles == [(0.0, 2, 1, 0), (0.0, 1, 2, 0), (2.0, 1, 1, 1), (done, 2, 1, 0),
                         (pytest.approx(out.stats["simulated_s"]), 2, 1, 0)]
    assert out.stats["role_changes"] == 3 and sim.ledger.is_empty()


def test_elastic_roles_refuse_failures_and_a_cluster_too_small_for_the_largest_request(
        ) -> None:
    """Failures on an elastic cluster are not simulated; a request whose KV needs every GPU
    for decode leaves none to prefill."""
    settings = PolicySettings(quantum_s=None, roles="threshold")
    policy = CdspPolicy("tetris-greedy", elastic_cost_model(3), settings,
                        clock=SolverClock.FREE)
    with pytest.raises(ValueError, match="not simulated yet"):
        DisaggregatedSimulator([SimRequest("a", 0.0, 10, 2, 1.0, 1.0)], policy,
                               SimOptions(outages=(Outage("prefill", 0, 1.0),)))
    cap = policy.cost_model.kv_capacity_tokens
    big = SimRequest("big", 0.0, 2 * cap, 2, 1e6, 1.0)
    with pytest.raises(ValueError, match="needs 3 decode GPUs"):
        DisaggregatedSimulator([big], policy, SimOptions(initial_prefill=1)).run()


def test_simulate_cli_reports_roles_and_plots_them(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`--roles optimizer` on a small synthetic run: JSON "roles" from (0, 1, 1, 0), every
    point's GPUs summing to the cluster, and the plot written; --plot-roles with fixed roles
    is refused."""
    plot = tmp_path / "roles.png"
    args = ["simulate", "--trace", "synthetic:n=40,rate=4,prompt=fixed(2000),output=fixed(64)",
            "--policy", "tetris-greedy", "--prefill-instances", "1", "--decode-instances",
            "1", "--roles", "optimizer", "--format", "json", "--plot-roles", str(plot)]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["roles"][0] == {"t_s": 0.0, "prefill": 1, "decode": 1, "draining": 0}
    assert all(p["prefill"] + p["decode"] + p["draining"] == 2 for p in out["roles"])
    assert out["metrics"]["finished"] == 40 and plot.stat().st_size > 0
    assert main([*args[:-2], "--roles", "fixed", "--plot-roles", str(plot)]) == 2
    assert "--plot-roles: roles are fixed" in capsys.readouterr().err
