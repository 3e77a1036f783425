"""Does CP-SAT refinement help `tetris` over greedy alone, and where should its time go?

Runs the first N Mooncake requests, time-scaled to a high load, under four prefill policies:
greedy; CP-SAT refining every decision *before* launching (its time limit charged to every
decision); CP-SAT refining in the background (`solver/policy/refinement.py`, the `tetris`
policy); and CP-SAT before launching with its time not charged (an ideal, infinitely fast
solver: the plan-quality gain alone). Prints JSON with TTFT percentiles and attainment.

    .venv/bin/python benchmarks/refinement_ablation.py [--requests 3000] [--rate 8.5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from tetris.evaluation.metrics import compute_metrics
from tetris.evaluation.sim_config import SimConfig
from tetris.evaluation.workload_spec import load_workload
from tetris.simulator.disaggregated import SimOptions, simulate_disaggregated
from tetris.solver.policy.registry import make_policy
from tetris.solver.policy.view import PrefillPolicy, SolverClock

TRACE = "mooncake:../shared/traces/mooncake_conversation_trace.jsonl"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=8.5)
    parser.add_argument("--cp-time-limit-ms", type=float, default=20.0)
    args = parser.parse_args()
    config = SimConfig()
    workload = load_workload(TRACE).head(args.requests).scaled_to_rate(args.rate)
    requests = config.sim_requests(workload.requests)
    cm = config.cost_model()
    background = config.policy.model_copy(update={"time_limit_ms": args.cp_time_limit_ms})
    before = background.model_copy(update={"refine": "before_launch"})
    variants: dict[str, PrefillPolicy] = {
        "greedy": make_policy("tetris-greedy", background, cm),
        "cp_before_launch_charged": make_policy("tetris", before, cm),
        "cp_background (tetris)": make_policy("tetris", background, cm),
        "cp_before_launch_free": make_policy("tetris", before, cm, clock=SolverClock.FREE),
    }
    out: dict[str, Any] = {"trace": workload.name, "requests": len(requests),
                           "rate_rps": args.rate, "notes": list(workload.notes),
                           "cluster": config.model_dump(mode="json"), "variants": {}}
    for name, policy in variants.items():
        t0 = time.perf_counter()
        outcome = simulate_disaggregated(requests, policy, SimOptions(seed=config.seed))
        m = compute_metrics(outcome.records).to_dict()
        out["variants"][name] = {
            k: m[k] for k in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "ttft_attainment",
                              "slo_attainment")
        } | {"refinements": outcome.stats.get("refinements", 0),
             "refined_plans_used": outcome.stats.get("refined_plan_used", 0),
             "wall_s": time.perf_counter() - t0}
        print(f"{name}: done", file=sys.stderr, flush=True)
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
