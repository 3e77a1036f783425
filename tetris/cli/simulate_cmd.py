"""`tetris simulate`: replay a trace under one policy on a simulated cluster.

Metrics on stdout (a table, or JSON with `--format json`); optional per-request CSV/JSON, a
Chrome trace and a Gantt chart of a time window of prefill.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tetris.cli.arg_types import positive_float
from tetris.cli.errors import UsageError, check_output_path, for_option
from tetris.cli.output import emit, number
from tetris.cli.sim_options import (
    add_config_options,
    add_failure_options,
    add_trace_options,
    config_from_args,
    failures_from_args,
    trace_summary,
    window,
    workload_from_args,
)
from tetris.evaluation.exports import chrome_trace, window_report
from tetris.evaluation.gantt import draw_gantt
from tetris.evaluation.metrics import write_request_csv, write_request_json
from tetris.evaluation.plots import plot_roles
from tetris.evaluation.policies import POLICIES
from tetris.evaluation.whatif import simulate_at_rate


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    p = subparsers.add_parser("simulate", help="replay a trace under one policy (metrics out)")
    add_trace_options(p)
    p.add_argument("--rate", type=positive_float, metavar="RPS",
                   help="time-scale the trace to this mean arrival rate")
    p.add_argument("--policy", choices=list(POLICIES), default="tetris",
                   help="serving policy (default %(default)s)")
    add_config_options(p)
    add_failure_options(p)
    g = p.add_argument_group("output")
    g.add_argument("--format", choices=("table", "json"), default="table")
    g.add_argument("--requests-csv", type=Path, metavar="FILE", help="per-request rows (CSV)")
    g.add_argument("--requests-json", type=Path, metavar="FILE", help="per-request rows (JSON)")
    g.add_argument("--chrome-trace", type=Path, metavar="FILE.json",
                   help="prefill chunks and decode spans for chrome://tracing / Perfetto")
    g.add_argument("--gantt", type=Path, metavar="FILE.png|.svg",
                   help="Gantt chart of prefill in --gantt-window")
    g.add_argument("--gantt-window", type=window, metavar="START:END",
                   help="simulated seconds to draw (default: the first 10 s with work)")
    g.add_argument("--plot-roles", type=Path, metavar="FILE.png|.svg",
                   help="GPUs per role over time (with --roles threshold|optimizer)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    # Only the chosen policy's own settings must fit the cluster (static_sp, say).
    for_option(f"--policy {args.policy}", config.check_policy, args.policy,
               POLICIES[args.policy].architecture)
    for path, option in ((args.gantt, "--gantt"), (args.plot_roles, "--plot-roles")):
        if path is not None and path.suffix.lower() not in (".png", ".svg"):
            raise UsageError(f"{option}: must end in .png or .svg, got {path.name!r}")
    if args.plot_roles is not None and not config.elastic:
        raise UsageError("--plot-roles: roles are fixed; add --roles threshold or optimizer")
    if config.elastic and POLICIES[args.policy].architecture != "disaggregated":
        raise UsageError(f"--roles: elastic roles are simulated for the disaggregated "
                         f"policies only, not {args.policy}")
    for path, option in ((args.requests_csv, "--requests-csv"),
                         (args.requests_json, "--requests-json"),
                         (args.chrome_trace, "--chrome-trace"), (args.gantt, "--gantt"),
                         (args.plot_roles, "--plot-roles")):
        check_output_path(path, option)  # before the run, not after it
    workload = workload_from_args(args)
    failures = failures_from_args(args, config)
    if failures is not None and POLICIES[args.policy].architecture != "disaggregated":
        raise UsageError(f"--fail/--mtbf-s: failures are simulated for the disaggregated "
                         f"policies only, not {args.policy}")
    result = simulate_at_rate(workload, args.policy, config, args.rate, keep_records=True,
                              failures=failures)
    records = result.records or []
    architecture = POLICIES[args.policy].architecture
    prefill = config.total_gpus if architecture == "unified" else config.prefill_instances
    if args.requests_csv:
        write_request_csv(records, args.requests_csv)
    if args.requests_json:
        write_request_json(records, args.requests_json)
    if args.chrome_trace:
        chrome_trace(records, prefill, args.chrome_trace)
    if args.gantt:
        first = min((c.start_s for r in records for c in r.chunks), default=0.0)
        start, end = args.gantt_window or (first, first + 10.0)
        report = window_report(records, prefill, start, end, args.policy)
        draw_gantt(report, args.gantt, title=f"{args.policy}: prefill {start:g}–{end:g} s",
                   gpus_per_node=config.gpus_per_node)
    if args.plot_roles:
        plot_roles(result.roles, args.plot_roles, title=f"{args.policy}, roles by "
                   f"{config.policy.roles}: {config.total_gpus} GPUs")
    scaled = workload if args.rate is None else workload.scaled_to_rate(args.rate)
    out = {
        "trace": trace_summary(scaled),
        "policy": args.policy,
        "architecture": architecture,
        "cluster": config.model_dump(mode="json"),
        "slo": config.slo.model_dump(mode="json"),
        "metrics": result.metrics,
        "stats": result.stats,
    }
    if failures is not None:
        out["failures"] = failures.model_dump(mode="json")
    if config.elastic:
        out["roles"] = [{"t_s": t, "prefill": p, "decode": d, "draining": x}
                        for t, p, d, x in result.roles]
    emit(out, args.format, print_table)
    return 0



def print_table(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    trace = out["trace"]
    console = Console()
    console.print(f"[bold]{out['policy']}[/] ({out['architecture']}) on {trace['name']}: "
                  f"{trace['requests']} requests, {trace['mean_rate_rps']:.3g} req/s")
    for note in trace["notes"]:
        console.print(f"  note: {note}")
    m = out["metrics"]
    table = Table(show_header=True, header_style="bold")
    for col in ("metric", "mean", "p50", "p90", "p99"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for name in ("ttft", "tbt", "e2e"):
        table.add_row(f"{name} (s)", *(number(m.get(f"{name}_{q}_s"))
                                       for q in ("mean", "p50", "p90", "p99")))
    quantiles = ("mean", "p50", "p90", "p99")
    table.add_row("normalized latency (s/token)", *(
        number(m.get(f"normalized_latency_{q}_s_per_token")) for q in quantiles))
    console.print(table)
    console.print(f"SLO attainment {number(m.get('slo_attainment'))} (TTFT "
                  f"{number(m.get('ttft_attainment'))}, TBT {number(m.get('tbt_attainment'))}); "
                  f"goodput {number(m.get('goodput_rps'))} req/s")
    s = out["stats"]
    console.print(f"{number(s.get('events'))} events in {number(s.get('wall_s'))} s; "
                  f"{number(s.get('plans_validated'))} plans validated")
    print_failures(console, m)


def print_failures(console: Any, metrics: dict[str, Any]) -> None:
    """SLO attainment by arrival window, for a run with failures."""
    windows = metrics.get("failure_windows")
    if not windows:
        return
    f = metrics["failures"]
    console.print(f"failures: down {f['down_intervals']}; {f['requests_redone']} requests "
                  f"redone ({f['redos']} redos)")
    for name, w in windows.items():
        console.print(f"  arrived {name}: {w['requests']} requests, SLO attainment "
                      f"{number(w['slo_attainment'])}, TTFT p90 {number(w['ttft_p90_s'])} s, "
                      f"{w['requests_redone']} redone")
