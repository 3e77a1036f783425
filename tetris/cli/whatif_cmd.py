"""`tetris whatif`: SLO what-if analysis over policies, rates, sweeps and GPU counts.

JSON contract (`--format json`; more keys may be added, none removed):
    {"trace", "slo", "cluster", "target",
     "bound": {"fixed_split_rps", "best_split": [P, D], "elastic_rps", "binding",
               "configured_split", "per_request", ...}       (the fluid bound: bound.py)
     "policies": {NAME: {"max_sustainable_rate_rps", "share_of_bound",
                         "share_of_split_bound" (fixed roles), "search", "plans_validated",
                         "at_rates": [{"rate_rps", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s",
                                       "tbt_p50_s", "tbt_p99_s", "slo_attainment", ...}]}},
     "sweep": [{"point": {FIELD: VALUE}, "policies": {...}}],       (with --sweep)
     "min_gpus": {NAME: {"rate_rps", "gpus", "prefill_instances", ...}},  (with --min-gpus-for)
     "best_split": {"from_bound": [P, D], "policies": {NAME: {"split", "max_sustainable_rate_rps",
                    "tried": [...]}}}}                                   (with --best-split)
With --fail / --mtbf-s, also "failures": the schedule, and every at-rate row has
"failure_windows", "healthy_windows": {"before"|"during"|"after": {"requests",
"slo_attainment", "ttft_attainment", "tbt_attainment", "ttft_p90_s", "requests_redone"}} and
"failures": {"down_intervals", "requests_redone", "redos"}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.progress import Progress

from tetris.cli.arg_types import comma_list, positive_float, positive_int
from tetris.cli.errors import UsageError, check_output_path, for_option
from tetris.cli.output import emit, number
from tetris.cli.sim_options import (
    add_config_options,
    add_failure_options,
    add_trace_options,
    config_from_args,
    failures_from_args,
    failures_requested,
    trace_summary,
    workload_from_args,
)
from tetris.cli.whatif_bound import (
    add_shares,
    bound,
    print_bound,
    run_best_split,
    split_policies,
)
from tetris.evaluation.bound import FluidBound
from tetris.evaluation.plots import plot_attainment_vs_rate, plot_cdfs
from tetris.evaluation.policies import POLICIES
from tetris.evaluation.sim_config import SimConfig
from tetris.evaluation.whatif import (
    DEFAULT_MAX_EVALS,
    DEFAULT_REL_TOL,
    DEFAULT_TARGET,
    GpuUnit,
    SearchOutcome,
    SearchUnit,
    Task,
    apply_point,
    run_gpu_unit,
    run_parallel,
    run_search_unit,
    sweep_points,
)
from tetris.evaluation.workload import Workload

DEFAULT_POLICIES = ("tetris", "tetris-greedy", "loongserve", "distserve", "static-sp")


def sweep_spec(text: str) -> tuple[str, list[Any]]:
    name, sep, values = text.partition("=")
    if not sep or not name.strip() or not values.strip():
        raise argparse.ArgumentTypeError(f"expected FIELD=V1,V2,..., got {text!r}")
    parsed: list[Any] = []
    for v in values.split(","):
        try:
            parsed.append(json.loads(v))
        except json.JSONDecodeError:
            parsed.append(v.strip())  # a bare word, e.g. a model preset name
    return name.strip(), parsed


def fraction(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    p = subparsers.add_parser("whatif", help="max sustainable rate, sweeps, fewest GPUs")
    add_trace_options(p)
    g = p.add_argument_group("what to find")
    g.add_argument("--policy", action="append", choices=list(POLICIES), metavar="NAME",
                   help=f"policy to evaluate, repeatable (default {', '.join(DEFAULT_POLICIES)};"
                        f" all: {', '.join(POLICIES)})")
    g.add_argument("--rates", type=comma_list(positive_float), default=[], metavar="R1,R2",
                   help="also report metrics at these arrival rates (req/s)")
    g.add_argument("--no-search", action="store_true", help="skip the max sustainable rate")
    g.add_argument("--at-rate-of", metavar="POLICY",
                   help="add each policy's metrics at POLICY's max sustainable rate")
    g.add_argument("--sweep", type=sweep_spec, action="append", default=[],
                   metavar="FIELD=V1,V2", help="sweep a setting, e.g. prefill_instances=4,6,8 "
                   "or slo.ttft_scale=2,5,10 (repeatable: cartesian product)")
    g.add_argument("--min-gpus-for", type=positive_float, metavar="RPS",
                   help="fewest GPUs (same prefill:decode share) sustaining this rate")
    g.add_argument("--max-gpus", type=positive_int, default=64, metavar="N",
                   help="largest cluster --min-gpus-for considers (default %(default)s)")
    g.add_argument("--target", type=fraction, default=DEFAULT_TARGET,
                   help="SLO attainment that counts as sustained (default %(default)s)")
    g.add_argument("--rel-tol", type=positive_float, default=DEFAULT_REL_TOL,
                   help="relative width at which the rate search stops (default %(default)s)")
    g.add_argument("--max-evals", type=positive_int, default=DEFAULT_MAX_EVALS,
                   help="simulations per rate search at most (default %(default)s)")
    g.add_argument("--best-split", action="store_true",
                   help="also find the fixed prefill:decode split of the same GPUs that "
                   "sustains the most (from the fluid bound, confirmed by simulation)")
    g.add_argument("--start-rate", type=positive_float, metavar="RPS",
                   help="first rate the search tries (default: the trace's own)")
    add_config_options(p)
    add_failure_options(p)
    g = p.add_argument_group("execution and output")
    g.add_argument("--jobs", type=positive_int, default=1, metavar="N",
                   help="parallel worker processes (default 1)")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="run simulations as Ray tasks on this cluster ('local' starts one)")
    g.add_argument("--format", choices=("table", "json"), default="table")
    g.add_argument("--plot-cdf", type=Path, metavar="FILE.png|.svg",
                   help="TTFT/TBT CDFs per policy at the --at-rate-of rate (or first --rates)")
    g.add_argument("--plot-attainment", type=Path, metavar="FILE.png|.svg",
                   help="SLO attainment vs rate per policy (from the searches)")
    p.set_defaults(handler=run)


def _check(args: argparse.Namespace, policies: list[str]) -> None:
    if args.at_rate_of is not None:
        if args.at_rate_of not in policies:
            raise UsageError(f"--at-rate-of: {args.at_rate_of!r} is not among the policies "
                             f"evaluated ({', '.join(policies)})")
        if args.no_search:
            raise UsageError("--at-rate-of needs the max-rate search (drop --no-search)")
    if args.no_search and not args.rates and args.min_gpus_for is None and \
            not failures_requested(args):
        raise UsageError("nothing to do: --no-search without --rates or --min-gpus-for")
    if args.plot_cdf is not None and args.at_rate_of is None and not args.rates:
        raise UsageError("--plot-cdf needs --at-rate-of or --rates")
    for path, opt in ((args.plot_cdf, "--plot-cdf"), (args.plot_attainment, "--plot-attainment")):
        if path is not None and path.suffix.lower() not in (".png", ".svg"):
            raise UsageError(f"{opt}: must end in .png or .svg, got {path.name!r}")
        check_output_path(path, opt)  # before the simulations, not after them


def _check_point(point: dict[str, Any], config: SimConfig, policies: list[str]) -> None:
    """Each policy's own settings fit this (swept) cluster; a swept model, hardware or
    calibration loads. Checked before any simulation starts."""
    where = f"--sweep {json.dumps(point)}" if point else "--policy"
    if point:
        for_option(where, config.cost_model)
    for policy in policies:
        for_option(f"{where} {policy}", config.check_policy, policy,
                   POLICIES[policy].architecture)


def run(args: argparse.Namespace) -> int:
    policies = list(dict.fromkeys(args.policy or DEFAULT_POLICIES))
    if failures_requested(args):
        policies = _failure_policies(args, policies)
    _check(args, policies)
    split_search = split_policies(args, policies) if args.best_split else []
    base = config_from_args(args)
    failures = failures_from_args(args, base)
    search, rates = not args.no_search, tuple(args.rates)
    if failures is not None:  # the question is "at this rate, lose these instances"
        search = search and args.at_rate_of is not None
        rates = rates or (() if args.at_rate_of is not None else (None,))
    workload = workload_from_args(args)
    points = for_option("--sweep", sweep_points, args.sweep)
    configs = [for_option("--sweep", apply_point, base, point) for point in points]
    for point, config in zip(points, configs, strict=True):
        _check_point(point, config, policies)
    limits = [bound(workload, config, f"--sweep {json.dumps(point)}" if point else "bound")
              for point, config in zip(points, configs, strict=True)]
    keep = args.plot_cdf is not None and args.at_rate_of is None
    units = [SearchUnit(policy, config, point, search=search,
                        rates=rates, target=args.target, rel_tol=args.rel_tol,
                        max_evals=args.max_evals, start_rps=args.start_rate,
                        keep_records=keep, failures=failures)
             for point, config in zip(points, configs, strict=True) for policy in policies]
    tasks: list[Task] = [(run_search_unit, (workload, u)) for u in units]
    if args.min_gpus_for is not None:
        candidates = tuple(range(2, args.max_gpus + 1))
        tasks += [(run_gpu_unit, (workload, GpuUnit(p, base, args.min_gpus_for, candidates,
                                                     args.target))) for p in policies]
    results = _execute(tasks, args, "simulating")
    outcomes: list[SearchOutcome] = [results[i] for i in range(len(units))]
    if args.at_rate_of is not None:
        outcomes = _at_rate_of(outcomes, workload, args)
    out: dict[str, Any] = {
        "trace": trace_summary(workload),
        "slo": base.slo.model_dump(mode="json"),
        "cluster": base.model_dump(mode="json"),
        "target": args.target,
        "bound": limits[0].to_json(),
    }
    if failures is not None:
        out["failures"] = {**failures.model_dump(mode="json"), "note": FAILURE_NOTE}
    by_point = [[o for o in outcomes if o.unit.point == point] for point in points]
    out["policies"] = _policies_json(by_point[0], limits[0]) if not args.sweep else {}
    if args.sweep:
        out["sweep"] = [{"point": point, "bound": limit.to_json(),
                         "policies": _policies_json(group, limit)}
                        for point, group, limit in zip(points, by_point, limits, strict=True)]
    if split_search:
        def run_units(batch: list[SearchUnit]) -> list[SearchOutcome]:
            done = _execute([(run_search_unit, (workload, u)) for u in batch], args,
                            "searching splits")
            return [done[i] for i in range(len(batch))]

        out["best_split"] = run_best_split(args, split_search, base, limits[0], run_units)
    if args.min_gpus_for is not None:
        out["min_gpus"] = {p: results[len(units) + k] for k, p in enumerate(policies)}
    _plots(args, outcomes, limits[0])
    emit(out, args.format, print_table)
    return 0


def _execute(tasks: list[Task], args: argparse.Namespace, label: str) -> dict[int, Any]:
    results: dict[int, Any] = {}
    with Progress(transient=True, redirect_stdout=False) as progress:
        bar = progress.add_task(label, total=len(tasks))
        for index, result in run_parallel(tasks, jobs=args.jobs, ray_address=args.ray_address):
            results[index] = result
            progress.update(bar, advance=1)
    return results


def _at_rate_of(outcomes: list[SearchOutcome], workload: Workload,
                args: argparse.Namespace) -> list[SearchOutcome]:
    """Phase 2: every policy at the reference policy's max rate (per sweep point)."""
    reference = {json.dumps(o.unit.point, sort_keys=True): o.capacity for o in outcomes
                 if o.unit.policy == args.at_rate_of}
    tasks: list[Task] = []
    for o in outcomes:
        cap = reference[json.dumps(o.unit.point, sort_keys=True)]
        rate = float(cap["max_rate_rps"]) if cap else 0.0
        if rate <= 0:
            raise UsageError(f"--at-rate-of: {args.at_rate_of} sustains no rate at "
                             f"{o.unit.point or 'the base settings'}")
        unit = SearchUnit(o.unit.policy, o.unit.config, o.unit.point, search=False,
                          rates=(rate,), keep_records=args.plot_cdf is not None,
                          failures=o.unit.failures)
        tasks.append((run_search_unit, (workload, unit)))
    extra = _execute(tasks, args, f"at {args.at_rate_of}'s max rate")
    for i, o in enumerate(outcomes):
        run = extra[i].at_rates[0]
        run.stats["at_rate_of"] = args.at_rate_of
        o.at_rates.append(run)
        o.plans_validated += extra[i].plans_validated
    return outcomes


def _policies_json(outcomes: list[SearchOutcome], limit: FluidBound) -> dict[str, Any]:
    out = {}
    for o in outcomes:
        rows = []
        for run in o.at_rates:
            row = run.row()
            if "at_rate_of" in run.stats:
                row["at_rate_of"] = run.stats["at_rate_of"]
            rows.append(row)
        out[o.unit.policy] = {
            "max_sustainable_rate_rps": o.capacity["max_rate_rps"] if o.capacity else None,
            "search": o.capacity,
            "at_rates": rows,
            "plans_validated": o.plans_validated,
            "architecture": POLICIES[o.unit.policy].architecture,
        }
    add_shares(out, limit)
    return out


def _plots(args: argparse.Namespace, outcomes: list[SearchOutcome],
           limit: FluidBound) -> None:
    first_point = outcomes[0].unit.point if outcomes else {}
    mine = [o for o in outcomes if o.unit.point == first_point]
    if args.plot_attainment is not None:
        c = limit.configured
        bounds = {"bound, elastic roles": limit.elastic_rps,
                  f"bound, {c.prefill}+{c.decode} split": c.rps}
        curves = {o.unit.policy: [(r, a) for r, a in o.capacity["evaluations"]]
                  for o in mine if o.capacity}
        plot_attainment_vs_rate(curves, args.plot_attainment, target=args.target,
                                bounds=bounds)
    if args.plot_cdf is not None:
        runs = {o.unit.policy: o.at_rates[-1].records or [] for o in mine if o.at_rates}
        plot_cdfs(runs, args.plot_cdf)



def _rate_label(row: dict[str, Any]) -> str:
    rate = f"{row['rate_rps']:.4g}"
    return rate + (f" (= {row['at_rate_of']} max)" if "at_rate_of" in row else "")


def print_table(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    trace = out["trace"]
    console.print(f"[bold]what-if[/] on {trace['name']} ({trace['requests']} requests); "
                  f"SLO {out['slo']}; target attainment {out['target']}")
    groups: list[tuple[str, dict[str, Any]]] = []
    if out.get("sweep"):
        groups = [(json.dumps(s["point"]), s["policies"]) for s in out["sweep"]]
    else:
        groups = [("", out["policies"])]
    for title, policies in groups:
        table = Table(title=title or None, header_style="bold")
        for col in ("policy", "max rate (req/s)", "at rate", "TTFT p50/p90/p99 (s)",
                    "TBT p50/p99 (s)", "attainment"):
            table.add_column(col)
        for name, res in policies.items():
            share = res.get("share_of_bound")
            table.add_row(name, number(res["max_sustainable_rate_rps"]) + (
                f" ({share:.0%} of bound)" if share is not None else ""), "", "", "", "")
            for r in res["at_rates"]:
                table.add_row("", "", _rate_label(r),
                              "/".join(number(r[k], 3) for k in
                                       ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s")),
                              "/".join(number(r[k], 3) for k in ("tbt_p50_s", "tbt_p99_s")),
                              number(r["slo_attainment"], 3))
        console.print(table)
        print_failure_windows(console, policies)
    print_bound(console, out)
    for name, res in (out.get("min_gpus") or {}).items():
        console.print(f"{name}: fewest GPUs for {res['rate_rps']:g} req/s = {res['gpus']}")


# -- failure what-ifs ----------------------------------------------------------------------------
FAILURE_NOTE = ("failures apply to the at-rate runs (--rates, the --at-rate-of rate, or else "
                "the trace's own rate); max-rate and --min-gpus-for searches are of the healthy "
                "cluster; windows are by arrival time")


def _failure_policies(args: argparse.Namespace, policies: list[str]) -> list[str]:
    """Failures are simulated on the disaggregated policies: the default list drops the
    others, an explicit one is refused."""
    unified = [p for p in policies if POLICIES[p].architecture != "disaggregated"]
    if unified and args.policy:
        raise UsageError(f"--fail/--mtbf-s: failures are simulated for the disaggregated "
                         f"policies only, not {', '.join(unified)}")
    return [p for p in policies if p not in unified]


def print_failure_windows(console: Any, policies: dict[str, Any]) -> None:
    from rich.table import Table

    rows = [(name, r) for name, res in policies.items() for r in res["at_rates"]
            if "failure_windows" in r]
    if not rows:
        return
    table = Table(title="SLO attainment by arrival window (healthy run in brackets)",
                  header_style="bold")
    for col in ("policy", "rate", "window", "requests", "attainment", "TTFT p90 (s)",
                "redone"):
        table.add_column(col)
    for name, r in rows:
        for window, w in r["failure_windows"].items():
            h = r.get("healthy_windows", {}).get(window, {})
            table.add_row(name, _rate_label(r), window, str(w["requests"]),
                          f"{number(w['slo_attainment'], 3)} "
                          f"({number(h.get('slo_attainment'), 3)})",
                          f"{number(w['ttft_p90_s'], 3)} ({number(h.get('ttft_p90_s'), 3)})",
                          str(w["requests_redone"]))
    console.print(table)
