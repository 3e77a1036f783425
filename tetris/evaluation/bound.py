"""A fluid upper bound on the rate a cluster can sustain for a trace: the physical limit that
`tetris whatif` prints beside every policy's max rate (derivation: docs/capacity-bound.md).

Per request (means over the trace, from the same cost model the simulator runs):
- prefill: at least T(p, 0, 1) GPU-seconds — s instances are at most s times faster than one
  under the ring rule and a chunked prompt pays each chunk's fixed cost, so no plan uses fewer;
- decode: o − 1 tokens (the first comes from prefill), the step producing each reading the
  request's KV (p + j tokens); a decode instance's step of batch B over K KV tokens lasts
  f + κ·K + ℓ·B, so its busy time is f·(steps) + κ·ΣK + ℓ·ΣB, and steps ≥ ΣB / B_max (batch
  cap) and ≥ ΣK / K_max (KV memory): instance-seconds per request
  d = f·max(E[o−1]/B_max, E[m]/K_max) + κ·E[m] + ℓ·E[o−1], m = Σ_j (p + j);
- hand-off (fixed roles only): the prompt's KV crosses from the prefill to the decode GPUs, at
  most the capacity of the cut between them (NVLink where both share a node, NICs across).

A fixed split of P prefill + D decode GPUs sustains at most min(P / E[W], D / d, net / E[kv]);
the best split maximises that over P + D = N. With elastic roles every GPU-second goes to one
role or the other, so N / (E[W] + d) bounds any split and any schedule of role changes.

It bounds throughput (a stable queue), not latency: a policy's max rate at an attainment target
lies below it, except on a trace too short for queues to build (the search then may exceed it).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tetris.evaluation.sim_config import SimConfig
from tetris.evaluation.workload import TraceRequest
from tetris.solver.cluster import ClusterSpec
from tetris.solver.cost_model import CostModel

PREFILL = "prefill_compute"
DECODE_BANDWIDTH = "decode_hbm_bandwidth"
DECODE_MEMORY = "decode_kv_memory"
NETWORK = "kv_network"


@dataclass(frozen=True)
class Demand:
    """What one request of the trace needs, on average, of each resource."""

    prefill_gpu_s: float
    decode_tokens: float  # E[o − 1]
    decode_kv_token_steps: float  # E[m]: KV tokens read over the request's decode steps
    kv_bytes: float  # the prompt's KV, handed from prefill to decode

    @staticmethod
    def of(requests: Sequence[TraceRequest], cm: CostModel) -> Demand:
        if not requests:
            raise ValueError("the bound needs at least one request")
        prefill: dict[int, float] = {}  # traces repeat lengths; T(p, 0, 1) once per length
        for r in requests:
            if r.prompt_tokens not in prefill:
                prefill[r.prompt_tokens] = cm.chunk_seconds(r.prompt_tokens, 0, 1)
        steps = [r.output_tokens - 1 for r in requests]
        return Demand(
            prefill_gpu_s=statistics.fmean(prefill[r.prompt_tokens] for r in requests),
            decode_tokens=statistics.fmean(steps),
            decode_kv_token_steps=statistics.fmean(
                n * r.prompt_tokens + n * (n - 1) / 2 for r, n in zip(requests, steps,
                                                                        strict=True)),
            kv_bytes=statistics.fmean(r.prompt_tokens for r in requests)
            * cm.model.kv_bytes_per_token,
        )


@dataclass(frozen=True)
class DecodeCost:
    """Decode instance-seconds per request, and which step limit sets its step count."""

    instance_s: float
    limited_by: str  # DECODE_BANDWIDTH (the batch cap) or DECODE_MEMORY (KV capacity)

    @staticmethod
    def of(demand: Demand, cm: CostModel, max_batch: int) -> DecodeCost:
        co = cm.coefficients
        by_batch = demand.decode_tokens / max_batch
        by_memory = demand.decode_kv_token_steps / cm.kv_capacity_tokens
        seconds = (co.decode_fixed_s * max(by_batch, by_memory)
                   + co.decode_kv_s_per_token * demand.decode_kv_token_steps
                   + co.lin_s_per_token * demand.decode_tokens)
        return DecodeCost(seconds, DECODE_MEMORY if by_memory > by_batch else DECODE_BANDWIDTH)


@dataclass(frozen=True)
class SplitBound:
    """The bound of one fixed split, each resource's own limit beside it."""

    prefill: int
    decode: int
    limits_rps: dict[str, float]

    @property
    def rps(self) -> float:
        return min(self.limits_rps.values())

    @property
    def binding(self) -> str:
        return min(self.limits_rps, key=lambda k: self.limits_rps[k])

    def to_json(self) -> dict[str, Any]:
        return {"prefill": self.prefill, "decode": self.decode, "rps": self.rps,
                "binding": self.binding, "limits_rps": dict(self.limits_rps)}


def handoff_capacity(cluster: ClusterSpec, cm: CostModel) -> float:
    """Bytes/s that can cross from the prefill GPUs to the decode GPUs: the smaller of the two
    cuts around them (every prefill GPU's ways out towards some decode GPU; every decode GPU's
    ways in from some prefill GPU), each way at its link's full bandwidth."""
    hw = cm.hardware
    per_node = cluster.gpus_per_node
    nics = hw.nics_per_node or per_node
    p = cluster.prefill_instances
    node = [cluster.node_of(g) for g in range(cluster.num_instances)]
    seen: dict[int, int] = {}
    nic = []  # (node, NIC) of each GPU, as the simulator's network maps them
    for n in node:
        rank = seen[n] = seen.get(n, -1) + 1
        nic.append((n, min(nics - 1, rank * nics // per_node)))
    prefill_nodes, decode_nodes = set(node[:p]), set(node[p:])
    out_nvlink = sum(1 for n in node[:p] if n in decode_nodes)
    out_nics = {nic[g] for g in range(p) if decode_nodes - {node[g]}}
    in_nvlink = sum(1 for n in node[p:] if n in prefill_nodes)
    receivers = [g for g in range(p, len(node)) if prefill_nodes - {node[g]}]
    if hw.multirail_receive:  # a node's way in is all its NICs together
        in_nics = len({node[g] for g in receivers}) * nics
    else:
        in_nics = len({nic[g] for g in receivers})
    egress = out_nvlink * hw.intra_node_bandwidth + len(out_nics) * hw.inter_node_bandwidth
    ingress = in_nvlink * hw.intra_node_bandwidth + in_nics * hw.inter_node_bandwidth
    return min(egress, ingress)


def split_bound(demand: Demand, decode: DecodeCost, cm: CostModel, prefill_gpus: int,
                decode_gpus: int, gpus_per_node: int) -> SplitBound:
    cluster = ClusterSpec(prefill_instances=prefill_gpus, decode_instances=decode_gpus,
                          gpus_per_node=gpus_per_node)
    net = handoff_capacity(cluster, cm)
    return SplitBound(prefill_gpus, decode_gpus, {
        PREFILL: prefill_gpus / demand.prefill_gpu_s,
        decode.limited_by: decode_gpus / decode.instance_s,
        NETWORK: net / demand.kv_bytes if demand.kv_bytes > 0 else float("inf"),
    })


@dataclass(frozen=True)
class FluidBound:
    demand: Demand
    decode: DecodeCost
    gpus: int
    elastic_rps: float
    configured: SplitBound
    best: SplitBound
    splits: tuple[SplitBound, ...]  # P = 1 .. N − 1

    def split(self, prefill_gpus: int) -> SplitBound:
        return self.splits[prefill_gpus - 1]

    def to_json(self) -> dict[str, Any]:
        return {
            "fixed_split_rps": self.best.rps,
            "best_split": [self.best.prefill, self.best.decode],
            "elastic_rps": self.elastic_rps,
            "binding": self.best.binding,
            "best_split_limits_rps": dict(self.best.limits_rps),
            "configured_split": self.configured.to_json(),
            "gpus": self.gpus,
            "per_request": {
                "prefill_gpu_s": self.demand.prefill_gpu_s,
                "decode_instance_s": self.decode.instance_s,
                "decode_steps_limited_by": self.decode.limited_by,
                "decode_tokens": self.demand.decode_tokens,
                "kv_handoff_bytes": self.demand.kv_bytes,
            },
        }

    def share(self, rate_rps: float | None, architecture: str) -> dict[str, float | None]:
        """A policy's max rate as a share of the cluster's bound (elastic: the limit for any
        roles), and for a fixed-role policy of its own split's bound too."""
        if rate_rps is None:
            return {"share_of_bound": None}
        out: dict[str, float | None] = {"share_of_bound": rate_rps / self.elastic_rps}
        if architecture == "disaggregated":
            out["share_of_split_bound"] = rate_rps / self.configured.rps
        return out


def fluid_bound(requests: Sequence[TraceRequest], cm: CostModel, prefill_gpus: int,
                decode_gpus: int, gpus_per_node: int, max_batch: int) -> FluidBound:
    """The bound for this trace on P + D GPUs (configured as `prefill_gpus` + `decode_gpus`):
    the best fixed split of the same GPUs and elastic roles over all of them."""
    demand = Demand.of(requests, cm)
    decode = DecodeCost.of(demand, cm, max_batch)
    gpus = prefill_gpus + decode_gpus
    splits = [split_bound(demand, decode, cm, p, gpus - p, gpus_per_node)
              for p in range(1, gpus)]
    configured = splits[prefill_gpus - 1]
    best = max(splits, key=lambda s: s.rps)  # ties: fewest prefill GPUs
    elastic = gpus / (demand.prefill_gpu_s + decode.instance_s)
    return FluidBound(demand, decode, gpus, elastic, configured, best, tuple(splits))


def bound_of(requests: Sequence[TraceRequest], config: SimConfig) -> FluidBound:
    """`fluid_bound` for a simulator config (its model, hardware, calibration, split, node
    size and decode batch cap)."""
    return fluid_bound(requests, config.cost_model(config.prefill_instances,
                                                   config.decode_instances),
                       config.prefill_instances,
                       config.decode_instances, config.gpus_per_node,
                       config.policy.decode_max_batch)
