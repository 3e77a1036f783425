"""The simulator's network (links shared by KV transfers) and the KV hand-off streamed over it:
hand-worked shares, multi-rail receive, and the token 1 → 2 gap of long prompts."""

from __future__ import annotations

import pytest

from tetris.evaluation.metrics import compute_metrics
from tetris.evaluation.policies import run_policy
from tetris.evaluation.sim_config import SimConfig
from tetris.evaluation.workload_spec import load_workload
from tetris.simulator.disaggregated import simulate_disaggregated
from tetris.simulator.events import EventQueue
from tetris.simulator.network import KV_SENT, Network
from tetris.simulator.records import SimRequest
from tetris.solver.cluster import ClusterSpec
from tetris.solver.cost_model import CostModel
from tetris.solver.hardware import HARDWARE_PRESETS, HardwareSpec
from tetris.solver.model_spec import MODEL_PRESETS
from tetris.solver.plan import ChunkSpec
from tetris.solver.policy.cdsp import CdspPolicy
from tetris.solver.policy.dispatch import DecodeLoad, choose_decode_instances
from tetris.solver.policy.settings import PolicySettings
from tetris.solver.policy.view import SolverClock

GB = 1e9
# NVLink 10 GB/s, NIC 1 GB/s, no latency: times in seconds are bytes in GB.
HW = HardwareSpec(name="toy", peak_flops=1e15, hbm_bytes=80 * GB, hbm_bandwidth=1e12,
                  intra_node_bandwidth=10 * GB, inter_node_bandwidth=1 * GB,
                  intra_node_latency_s=0.0, inter_node_latency_s=0.0)


def drain(net: Network, events: EventQueue) -> dict[object, float]:
    """Run the transfers to the end: when each payload was delivered."""
    done: dict[object, float] = {}
    while events:
        now, _, _, kind, payload = events.pop()
        assert kind == KV_SENT
        got = net.handle(payload, now)
        if got is not None:
            done[got] = now
    return done


@pytest.mark.parametrize(("sizes", "ends"), [
    # 1 GB each through the decode GPU's one NIC (1 GB/s), half each: both end at 2 s.
    ((1.0, 1.0), (2.0, 2.0)),
    # 0.5 GB and 1 GB share it: the small one ends at 1 s; the other then runs alone at 1 GB/s
    # for its last 0.5 GB and ends at 1.5 s.
    ((0.5, 1.0), (1.0, 1.5)),
])
def test_two_senders_into_one_nic_share_it(sizes: tuple[float, float],
                                           ends: tuple[float, float]) -> None:
    """Prefill 0 and 1 (node 0) send to the decode GPU (node 1, one NIC): its way in is
    shared equally, and a finished transfer gives its share back."""
    events = EventQueue()
    net = Network(ClusterSpec(prefill_instances=2, decode_instances=1, gpus_per_node=2), HW,
                  events)
    net.start(0, 2, sizes[0] * GB, 0.0, "a")
    net.start(1, 2, sizes[1] * GB, 0.0, "b")
    assert drain(net, events) == pytest.approx({"a": ends[0], "b": ends[1]})


def test_a_late_transfer_slows_the_running_one() -> None:
    """1 GB alone from 0 s; a second 1 GB joins at 0.5 s: from then each gets 0.5 GB/s, so
    the first (0.5 GB left) ends at 1.5 s and the second at 1.5 + 0.5 = 2.0 s."""
    events = EventQueue()
    net = Network(ClusterSpec(prefill_instances=2, decode_instances=1, gpus_per_node=2), HW,
                  events)
    net.start(0, 2, 1 * GB, 0.0, "first")
    now, _, _, _, payload = events.pop()  # its completion at 1 s, not reached yet
    assert now == pytest.approx(1.0)
    events.push(now, 0, KV_SENT, payload)
    net.start(1, 2, 1 * GB, 0.5, "second")
    assert drain(net, events) == pytest.approx({"first": 1.5, "second": 2.0})


def test_multirail_receive_uses_every_nic_of_the_node() -> None:
    """Two decode GPUs on node 1 (two NICs): with multi-rail receive, two senders into decode
    GPU 2 get 1 GB/s each (the node takes in 2 GB/s, NVLink 10 GB/s): 1 GB each ends at 1 s;
    over its own NIC only, they share 1 GB/s and end at 2 s."""
    cluster = ClusterSpec(prefill_instances=2, decode_instances=2, gpus_per_node=2)
    for multirail, end in ((True, 1.0), (False, 2.0)):
        events = EventQueue()
        net = Network(cluster, HW.model_copy(update={"multirail_receive": multirail}), events)
        net.start(0, 2, 1 * GB, 0.0, "a")
        net.start(1, 2, 1 * GB, 0.0, "b")
        assert drain(net, events) == pytest.approx({"a": end, "b": end})


def test_inside_a_node_transfers_take_nvlink() -> None:
    """Same node: 1 GB over NVLink at 10 GB/s takes 0.1 s; a cancelled transfer never ends
    and gives its share back."""
    events = EventQueue()
    net = Network(ClusterSpec(prefill_instances=1, decode_instances=1, gpus_per_node=2,
                              nodes=(0, 0)), HW, events)
    assert net.seconds_alone(0, 1, 1 * GB) == pytest.approx(0.1)
    keep = net.start(0, 1, 1 * GB, 0.0, "keep")
    gone = net.start(0, 1, 1 * GB, 0.0, "gone")
    assert keep.rate == pytest.approx(5 * GB)
    net.cancel(gone, 0.05)  # keep sent 0.25 GB by then; the last 0.75 GB at 10 GB/s
    assert drain(net, events) == {"keep": pytest.approx(0.05 + 0.075)}


def _chunk_transfer_s(cm: CostModel, chunk: ChunkSpec, dest: int) -> float:
    """The chunk's KV alone on the network: every rank's share to `dest`, in parallel."""
    events = EventQueue()
    net = Network(cm.cluster, cm.hardware, events)
    for g, n in chunk.kv_shares().items():
        net.start(g, dest, n * cm.model.kv_bytes_per_token, 0.0, g)
    return max(drain(net, events).values())


def test_long_prompts_tiny_outputs_second_token_waits_only_for_the_last_chunk() -> None:
    """LWM-7B on 8 + 8 H100, prompts log-normal around 16k (up to 128k), 1–8 output tokens, at
    low load: every request meets mean TBT ≤ 0.1 s, and its token 1 → 2 gap is at most its
    last chunk's KV transfer (alone on the network) plus one decode step."""
    config = SimConfig(model="lwm-7b-1m", prefill_instances=8, decode_instances=8)
    workload = load_workload("synthetic:n=40,rate=0.2,prompt=lognormal(median=16000;sigma=0.8;"
                             "min=1000;max=131072),output=uniform(lo=1;hi=8),seed=5")
    out = run_policy("tetris-greedy", config.sim_requests(workload.requests), config)
    cm = CostModel(MODEL_PRESETS["lwm-7b-1m"], HARDWARE_PRESETS["h100"],
                   ClusterSpec(prefill_instances=8, decode_instances=8))
    assert compute_metrics(out.records).tbt_attainment == 1.0
    checked = 0
    for rec in out.records:
        if len(rec.token_times) < 2:
            continue
        last = rec.chunks[-1]
        chunk = ChunkSpec(last.start_token, last.end_token, last.instances)
        dest = cm.cluster.prefill_instances + rec.decode_instances[0]
        bound = _chunk_transfer_s(cm, chunk, dest) + \
            cm.decode_step_seconds(1, rec.request.prompt_tokens)
        assert rec.token_times[1] - rec.token_times[0] <= bound * (1 + 1e-9), rec.request_id
        checked += 1
    assert checked >= 30
    assert any(len(r.chunks) > 1 for r in out.records)  # some KV streamed before the end


def test_dispatcher_prefers_the_decode_instance_on_the_prefill_node() -> None:
    """Decode instance 0 on another node (empty) and 1 on the prefill node (already holding a
    request): the second request's KV goes over NVLink to 1, the faster path; with both paths
    equal the less loaded instance wins."""
    cluster = ClusterSpec(prefill_instances=1, decode_instances=2, nodes=(0, 1, 0))
    cm = CostModel(MODEL_PRESETS["llama3-8b"], HARDWARE_PRESETS["h100"], cluster)
    config_requests = [SimRequest("a", 0.0, 2000, 50, 100.0, 1.0),
                       SimRequest("b", 0.001, 2000, 50, 100.0, 1.0)]
    policy = CdspPolicy("tetris-greedy", cm, PolicySettings(quantum_s=None),
                        clock=SolverClock.FREE)
    out = simulate_disaggregated(config_requests, policy)
    assert [r.decode_instances for r in out.records] == [(1,), (1,)]
    loads = [DecodeLoad(0, 0), DecodeLoad(500, 1)]
    assert choose_decode_instances(loads, 100, 10_000, 8, handoff_s=[0.5, 0.1]).instances == (1,)
    assert choose_decode_instances(loads, 100, 10_000, 8, handoff_s=[0.1, 0.1]).instances == (0,)
