"""Simulator speed: the whole Mooncake conversation trace under `tetris-greedy`, one process.

Prints JSON: requests, events, wall seconds, events/s, plans validated. Usage:
    .venv/bin/python benchmarks/simulator_speed.py [--trace SPEC] [--policy NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tetris.evaluation.metrics import compute_metrics
from tetris.evaluation.policies import run_policy
from tetris.evaluation.sim_config import SimConfig
from tetris.evaluation.workload_spec import load_workload

DEFAULT_TRACE = "mooncake:../shared/traces/mooncake_conversation_trace.jsonl"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trace", default=DEFAULT_TRACE)
    parser.add_argument("--policy", default="tetris-greedy")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = SimConfig()
    started = time.perf_counter()
    workload = load_workload(args.trace)
    requests = config.sim_requests(workload.requests)
    setup_s = time.perf_counter() - started
    runs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        outcome = run_policy(args.policy, requests, config)
        wall = time.perf_counter() - t0
        runs.append({"wall_s": wall, "events": outcome.stats["events"],
                     "events_per_s": outcome.stats["events"] / wall,
                     "decisions": outcome.stats.get("decisions"),
                     "plans_validated": outcome.stats.get("plans_validated")})
    metrics = compute_metrics(outcome.records).to_dict()
    json.dump({"trace": workload.name, "policy": args.policy, "requests": len(requests),
               "cluster": config.model_dump(mode="json"), "setup_s": setup_s,
               "runs": runs, "best_wall_s": min(r["wall_s"] for r in runs),
               "slo_attainment": metrics["slo_attainment"]}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
