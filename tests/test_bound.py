"""The fluid bound on a hand-worked tiny cluster, and `tetris whatif`'s bound and --best-split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.test_cli_simulate import CLUSTER, TRACE, run_bad, run_json
from tetris.evaluation.bound import (
    DECODE_BANDWIDTH,
    DECODE_MEMORY,
    NETWORK,
    PREFILL,
    Demand,
    fluid_bound,
    handoff_capacity,
)
from tetris.evaluation.workload import TraceRequest
from tetris.solver.cluster import ClusterSpec
from tetris.solver.cost_model import DEFAULT_MEM_UTIL, CostCoefficients, CostModel
from tetris.solver.hardware import HardwareSpec
from tetris.solver.model_spec import MODEL_PRESETS

GB = 1e9
MODEL = MODEL_PRESETS["llama3-8b"]  # 131,072 KV bytes per token
KV_CAPACITY = 10_000


def toy_cost_model() -> CostModel:
    """Prefill T(p, 0, 1) = 1e-3·p; a decode step of b sequences over K KV tokens lasts
    0.01 + 1e-6·K + 1e-3·b; 10,000 KV tokens per GPU; NVLink 10 GB/s, a NIC 1 GB/s per GPU."""
    coefficients = CostCoefficients(
        fixed_s=0.0, step_intra_s=0.0, step_inter_s=0.0, lin_s_per_token=1e-3,
        attn_s_per_pair=0.0, comm_intra_s_per_token=0.0, comm_inter_s_per_token=0.0,
        decode_fixed_s=0.01, decode_kv_s_per_token=1e-6)
    room = MODEL.weight_bytes + (KV_CAPACITY + 0.5) * MODEL.kv_bytes_per_token
    hw = HardwareSpec(name="toy", peak_flops=1e15, hbm_bytes=room / DEFAULT_MEM_UTIL,
                      hbm_bandwidth=1e12, intra_node_bandwidth=10 * GB,
                      inter_node_bandwidth=1 * GB, intra_node_latency_s=0.0,
                      inter_node_latency_s=0.0)
    cm = CostModel(MODEL, hw, ClusterSpec(prefill_instances=2, decode_instances=2,
                                          gpus_per_node=2), coefficients)
    assert cm.kv_capacity_tokens == KV_CAPACITY
    return cm


# Prefill 1 s and 3 s (mean 2 s); decode 10 and 20 tokens; KV read over the decode steps
# m = 10·1000 + 0+…+9 = 10,045 and 20·3000 + 0+…+19 = 60,190 (mean 35,117.5); prompt KV
# mean 2000 tokens · 131,072 B = 262,144,000 B.
REQUESTS = [TraceRequest("a", 0.0, 1000, 11), TraceRequest("b", 0.5, 3000, 21)]


def test_demand_per_request_is_the_hand_worked_mean() -> None:
    """Prefill GPU-seconds, decode tokens, KV-token steps and hand-off bytes per request."""
    d = Demand.of(REQUESTS, toy_cost_model())
    assert d.prefill_gpu_s == pytest.approx(2.0)
    assert d.decode_tokens == pytest.approx(15.0)
    assert d.decode_kv_token_steps == pytest.approx(35_117.5)
    assert d.kv_bytes == pytest.approx(262_144_000)


def test_bound_on_four_gpus_over_two_nodes() -> None:
    """Batch cap 4: steps ≥ 15/4 = 3.75 (> 35,117.5/10,000), so decode takes
    0.01·3.75 + 1e-6·35,117.5 + 1e-3·15 = 0.0876175 s per request.

    Splits of 4 GPUs, placed as the simulator places them (2 per node, decode on nodes of
    its own after the prefill ones), so every hand-off crosses NICs:
    - 1+3: prefill 1/2 = 0.5 req/s; decode 3/0.0876175; network: GPU 0's one NIC, 1 GB/s
      (nodes 1 and 2 could take in 2 GB/s each).
    - 2+2: prefill 1.0; decode 2/0.0876175 = 22.83; network 2 NICs = 2 GB/s = 7.63 req/s.
    - 3+1: prefill 1.5; decode 11.41; network: 3 NICs out, node 2's two NICs in = 2 GB/s.
    Best fixed split 3+1 at 1.5 req/s (prefill binds); elastic 4 / (2 + 0.0876175)."""
    b = fluid_bound(REQUESTS, toy_cost_model(), 2, 2, gpus_per_node=2, max_batch=4)
    assert b.decode.limited_by == DECODE_BANDWIDTH
    assert b.decode.instance_s == pytest.approx(0.0876175)
    expected = {
        1: {PREFILL: 0.5, DECODE_BANDWIDTH: 3 / 0.0876175, NETWORK: 1e9 / 262_144_000},
        2: {PREFILL: 1.0, DECODE_BANDWIDTH: 2 / 0.0876175, NETWORK: 2e9 / 262_144_000},
        3: {PREFILL: 1.5, DECODE_BANDWIDTH: 1 / 0.0876175, NETWORK: 2e9 / 262_144_000},
    }
    for p, limits in expected.items():
        assert b.split(p).limits_rps == pytest.approx(limits)
    assert (b.best.prefill, b.best.rps, b.best.binding) == (3, pytest.approx(1.5), PREFILL)
    assert b.configured.prefill == 2 and b.configured.rps == pytest.approx(1.0)
    assert b.elastic_rps == pytest.approx(4 / 2.0876175)
    out = b.to_json()
    assert out["best_split"] == [3, 1] and out["binding"] == PREFILL
    assert b.share(0.5, "disaggregated") == pytest.approx(
        {"share_of_bound": 0.5 * 2.0876175 / 4, "share_of_split_bound": 0.5})
    assert set(b.share(0.5, "unified")) == {"share_of_bound"}


def test_kv_memory_sets_the_decode_steps_when_the_batch_cap_is_loose() -> None:
    """Batch cap 256: steps ≥ 35,117.5/10,000 = 3.51175 > 15/256, so decode takes
    0.01·3.51175 + 0.0351175 + 0.015 = 0.0852350 s per request, limited by KV memory."""
    b = fluid_bound(REQUESTS, toy_cost_model(), 2, 2, gpus_per_node=2, max_batch=256)
    assert b.decode.limited_by == DECODE_MEMORY
    assert b.decode.instance_s == pytest.approx(0.085235)
    assert b.split(3).limits_rps[DECODE_MEMORY] == pytest.approx(1 / 0.085235)


def test_hand_off_capacity_is_the_smaller_cut() -> None:
    """Both roles on one node move KV over NVLink; a node shared with decode also sends over
    its NICs to decode elsewhere; without multirail a GPU receives over its own NIC only."""
    cm = toy_cost_model()
    one_node = ClusterSpec(prefill_instances=2, decode_instances=2, gpus_per_node=4,
                           nodes=(0, 0, 0, 0))
    assert handoff_capacity(one_node, cm) == pytest.approx(20 * GB)  # 2 NVLinks each way
    # Prefill 0, 1 on node 0 with decode 2; decode 3 on node 1. Out: GPU 0 and 1 over NVLink
    # (20) and their NICs (2); in: GPU 2 over NVLink (10), node 1's four NICs (one per GPU
    # of a 4-GPU node: 4).
    split = ClusterSpec(prefill_instances=2, decode_instances=2, gpus_per_node=4,
                        nodes=(0, 0, 0, 1))
    assert handoff_capacity(split, cm) == pytest.approx(14 * GB)
    single_rail = CostModel(cm.model, cm.hardware.model_copy(update={
        "multirail_receive": False}), cm.cluster, cm.coefficients)
    assert handoff_capacity(split, single_rail) == pytest.approx(11 * GB)


def test_whatif_prints_the_bound_and_each_policys_share(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The JSON holds the bound; each max rate is shown as its share of it; the attainment
    plot draws it."""
    plot = tmp_path / "attainment.png"
    out = run_json(capsys, "whatif", "--trace", TRACE, *CLUSTER, "--policy", "tetris-greedy",
                   "--policy", "loongserve", "--max-evals", "5", "--rel-tol", "0.2",
                   "--plot-attainment", str(plot))
    assert plot.stat().st_size > 1000
    b = out["bound"]
    assert {"fixed_split_rps", "best_split", "elastic_rps", "binding"} <= set(b)
    assert sum(b["best_split"]) == 5 and b["fixed_split_rps"] <= b["elastic_rps"]
    assert b["configured_split"]["prefill"] == 3
    for name, res in out["policies"].items():
        rate = res["max_sustainable_rate_rps"]
        assert res["share_of_bound"] == pytest.approx(rate / b["elastic_rps"])
        assert ("share_of_split_bound" in res) == (name == "tetris-greedy")


def test_best_split_climbs_to_a_local_best(capsys: pytest.CaptureFixture[str]) -> None:
    """--best-split starts at the bound's split and stops where neither neighbour of the best
    split it found sustains more."""
    out = run_json(capsys, "whatif", "--trace", TRACE, *CLUSTER, "--policy", "tetris-greedy",
                   "--best-split", "--max-evals", "5", "--rel-tol", "0.2")
    found: dict[str, Any] = out["best_split"]
    assert found["from_bound"] == out["bound"]["best_split"]
    res = found["policies"]["tetris-greedy"]
    rates = {t["split"][0]: t["max_sustainable_rate_rps"] for t in res["tried"]}
    assert found["from_bound"][0] in rates
    best = res["split"][0]
    assert res["max_sustainable_rate_rps"] == max(rates.values()) == rates[best]
    for neighbour in (best - 1, best + 1):
        if 1 <= neighbour <= 4:
            assert neighbour in rates
    assert res["plans_validated"] > 0


@pytest.mark.parametrize(("extra", "words"), [
    (["--policy", "loongserve"], "none of the policies has fixed prefill / decode roles"),
    (["--sweep", "prefill_instances=2,3"], "drop --sweep"),
])
def test_best_split_refuses_what_it_cannot_search(
        capsys: pytest.CaptureFixture[str], extra: list[str], words: str) -> None:
    """--best-split with only elastic policies, or with a sweep, is a one-line usage error."""
    line = run_bad(capsys, "whatif", "--trace", TRACE, *CLUSTER, "--best-split", *extra)
    assert words in line
