"""How `tetris plan` shows a plan: a table or JSON, a Gantt chart; and fetching a live plan from
a running `tetris serve` (`--from-server`)."""

from __future__ import annotations

import argparse
import http.client
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tetris.cli.errors import UsageError, one_line
from tetris.solver.plan import SolveStatus
from tetris.solver.plan_json import PlanReport, parse_plan_report

PLAN_PATH = "/v1/tetris/plan"
FETCH_TIMEOUT_S = 10.0


def show(report: PlanReport, args: argparse.Namespace, setting: str, gpus_per_node: int) -> int:
    """Print the plan (table or JSON) and draw --gantt; 1 if the solver found no plan.
    `setting` says what was planned: the cluster, or the server the plan came from."""
    if args.format == "json":
        print(report.model_dump_json())
    else:
        print_table(report, setting)
    s = report.solver
    if not SolveStatus(s.status).has_plans:
        print(f"tetris: solver {s.name} found no plan: {s.status}", file=sys.stderr)
        return 1
    gantt: Path | None = args.gantt
    if gantt is not None:
        from tetris.evaluation.gantt import draw_gantt

        title = f"{setting}: {len(report.plans)} requests, solver {s.name} ({s.status})"
        try:
            draw_gantt(report, gantt, title, gpus_per_node=gpus_per_node)
        except OSError as err:
            raise UsageError(f"--gantt: cannot write {gantt}: {err.strerror or one_line(err)}"
                             ) from None
        if args.format != "json":
            print(f"Gantt chart written to {gantt}")
    return 0


def fetch_plan(server: str, timeout_s: float = FETCH_TIMEOUT_S) -> tuple[str, PlanReport]:
    """GET the live plan; every failure is one UsageError line. Returns (server URL, plan)."""
    if not server.startswith(("http://", "https://")):
        raise UsageError(f"--from-server: expected an http:// or https:// URL, got {server!r}")
    # An OpenAI base URL (".../v1") is what users of the API have at hand.
    base = server.rstrip("/").removesuffix("/v1")
    url = base + PLAN_PATH
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as err:
        raise UsageError(f"--from-server: {url} answered HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise UsageError(f"--from-server: cannot reach {url}: {_reason_text(err.reason)}"
                         ) from None
    except (OSError, http.client.HTTPException, ValueError) as err:
        raise UsageError(f"--from-server: cannot reach {url}: {_reason_text(err)}") from None
    try:
        return base, parse_plan_report(body, f"{url} did not return a plan")
    except ValueError as err:
        raise UsageError(f"--from-server: {one_line(err)}") from None


def _reason_text(reason: object) -> str:
    return one_line(reason) if isinstance(reason, BaseException) else " ".join(str(reason).split())


# -- table output ------------------------------------------------------------------------------
def format_instances(instances: list[int]) -> str:
    """Runs compressed: [0, 1, 2, 5] -> "0-2,5"."""
    parts: list[str] = []
    ordered = sorted(instances)
    start = prev = ordered[0]
    for g in [*ordered[1:], None]:
        if g is not None and g == prev + 1:
            prev = g
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if g is not None:
            start = prev = g
    return ",".join(parts)


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_table(report: PlanReport, setting: str) -> None:
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # Captured or piped output gets a fixed width, so the tables never wrap mid-row.
    console = Console(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 110)
    s = report.solver
    extras = escape(" ".join(
        f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.stats.items()
    ))
    line = (f"solver [bold]{s.name}[/]: {s.status}, {s.wall_ms:.1f} ms, "
            f"objective {_num(s.objective, 4)}, bound {_num(s.bound, 4)}")
    console.print(line + (f"  ({extras})" if extras else ""), soft_wrap=True)
    availability = " ".join(f"{a:g}" for a in report.availability_s)
    console.print(f"{escape(setting)}; availability (s): {availability}", soft_wrap=True)
    if not report.plans:
        return
    chunks = Table(title="Chunks", box=box.SIMPLE_HEAD, title_justify="left")
    for name in ("request", "chunk", "tokens", "SP", "instances", "start s", "end s"):
        chunks.add_column(name, justify="left" if name in ("request", "instances") else "right")
    for plan in report.plans:
        for k, c in enumerate(plan.chunks):
            chunks.add_row(
                escape(plan.request_id) if k == 0 else "", str(k), f"{c.start_token}-{c.end_token}",
                str(c.sp), format_instances(c.instances), _num(c.start_s), _num(c.end_s),
                end_section=k == len(plan.chunks) - 1,
            )
    requests = Table(title="Requests", box=box.SIMPLE_HEAD, title_justify="left")
    for name in ("request", "arrival s", "tokens", "chunks", "prefill end s", "TTFT s",
                 "SLO s", "slack s", "SLO"):
        requests.add_column(name, justify="left" if name in ("request", "SLO") else "right")
    for plan in report.plans:
        requests.add_row(
            escape(plan.request_id), _num(plan.arrival_s), str(plan.prompt_tokens),
            str(len(plan.chunks)),
            _num(plan.prefill_end_s), _num(plan.ttft_s), _num(plan.ttft_slo_s),
            _num(plan.slo_slack_s), "met" if plan.meets_slo else "[red]MISSED[/]",
        )
    console.print(chunks)
    console.print(requests)
