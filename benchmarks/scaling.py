"""Weak scaling: the same trace, time-scaled with the cluster, on 1 to 16 nodes of prefill (and as
many of decode), 8 GPUs per node.

For each cluster size: the max sustainable rate (SLO attainment ≥ 90%, `find_max_rate` as in
`tetris whatif`) per prefill GPU and per GPU, P90 TTFT there; a run at a fixed rate per prefill
GPU (default 0.75 req/s) with its attainment, P90 TTFT, token 1→2 gap, simulator wall time and
events/s (one process, one core); and every plan validated. The 1-node row is the reference:
`per_gpu_rate_vs_1_node` is each size's per-GPU max rate over the 1-node one (weak scaling
holds when it stays near 1).

Limits printed beside the figures: the prefill pool's compute bound on the rate (the trace's mean
prompt at the cost model's best isolated time per request, all prefill GPUs busy) and the decode
pool's HBM-bandwidth bound (every decode step reads the weights once per instance).

Prints JSON; `--page FILE.md` also writes the table as markdown. Usage (about 10–20 minutes for
all sizes on one core):
    .venv/bin/python benchmarks/scaling.py [--trace SPEC] [--nodes 1,2,4,8,16]
        [--policy tetris-greedy] [--per-gpu-rate 0.75] [--page docs/results/scaling.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tetris.evaluation.capacity import find_max_rate
from tetris.evaluation.sim_config import SimConfig
from tetris.evaluation.whatif import simulate_at_rate
from tetris.evaluation.workload import Workload
from tetris.evaluation.workload_spec import load_workload

DEFAULT_TRACE = "mooncake:../shared/traces/mooncake_conversation_trace.jsonl"
GPUS_PER_NODE = 8
TARGET = 0.9


def _limits(workload: Workload, config: SimConfig) -> dict[str, float]:
    """Rate bounds from the cost model alone (no queueing): prefill compute and decode HBM."""
    cm = config.cost_model()
    prompts = [r.prompt_tokens for r in workload.requests]
    outputs = [r.output_tokens for r in workload.requests]
    # One request on one GPU with nothing else: the least GPU-seconds its prefill can take.
    gpu_s = statistics.fmean(cm.chunk_seconds(p, 0, 1) for p in prompts)
    # A decode instance with a full batch of b sequences gives b tokens per step; the step reads
    # the weights and every sequence's KV once.
    kv_mean = statistics.fmean(p + o / 2 for p, o in zip(prompts, outputs, strict=True))
    batch = min(config.policy.decode_max_batch, max(1, int(cm.kv_capacity_tokens // kv_mean)))
    tokens_per_s = batch / cm.decode_step_seconds(batch, int(batch * kv_mean))
    out_mean = statistics.fmean(outputs)
    return {
        "prefill_compute_rps": config.prefill_instances / gpu_s,
        "decode_bandwidth_rps": config.decode_instances * tokens_per_s / out_mean,
    }


def run_size(workload: Workload, nodes: int, policy: str, per_gpu_rate: float,
             max_evals: int) -> dict[str, Any]:
    gpus = nodes * GPUS_PER_NODE
    config = SimConfig(prefill_instances=gpus, decode_instances=gpus,
                       gpus_per_node=GPUS_PER_NODE)
    validated = 0

    def attainment(rate: float) -> float:
        nonlocal validated
        result = simulate_at_rate(workload, policy, config, rate)
        validated += int(result.stats.get("plans_validated", 0))
        return float(result.metrics.get("slo_attainment") or 0.0)

    found = find_max_rate(attainment, start_rps=per_gpu_rate * gpus, target=TARGET,
                          rel_tol=0.03, max_evals=max_evals)
    at_max = simulate_at_rate(workload, policy, config, found.max_rate_rps) \
        if found.max_rate_rps > 0 else None
    started = time.perf_counter()
    fixed = simulate_at_rate(workload, policy, config, per_gpu_rate * gpus)
    wall = time.perf_counter() - started
    validated += int(fixed.stats.get("plans_validated", 0))
    m = fixed.metrics
    return {
        "nodes": nodes, "prefill_gpus": gpus, "decode_gpus": gpus,
        "max_rate_rps": found.max_rate_rps,
        "max_rate_per_prefill_gpu": found.max_rate_rps / gpus,
        "max_rate_per_gpu": found.max_rate_rps / (2 * gpus),
        "bracket_rps": list(found.bracket_rps), "converged": found.converged,
        "ttft_p90_at_max_s": None if at_max is None else at_max.metrics.get("ttft_p90_s"),
        "fixed_rate_rps": per_gpu_rate * gpus,
        "fixed_rate": {k: m.get(k) for k in ("slo_attainment", "ttft_p90_s", "tbt_p50_s",
                                             "first_gap_p50_s", "first_gap_p99_s")},
        "sim_wall_s": wall,
        "sim_events": fixed.stats.get("events"),
        "sim_events_per_s": fixed.stats.get("events", 0) / wall if wall > 0 else None,
        "plans_validated": validated,
        "limits": _limits(workload, config),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trace", default=DEFAULT_TRACE)
    parser.add_argument("--nodes", default="1,2,4,8,16")
    parser.add_argument("--policy", default="tetris-greedy")
    parser.add_argument("--per-gpu-rate", type=float, default=0.75)
    parser.add_argument("--max-evals", type=int, default=10)
    parser.add_argument("--page", help="also write the table as markdown here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    workload = load_workload(args.trace)
    rows = []
    for nodes in (int(n) for n in args.nodes.split(",")):
        rows.append(run_size(workload, nodes, args.policy, args.per_gpu_rate, args.max_evals))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    base = next((r for r in rows if r["nodes"] == 1), None)
    for r in rows:
        r["per_gpu_rate_vs_1_node"] = (r["max_rate_per_prefill_gpu"]
                                       / base["max_rate_per_prefill_gpu"]
                                       if base and base["max_rate_per_prefill_gpu"] else None)
        r["attainment_vs_1_node_points"] = (
            100 * (r["fixed_rate"]["slo_attainment"] - base["fixed_rate"]["slo_attainment"])
            if base else None)
    result = {"trace": workload.name, "policy": args.policy, "target": TARGET,
              "per_gpu_rate": args.per_gpu_rate, "gpus_per_node": GPUS_PER_NODE,
              "command": " ".join(["benchmarks/scaling.py", *sys.argv[1:]]), "sizes": rows}
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    if args.page:
        Path(args.page).write_text(page(result))
    return 0


def _f(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}" if isinstance(value, float) \
        else str(value)


def page(result: dict[str, Any]) -> str:
    """The results table as markdown (every figure from `result`)."""
    lines = [
        "| nodes (P + D GPUs) | max rate (req/s) | per prefill GPU | vs 1 node | P90 TTFT at max "
        "(s) | prefill bound (req/s) | decode bound (req/s) | attainment at "
        f"{result['per_gpu_rate']} req/s/GPU | P90 TTFT there (s) | token 1→2 p99 (s) | "
        "sim wall (s) | events/s | plans validated |",
        "|" + "---|" * 13,
    ]
    for r in result["sizes"]:
        fixed, lim = r["fixed_rate"], r["limits"]
        lines.append(
            f"| {r['nodes']} ({r['prefill_gpus']} + {r['decode_gpus']}) "
            f"| {_f(r['max_rate_rps'])} | {_f(r['max_rate_per_prefill_gpu'])} "
            f"| {_f(r['per_gpu_rate_vs_1_node'])} | {_f(r['ttft_p90_at_max_s'])} "
            f"| {_f(lim['prefill_compute_rps'])} | {_f(lim['decode_bandwidth_rps'])} "
            f"| {_f(fixed['slo_attainment'], 4)} | {_f(fixed['ttft_p90_s'])} "
            f"| {_f(fixed['first_gap_p99_s'])} | {_f(r['sim_wall_s'])} "
            f"| {_f(r['sim_events_per_s'])} | {r['plans_validated']} |")
    return "\n".join([f"Trace `{result['trace']}`, policy `{result['policy']}`, "
                      f"{result['gpus_per_node']} GPUs per node, attainment target "
                      f"{result['target']:.0%}; `{result['command']}`.", "", *lines, ""])


if __name__ == "__main__":
    sys.exit(main())
