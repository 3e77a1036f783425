"""Options shared by `tetris simulate` and `tetris whatif`: the trace, the cluster, the SLOs.

Settings come from `--config FILE` (a JSON object of `SimConfig` fields) and are overridden by
any flag given; flags default to None so that "not given" is distinguishable from a value.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tetris.cli.arg_types import nonnegative_float, nonnegative_int, positive_float, positive_int
from tetris.cli.errors import UsageError, for_option
from tetris.cli.spec_files import (
    calibration_option,
    check_limits,
    config_file,
    hardware_option,
    model_option,
    validated,
)
from tetris.evaluation.sim_config import SimConfig
from tetris.evaluation.workload import Workload
from tetris.evaluation.workload_spec import load_workload
from tetris.solver.input_files import json_type

if TYPE_CHECKING:
    from tetris.simulator.failures import FailureSpec

# flag dest -> SimConfig field ("policy.x": field x of its PolicySettings)
CONFIG_FLAGS = {
    "model": "model", "hardware": "hardware", "calibration": "calibration",
    "prefill_instances": "prefill_instances", "decode_instances": "decode_instances",
    "gpus_per_node": "gpus_per_node", "slo_reference_gpus": "slo_reference_gpus",
    "tbt_criterion": "tbt_criterion", "seed": "seed", "noise_cv": "noise_cv",
    "solver_clock": "solver_clock", "cp_time_limit_ms": "policy.time_limit_ms",
    "milp_time_limit_ms": "policy.milp_time_limit_ms", "static_sp": "policy.static_sp",
    "distserve_group": "policy.distserve_group", "decode_max_batch": "policy.decode_max_batch",
    "max_planned": "policy.max_planned", "loongserve_dp": "loongserve_dp",
    "stream_kv": "policy.stream_kv", "roles": "policy.roles",
    "role_interval_s": "policy.role_interval_s", "role_horizon_s": "policy.role_horizon_s",
    "role_dwell_s": "policy.role_dwell_s",
}


def window(text: str) -> tuple[float, float]:
    start, sep, end = text.partition(":")
    try:
        a, b = float(start), float(end)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END in seconds, got {text!r}") from None
    if not sep or b <= a or a < 0:
        raise argparse.ArgumentTypeError(f"expected START:END with 0 <= START < END, got {text!r}")
    return a, b


def add_trace_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--trace", required=True, metavar="SPEC",
                   help="mooncake:PATH, azure:PATH, PATH (.jsonl Mooncake / .csv Azure), or "
                        "synthetic:n=...,rate=...,... (see docs/simulator.md)")
    g.add_argument("--head", type=positive_int, metavar="N", help="only the first N requests")
    g.add_argument("--window", type=window, metavar="START:END",
                   help="only requests arriving in this window of the trace (seconds)")
    g.add_argument("--no-spread-buckets", action="store_true",
                   help="keep Mooncake's 3 s timestamp buckets as batches (default: spread "
                        "arrivals uniformly inside each bucket)")
    g.add_argument("--trace-seed", type=nonnegative_int, default=0, metavar="N",
                   help="seed for bucket spreading and synthetic workloads (default 0)")


def add_config_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster and SLOs (override --config)")
    g.add_argument("--config", type=Path, metavar="FILE.json", help="SimConfig fields as JSON")
    g.add_argument("--model", help="model preset or HF config.json/dir (default lwm-7b-1m)")
    g.add_argument("--hardware", help="hardware preset or HardwareSpec .json (default h100)")
    g.add_argument("--calibration", help="calibration JSON written by `tetris profile`")
    g.add_argument("--prefill-instances", type=positive_int, metavar="N", help="default 8")
    g.add_argument("--decode-instances", type=positive_int, metavar="N", help="default 8")
    g.add_argument("--gpus-per-node", type=positive_int, metavar="N", help="default 8")
    slo = g.add_mutually_exclusive_group()
    slo.add_argument("--ttft-slo-scale", type=positive_float, metavar="X",
                     help="TTFT SLO = X × best isolated TTFT (default 5)")
    slo.add_argument("--ttft-slo", type=positive_float, metavar="SECONDS",
                     help="absolute TTFT SLO")
    g.add_argument("--tbt-slo", type=positive_float, metavar="SECONDS", help="default 0.1")
    g.add_argument("--slo-reference-gpus", type=positive_int, metavar="N",
                   help="group size of the isolated-TTFT reference (default one node)")
    g.add_argument("--tbt-criterion", choices=("mean", "p90", "p99", "max"),
                   help="what of a request's token gaps meets the TBT SLO (default mean)")
    g = p.add_argument_group("simulation")
    g.add_argument("--seed", type=int, help="seed of duration noise (default 0)")
    g.add_argument("--noise-cv", type=nonnegative_float, metavar="CV",
                   help="log-normal noise on every duration (default 0: exact)")
    g.add_argument("--solver-clock", choices=("modeled", "measured", "free"),
                   help="charge planner time as modelled (reproducible, default), measured "
                        "wall time, or not at all")
    g.add_argument("--cp-time-limit-ms", type=positive_float, metavar="MS",
                   help="CP-SAT refinement budget of `tetris` (default 20)")
    g.add_argument("--milp-time-limit-ms", type=positive_float, metavar="MS")
    g.add_argument("--max-planned", type=positive_int, metavar="N",
                   help="requests planned per decision (default 32)")
    g.add_argument("--static-sp", type=positive_int, metavar="S", help="static-sp size (4)")
    g.add_argument("--distserve-group", type=positive_int, metavar="S",
                   help="distserve prefill group size (default 2)")
    g.add_argument("--decode-max-batch", type=positive_int, metavar="N", help="default 256")
    g.add_argument("--stream-kv", action=argparse.BooleanOptionalAction, default=None,
                   help="send each finished chunk's KV to decode while later chunks compute "
                        "(default); --no-stream-kv: the whole prompt's KV after the last chunk")
    g.add_argument("--loongserve-dp", choices=("released", "full"),
                   help="LoongServe's batching DP as released (default) or as in its paper")
    g = p.add_argument_group("elastic roles (disaggregated policies)")
    g.add_argument("--roles", choices=("fixed", "threshold", "optimizer"),
                   help="fixed prefill/decode split (default), or every GPU serving either "
                        "role as the load moves, by a threshold rule or the CP-SAT role "
                        "optimizer; the split above is where roles start")
    g.add_argument("--role-interval-s", type=positive_float, metavar="S",
                   help="how often roles are re-decided (default 2)")
    g.add_argument("--role-horizon-s", type=positive_float, metavar="S",
                   help="the optimizer's look-ahead (default 20)")
    g.add_argument("--role-dwell-s", type=nonnegative_float, metavar="S",
                   help="a GPU keeps a new role at least this long (default 10)")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    data: dict[str, Any] = {}
    if args.config is not None:
        data.update(config_file(args.config))
    where = f"--config {args.config}" if args.config is not None else "settings"
    for section in ("slo", "policy"):
        if section in data and not isinstance(data[section], dict):
            raise UsageError(f"{where}: {section}: expected a JSON object, got "
                             f"{json_type(data[section])}")
    for dest, name in CONFIG_FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            section, _, field = name.rpartition(".")
            target = data.setdefault(section, {}) if section else data
            target[field] = value
    slo = dict(data.get("slo") or {"ttft_scale": 5.0, "tbt_s": 0.1})
    if args.ttft_slo is not None:
        slo.pop("ttft_scale", None)
        slo["ttft_s"] = args.ttft_slo
    elif args.ttft_slo_scale is not None:
        slo.pop("ttft_s", None)
        slo["ttft_scale"] = args.ttft_slo_scale
    if args.tbt_slo is not None:
        slo["tbt_s"] = args.tbt_slo
    data["slo"] = slo
    config: SimConfig = validated("--config" if args.config else "settings", args.config,
                                  SimConfig, data)
    check_limits(config.policy, where)
    # Fail early and clearly, naming the option (or the file the setting came from), before
    # any trace is read.
    model_option(config.model, _origin(args, "model"))
    hardware_option(config.hardware, _origin(args, "hardware"))
    calibration_option(config.calibration, _origin(args, "calibration"))
    for_option("--model/--hardware/--calibration", config.cost_model)
    return config


def _origin(args: argparse.Namespace, dest: str) -> str:
    """How an error names setting `dest`: its flag, or the --config file that gave it."""
    if getattr(args, dest) is None and args.config is not None:
        return f"--config {args.config}: {dest}"
    return "--" + dest


def workload_from_args(args: argparse.Namespace) -> Workload:
    try:
        workload = for_option("--trace", lambda: load_workload(
            args.trace, seed=args.trace_seed, spread_buckets=not args.no_spread_buckets))
    except OSError as err:
        raise UsageError(f"--trace: {err}") from None
    if args.window is not None:
        workload = for_option("--window", workload.window, *args.window)
    if args.head is not None:
        workload = workload.head(args.head)
    if len(workload.requests) < 2:
        raise UsageError(f"--trace: the workload has {len(workload.requests)} request(s); "
                         "a simulation needs at least 2")
    return workload


def trace_summary(workload: Workload) -> dict[str, Any]:
    return {"name": workload.name, "requests": len(workload.requests),
            "duration_s": workload.duration_s, "mean_rate_rps": workload.mean_rate_rps,
            "notes": list(workload.notes)}


# -- instance failures (`tetris simulate` and `tetris whatif`) -----------------------------------
def failure_event(text: str) -> str:
    """argparse type of `--fail`: checked now, kept as written (`FailureSpec.events`)."""
    from tetris.simulator.failures import parse_failure

    try:
        parse_failure(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text.strip()


def add_failure_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("instance failures (disaggregated policies)")
    g.add_argument("--fail", action="append", default=[], type=failure_event, metavar="SPEC",
                   help="take instances down at simulated seconds: prefill:3@120 (for good), "
                        "decode:0@50-80 (back at 80 s), node:1@120-300 (every instance of "
                        "node 1: prefill nodes first, then decode nodes); repeatable")
    g.add_argument("--mtbf-s", type=positive_float, metavar="SECONDS",
                   help="random failures: mean time between failures of each instance "
                        "(exponential, seeded; with --mttr-s)")
    g.add_argument("--mttr-s", type=positive_float, metavar="SECONDS",
                   help="random failures: mean time to repair (exponential)")
    g.add_argument("--fail-unit", choices=("instance", "node"), default="instance",
                   help="what one random failure takes down (default %(default)s)")
    g.add_argument("--fail-seed", type=int, default=0, metavar="N",
                   help="seed of the random failures (default 0)")


def failures_requested(args: argparse.Namespace) -> bool:
    return bool(args.fail) or args.mtbf_s is not None or args.mttr_s is not None


def failures_from_args(args: argparse.Namespace, config: SimConfig) -> FailureSpec | None:
    """The failure schedule of the flags (None without any), checked against the cluster."""
    from tetris.simulator.failures import FailureSpec, check_outages
    from tetris.solver.cluster import ClusterSpec

    if not failures_requested(args):
        return None
    if (args.mtbf_s is None) != (args.mttr_s is None):
        raise UsageError("--mtbf-s and --mttr-s go together")
    spec = FailureSpec(events=tuple(args.fail), mtbf_s=args.mtbf_s, mttr_s=args.mttr_s,
                       unit=args.fail_unit, seed=args.fail_seed)
    cluster = ClusterSpec(prefill_instances=config.prefill_instances,
                          decode_instances=config.decode_instances,
                          gpus_per_node=config.gpus_per_node)
    outages = for_option("--fail", spec.outages, cluster, 0.0)
    for_option("--fail", check_outages, outages, cluster)
    return spec
