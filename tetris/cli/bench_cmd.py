"""`tetris bench solver`: planner latency and quality as JSON on stdout, progress on stderr."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.progress import Progress

from tetris.cli.arg_types import comma_list, int_in, positive_at_most, positive_int
from tetris.cli.spec_files import MAX_TIME_LIMIT_MS
from tetris.evaluation.solver_bench import BenchConfig, run_bench


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks that print JSON")
    kinds = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    solver = kinds.add_parser("solver", help="planner latency and quality on random problems")
    defaults = BenchConfig()
    # Bounded: each problem holds per-instance and per-request tables (10^9 is a MemoryError).
    counts = comma_list(int_in(1, 4096))
    solver.add_argument("--instances", type=counts, default=list(defaults.instances),
                        help="prefill instance counts (default 8,16,32)")
    solver.add_argument("--requests", type=counts, default=list(defaults.requests),
                        help="pending request counts (default 4,16,32)")
    solver.add_argument("--seeds", type=positive_int, default=defaults.seeds,
                        help="random problems per cell (default %(default)s)")
    solver.add_argument("--cp-time-limits-ms", type=comma_list(positive_at_most(MAX_TIME_LIMIT_MS)),
                        default=list(defaults.cp_time_limits_ms),
                        help="CP-SAT time limits to compare (default 50,200,1000)")
    solver.add_argument("--milp-max-requests", type=int, default=defaults.milp_max_requests,
                        help="run the MILP only on cells with at most this many requests")
    solver.add_argument("--milp-max-instances", type=int, default=defaults.milp_max_instances,
                        help="... and at most this many instances")
    solver.add_argument("--gpus-per-node", type=int_in(1, 4096), default=defaults.gpus_per_node,
                        help="prefill instances per node (default %(default)s; groups cross "
                        "nodes only where the cost model says it pays)")
    solver.set_defaults(handler=_run_solver)


def _run_solver(args: argparse.Namespace) -> int:
    config = BenchConfig(
        instances=args.instances,
        requests=args.requests,
        seeds=args.seeds,
        cp_time_limits_ms=args.cp_time_limits_ms,
        milp_max_requests=args.milp_max_requests,
        milp_max_instances=args.milp_max_instances,
        gpus_per_node=args.gpus_per_node,
    )
    total = len(config.instances) * len(config.requests) * config.seeds
    with Progress(transient=True, console=None, redirect_stdout=False) as progress:
        task = progress.add_task("solver bench", total=total)

        def step(label: str) -> None:
            progress.update(task, advance=1, description=label)

        result = run_bench(config, step)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
