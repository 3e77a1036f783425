"""Elastic roles against the fixed split: the same trace, cluster and prefill policy with roles
fixed, moved by the threshold rule, and moved by the CP-SAT role optimizer (its measured solve
time is printed; the simulation charges the modelled one).

For each roles mode: the max sustainable rate (SLO attainment >= 90%, as `tetris whatif`
searches it) unless `--no-search`, and at each `--rates` point the attainment, P90 TTFT, TBT
attainment, role changes and the optimizer's solve times. The fluid bound of the trace and
cluster (`tetris.evaluation.bound`: elastic and best fixed split) is printed beside, with every
max rate as a share of the elastic bound.

Prints JSON (with the optimizer's roles over time at the first `--rates` point). `--page FILE.md`
writes the table as markdown, `--plot` the roles over time, `--attainment-plot` attainment vs
rate of every mode (the search's evaluations) with the bounds drawn; `--from FILE.json` renders
those from an earlier run's JSON instead of simulating. Usage (a few minutes per mode on one
core with --head 3000):
    .venv/bin/python benchmarks/elastic_roles.py [--trace SPEC] [--head N] [--rates 5,6]
        [--policy tetris-greedy] [--prefill 8 --decode 8] [--no-search]
        [--page FILE.md] [--plot FILE.png] [--attainment-plot FILE.png] [--from FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tetris.evaluation.bound import bound_of
from tetris.evaluation.capacity import find_max_rate
from tetris.evaluation.plots import plot_attainment_vs_rate, plot_roles
from tetris.evaluation.sim_config import SimConfig
from tetris.evaluation.whatif import simulate_at_rate
from tetris.evaluation.workload_spec import load_workload
from tetris.solver.policy.settings import PolicySettings

DEFAULT_TRACE = "mooncake:../shared/traces/mooncake_conversation_trace.jsonl"
MODES = ("fixed", "threshold", "optimizer")
TARGET = 0.9


def _point(result: Any) -> dict[str, Any]:
    m, s = result.metrics, result.stats
    decisions = s.get("role_decisions") or 0
    return {
        "rate_rps": result.rate_rps,
        "slo_attainment": m["slo_attainment"], "ttft_attainment": m["ttft_attainment"],
        "tbt_attainment": m["tbt_attainment"], "ttft_p90_s": m["ttft_p90_s"],
        "first_gap_p50_s": m.get("first_gap_p50_s"),
        "role_changes": s.get("role_changes", 0), "role_decisions": decisions,
        "role_solve_mean_ms": 1e3 * s["role_planner_wall_s"] / decisions if decisions else None,
        "role_solve_max_ms": 1e3 * s["role_planner_wall_max_s"] if decisions else None,
        "plans_validated": s.get("plans_validated"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=DEFAULT_TRACE)
    ap.add_argument("--head", type=int, default=None)
    ap.add_argument("--rates", default="", help="comma-separated rates to report (req/s)")
    ap.add_argument("--policy", default="tetris-greedy")
    ap.add_argument("--prefill", type=int, default=8)
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--no-search", action="store_true", help="skip the max-rate search")
    ap.add_argument("--plot", default=None, help="roles over time of the optimizer's run at "
                    "the first --rates point (.png/.svg)")
    ap.add_argument("--attainment-plot", default=None)
    ap.add_argument("--page", default=None)
    ap.add_argument("--from", dest="source", default=None, help="render an earlier JSON")
    args = ap.parse_args()
    if args.source:
        with open(args.source, encoding="utf-8") as f:
            out = json.load(f)
    else:
        out = measure(args)
        print(json.dumps(out, indent=2))
    render(out, args)
    return 0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    workload = load_workload(args.trace)
    if args.head:
        workload = workload.head(args.head)
    rates = [float(r) for r in args.rates.split(",") if r]
    base = SimConfig(prefill_instances=args.prefill, decode_instances=args.decode)
    bound = bound_of(workload.requests, base).to_json()
    out: dict[str, Any] = {"trace": args.trace, "requests": len(workload), "policy":
                           args.policy, "split": [args.prefill, args.decode], "bound": bound,
                           "modes": {}}
    for mode in args.modes.split(","):
        config = base.model_copy(update={"policy": PolicySettings(roles=mode)})
        row: dict[str, Any] = {"points": []}
        for rate in rates:
            result = simulate_at_rate(workload, args.policy, config, rate)
            row["points"].append(_point(result))
            if mode == "optimizer" and rate == rates[0]:
                out["roles_timeline"] = {"rate_rps": rate, "points": result.roles}
        if not args.no_search:
            def attainment(rate: float, cfg: SimConfig = config) -> float:
                return float(simulate_at_rate(workload, args.policy, cfg,
                                              rate).metrics["slo_attainment"])

            cap = find_max_rate(attainment, start_rps=max(rates or [1.0]), target=TARGET)
            row["max_rate_rps"] = cap.max_rate_rps
            row["share_of_elastic_bound"] = cap.max_rate_rps / bound["elastic_rps"]
            row["evaluations"] = cap.evaluations
        out["modes"][mode] = row
        print(json.dumps({mode: row}), file=sys.stderr)
    return out


def render(out: dict[str, Any], args: argparse.Namespace) -> None:
    bound = out["bound"]
    gpus = sum(out["split"])
    timeline = out.get("roles_timeline")
    if args.plot and timeline:
        plot_roles([tuple(p) for p in timeline["points"]], args.plot,
                   title=f"{out['policy']}, role optimizer, {gpus} GPUs at "
                         f"{timeline['rate_rps']:g} req/s")
    if args.attainment_plot:
        curves = {mode: [(r, a) for r, a in row.get("evaluations", [])]
                  for mode, row in out["modes"].items()}
        best = bound["best_split"]
        plot_attainment_vs_rate(curves, args.attainment_plot, target=TARGET, bounds={
            "elastic bound": bound["elastic_rps"],
            f"best split {best[0]}+{best[1]} bound": bound["fixed_split_rps"]},
            title=f"{out['policy']}: fixed vs elastic roles, {gpus} GPUs")
    if args.page:
        lines = ["| roles | max rate (req/s) | share of elastic bound | " + " | ".join(
            f"attainment @ {p['rate_rps']:g}" for p in next(iter(out["modes"].values()))[
                "points"]) + " | role changes | solve mean / max (ms) |",
                 "|---|---|---|" + "---|" * (len(next(iter(out["modes"].values()))["points"])
                                             + 2)]
        for mode, row in out["modes"].items():
            pts = row["points"]
            solve = pts[0]["role_solve_mean_ms"] if pts else None
            solve_max = max((p["role_solve_max_ms"] or 0.0 for p in pts), default=0.0)
            lines.append(
                f"| {mode} | {row.get('max_rate_rps', float('nan')):.2f} | "
                f"{row.get('share_of_elastic_bound', float('nan')):.0%} | " + " | ".join(
                    f"{p['slo_attainment']:.1%}" for p in pts) +
                f" | {sum(p['role_changes'] for p in pts)} | " +
                (f"{solve:.1f} / {solve_max:.1f}" if solve else "–") + " |")
        lines.append("")
        lines.append(f"Bound: elastic {bound['elastic_rps']:.2f} req/s; best fixed split "
                     f"{bound['best_split'][0]}+{bound['best_split'][1]} at "
                     f"{bound['fixed_split_rps']:.2f} ({bound['binding']} binds).")
        with open(args.page, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
