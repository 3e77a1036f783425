"""`tetris plan`: offline plan inspection for one cluster snapshot and a set of requests.

Times are seconds from now (now = 0): `--availability` says when each prefill instance is free of
committed work, request arrivals may lie ahead. The plan comes out as a table, the JSON contract
of `tetris.solver.plan_json`, and optionally a Gantt chart of instances × time. With
`--from-server URL` it is the live plan of a running `tetris serve` instead, shown the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tetris.cli.arg_types import (
    MAX_SECONDS,
    MIN_SECONDS,
    bounded_float,
    comma_list,
    number,
    positive_at_most,
    positive_int,
    seconds,
)
from tetris.cli.errors import UsageError, check_output_path, for_option, one_line
from tetris.cli.plan_output import PLAN_PATH, fetch_plan, show
from tetris.cli.spec_files import MAX_TIME_LIMIT_MS, hardware_option, model_option
from tetris.solver.api import PLANNERS
from tetris.solver.cluster import ClusterSpec
from tetris.solver.cost_model import CostModel
from tetris.solver.input_files import InputFileError, json_type, parse_json, read_text
from tetris.solver.model_spec import ModelSpec
from tetris.solver.plan_json import report_from_result
from tetris.solver.problem import DEFAULT_BLOCK_TOKENS, PendingRequest, Problem
from tetris.solver.slo import SloSpec

SOLVERS = tuple(PLANNERS)
#: Largest λ (seconds of TTFT per GPU-second): beyond it the solvers' objectives overflow.
MAX_GPU_COST_WEIGHT = 1e9
GANTT_SUFFIXES = (".png", ".svg")
DEFAULT_TTFT_SLO_SCALE = 5.0

EXAMPLE = """examples:
  tetris plan --prefill-instances 8 --availability 0,0,0,3,3,3,3,3 \\
      --request 131072 --request 8192@0.5 --gantt plan.png
  tetris plan --from-server http://127.0.0.1:8000 --gantt live.svg"""



_availability = comma_list(bounded_float(0.0, MAX_SECONDS))
MAX_INSTANCES = 4096


def instance_count(text: str) -> int:
    value = positive_int(text)
    if value > MAX_INSTANCES:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_INSTANCES}, got {value}")
    return value


def _request_spec(text: str) -> tuple[int, float]:
    # Tokens are range-checked later, where the request's id and the model are known.
    tokens_text, _, arrival_text = text.partition("@")
    try:
        tokens = int(tokens_text)
        arrival = number(arrival_text) if arrival_text else 0.0
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"expected TOKENS[@ARRIVAL_S], e.g. 8192@0.5, got {text!r}"
        ) from None
    if abs(arrival) > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"ARRIVAL_S must be within ±{MAX_SECONDS:g} s, got "
                                         f"{arrival_text}")
    return tokens, arrival


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the example's line breaks; shows defaults, except where there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    p = subparsers.add_parser(
        "plan",
        help="plan requests on a cluster snapshot and show the plan",
        description="Plan requests on a snapshot of the prefill cluster (times in seconds from\n"
        "now) and print the plan as a table or JSON, optionally with a Gantt chart.",
        epilog=EXAMPLE,
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("cluster")
    g.add_argument("--model", default="llama3-8b", help="preset name or HF config.json / dir")
    g.add_argument("--hardware", default="h100", help="preset name or HardwareSpec .json")
    g.add_argument("--prefill-instances", type=instance_count, default=8, metavar="N",
                   help="prefill instances (GPUs), numbered 0..N-1")
    g.add_argument("--gpus-per-node", type=positive_int, default=8, metavar="N",
                   help="instances per node: groups across nodes pay the network link")
    g.add_argument(
        "--availability", type=_availability, metavar="A0,...,A(N-1)",
        help="seconds from now each prefill instance is free (default: all 0)",
    )
    g = p.add_argument_group("requests")
    one = g.add_mutually_exclusive_group(required=True)
    one.add_argument(
        "--request", type=_request_spec, action="append", metavar="TOKENS[@ARRIVAL_S]",
        help="a prompt of TOKENS arriving ARRIVAL_S from now (default 0); repeatable",
    )
    one.add_argument(
        "--requests", type=Path, metavar="FILE.jsonl",
        help="one JSON object a line: prompt_tokens, optional arrival_s, request_id, ttft_slo_s",
    )
    one.add_argument(
        "--from-server", metavar="URL",
        help=f"show the live plan of a running `tetris serve` (GET URL{PLAN_PATH}) instead of "
        "solving; cluster and solver options do not apply, --gpus-per-node only draws nodes",
    )
    slo = g.add_mutually_exclusive_group()
    slo.add_argument("--ttft-slo", type=seconds, metavar="SECONDS",
                     help="absolute TTFT SLO for every request")
    slo.add_argument(
        "--ttft-slo-scale", type=bounded_float(MIN_SECONDS, MAX_SECONDS), metavar="X",
        help="TTFT SLO = X × the request's isolated best-case TTFT "
        f"(default {DEFAULT_TTFT_SLO_SCALE:g})",
    )
    g = p.add_argument_group("solver")
    g.add_argument("--solver", choices=SOLVERS, default="cp", help="planner")
    g.add_argument("--time-limit-ms", type=positive_at_most(MAX_TIME_LIMIT_MS), metavar="MS",
                   help="wall-clock limit (default: the solver's own)")
    g.add_argument("--max-chunks", type=positive_int, metavar="K",
                   help="chunks per request at most (1: one SP size per request)")
    g.add_argument("--max-sp", type=positive_int, metavar="S", help="SP size of any chunk at most")
    g.add_argument("--block-tokens", type=positive_int, default=DEFAULT_BLOCK_TOKENS,
                   metavar="B", help="chunk boundaries are multiples of B tokens")
    g.add_argument("--gpu-cost-weight", type=bounded_float(0.0, MAX_GPU_COST_WEIGHT),
                   default=0.0, metavar="λ",
                   help="objective price of a GPU-second, in seconds of TTFT")
    g = p.add_argument_group("output")
    g.add_argument("--format", choices=("table", "json"), default="table",
                   help="json: the plan report, one object on stdout")
    g.add_argument("--gantt", type=Path, metavar="FILE.png|.svg", help="also draw a Gantt chart")
    p.set_defaults(handler=run)


# -- requests ----------------------------------------------------------------------------------
class RequestLine(BaseModel):
    """One line of a --requests file."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt_tokens: int = Field(strict=True, gt=0)
    arrival_s: float = Field(default=0.0, ge=-MAX_SECONDS, le=MAX_SECONDS)
    request_id: str | None = Field(default=None, min_length=1)
    ttft_slo_s: float | None = Field(default=None, ge=MIN_SECONDS, le=MAX_SECONDS)


@dataclass(frozen=True)
class RequestIn:
    where: str  # how errors name it: "--request r1" or "FILE:LINE"
    request_id: str | None  # None: give it the first free "rN"
    prompt_tokens: int
    arrival_s: float
    ttft_slo_s: float | None = None


def requests_from_options(specs: list[tuple[int, float]]) -> list[RequestIn]:
    return [RequestIn(f"--request r{i}", f"r{i}", t, a) for i, (t, a) in enumerate(specs)]


def requests_from_file(path: Path) -> list[RequestIn]:
    # utf-8-sig: tolerate a byte-order mark. Errors name the file and the line of a bad byte.
    text = for_option("--requests", read_text, path, InputFileError, "utf-8-sig")
    out: list[RequestIn] = []
    # Only "\n" ends a JSONL line: splitlines() would also split inside strings at U+2028 etc.
    lines = [(n, raw.rstrip("\r")) for n, raw in enumerate(text.split("\n"), start=1)]
    for line_no, raw in lines:
        if not raw.strip():
            continue
        where = f"{path}:{line_no}"
        obj = for_option("--requests", parse_json, raw, path, line_no)
        if not isinstance(obj, dict):
            raise UsageError(f"{where}: expected a JSON object, got {json_type(obj)}")
        try:
            line = RequestLine.model_validate(obj)
        except ValidationError as err:
            raise UsageError(f"{where}: {one_line(err)}") from None
        out.append(RequestIn(where, line.request_id, line.prompt_tokens, line.arrival_s,
                             line.ttft_slo_s))
    if not out:
        raise UsageError(f"--requests: {path} holds no requests")
    return _name_unnamed(out)


def _name_unnamed(requests: list[RequestIn]) -> list[RequestIn]:
    """The i-th request, if unnamed, is "r<i>" — or the next "r<j>" no line names itself."""
    taken = {r.request_id for r in requests if r.request_id is not None}
    out = []
    for i, r in enumerate(requests):
        if r.request_id is None:
            j = i
            while f"r{j}" in taken:
                j += 1
            r = dataclasses.replace(r, request_id=f"r{j}")
            taken.add(f"r{j}")
        out.append(r)
    return out


def pending_requests(
    requests: list[RequestIn], cost_model: CostModel, slo: SloSpec
) -> tuple[PendingRequest, ...]:
    model: ModelSpec = cost_model.model
    seen: dict[str, str] = {}
    out = []
    for r in requests:
        assert r.request_id is not None  # named by _name_unnamed / requests_from_options
        if r.request_id in seen:
            raise UsageError(
                f"{r.where}: request id {r.request_id!r} already used at {seen[r.request_id]}"
            )
        seen[r.request_id] = r.where
        if not 0 < r.prompt_tokens <= model.max_context:
            raise UsageError(
                f"{r.where}: prompt tokens must be in [1, {model.max_context}] "
                f"(max context of {model.name}), got {r.prompt_tokens}"
            )
        instances = cost_model.cluster.prefill_instances
        if -(-r.prompt_tokens // instances) > cost_model.kv_capacity_tokens:
            raise UsageError(
                f"{r.where}: the KV cache of {r.prompt_tokens} tokens does not fit on "
                f"{instances} prefill instances ({cost_model.kv_capacity_tokens} tokens each)"
            )
        slo_s = r.ttft_slo_s
        if slo_s is None:
            slo_s = slo.ttft_for(cost_model.best_isolated_ttft(r.prompt_tokens))
        out.append(PendingRequest(r.request_id, r.arrival_s, r.prompt_tokens, slo_s))
    return tuple(out)


# -- the command -------------------------------------------------------------------------------
def build_problem(args: argparse.Namespace) -> Problem:
    """Every option checked, every error a UsageError naming its option, file line or request."""
    model = model_option(args.model)
    hardware = hardware_option(args.hardware)
    n = args.prefill_instances
    cluster = ClusterSpec(prefill_instances=n, gpus_per_node=args.gpus_per_node)
    availability = args.availability or [0.0] * n
    if len(availability) != n:
        raise UsageError(
            f"--availability: has {len(availability)} entries but --prefill-instances is {n}"
        )
    if args.max_sp is not None and args.max_sp > n:
        raise UsageError(f"--max-sp: must be <= --prefill-instances ({n}), got {args.max_sp}")
    cost_model = CostModel(model, hardware, cluster)
    if args.ttft_slo is not None:
        slo = SloSpec(ttft_s=args.ttft_slo)
    else:
        slo = SloSpec(ttft_scale=args.ttft_slo_scale or DEFAULT_TTFT_SLO_SCALE)
    if args.requests is not None:
        raw = requests_from_file(args.requests)
    else:
        raw = requests_from_options(args.request)
    return Problem(
        cost_model=cost_model,
        availability_s=tuple(availability),
        requests=pending_requests(raw, cost_model, slo),
        now_s=0.0,
        block_tokens=args.block_tokens,
        max_chunks=args.max_chunks,
        max_sp=args.max_sp,
        gpu_cost_weight=args.gpu_cost_weight,
    )


def run(args: argparse.Namespace) -> int:
    gantt: Path | None = args.gantt
    if gantt is not None and gantt.suffix.lower() not in GANTT_SUFFIXES:
        raise UsageError(f"--gantt: {gantt} must end in .png or .svg")
    # Checked before solving, so a typo does not cost a long MILP run.
    check_output_path(gantt, "--gantt")
    if args.from_server is not None:
        base, report = fetch_plan(args.from_server)
        return show(report, args, f"live plan of {base}", args.gpus_per_node)
    problem = build_problem(args)
    # Imported here: the solvers pull in OR-Tools and PuLP, which `tetris --version` needs not.
    from tetris.solver.api import solve

    result = solve(problem, args.solver, args.time_limit_ms)
    cm = problem.cost_model
    setting = f"{cm.model.name} on {problem.num_instances} × {cm.hardware.name}"
    return show(report_from_result(problem, result), args, setting, cm.cluster.gpus_per_node)
