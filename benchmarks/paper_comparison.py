"""The paper's comparison: Tetris vs LoongServe, DistServe and static SP on real traces.

For each trace: every policy's max sustainable rate (SLO attainment >= 90%), every policy's
metrics at LoongServe's max rate (the paper's headline: P90 TTFT and median TBT there), all of
it at every TTFT SLO scale of a sweep (so the result does not hang on one hand-picked SLO), and
`tetris` vs `tetris-greedy` at high load. Writes JSON to stdout and, with
--page, a results page (markdown tables + plots) under docs/results/.

    .venv/bin/python benchmarks/paper_comparison.py --jobs 2 --page docs/results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tetris.evaluation.plots import plot_attainment_vs_rate, plot_cdfs, plot_sweep
from tetris.evaluation.sim_config import SimConfig
from tetris.evaluation.whatif import SearchUnit, apply_point, run_parallel, run_search_unit
from tetris.evaluation.workload import Workload
from tetris.evaluation.workload_spec import load_workload

TRACES = {
    "mooncake": "mooncake:../shared/traces/mooncake_conversation_trace.jsonl",
    "azure": "azure:../shared/traces/AzureLLMInferenceTrace_conv.csv",
}
POLICIES = ("tetris", "tetris-greedy", "loongserve", "distserve", "static-sp")


def searches(workload: Workload, config: SimConfig, policies: tuple[str, ...],
             jobs: int, rel_tol: float, max_evals: int, keep: bool = False,
             rates: dict[str, tuple[float, ...]] | None = None) -> dict[str, Any]:
    units = [SearchUnit(p, config, search=rates is None, rates=(rates or {}).get(p, ()),
                        rel_tol=rel_tol, max_evals=max_evals, keep_records=keep)
             for p in policies]
    tasks = [(run_search_unit, (workload, u)) for u in units]
    out = {}
    for i, result in run_parallel(tasks, jobs=jobs):
        out[units[i].policy] = result
        print(f"  {units[i].policy}: done", file=sys.stderr, flush=True)
    return out


def headline_at(workload: Workload, config: SimConfig, args: argparse.Namespace,
                keep: bool) -> dict[str, Any]:
    """Every policy's max rate, every policy at loongserve's max rate, and the headline ratios."""
    found = searches(workload, config, POLICIES, args.jobs, args.rel_tol, args.max_evals)
    max_rate = {p: o.capacity["max_rate_rps"] for p, o in found.items()}
    ref = max_rate["loongserve"]
    print(f"  every policy at loongserve's max rate {ref:.3f}", file=sys.stderr, flush=True)
    at_ref = searches(workload, config, POLICIES, args.jobs, args.rel_tol, args.max_evals,
                      keep=keep, rates={p: (ref,) for p in POLICIES})
    rows = {p: at_ref[p].at_rates[0].row() for p in POLICIES}
    tetris, loong = rows["tetris"], rows["loongserve"]
    return {
        "max_sustainable_rate_rps": max_rate,
        "searches": {p: o.capacity for p, o in found.items()},
        "at_loongserve_max_rate": rows,
        "headline": {
            "capacity_ratio_tetris_vs_loongserve": max_rate["tetris"] / ref if ref else None,
            "p90_ttft_ratio_loongserve_over_tetris": (
                loong["ttft_p90_s"] / tetris["ttft_p90_s"] if tetris["ttft_p90_s"] else None),
            "median_tbt_reduction_vs_loongserve": (
                1 - tetris["tbt_p50_s"] / loong["tbt_p50_s"] if loong["tbt_p50_s"] else None),
        },
        "plans_validated": sum(o.plans_validated for d in (found, at_ref) for o in d.values()),
        "_outcomes": (found, at_ref),
    }


def run_trace(name: str, workload: Workload, config: SimConfig, args: argparse.Namespace,
              page: Path | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    by_scale: dict[str, dict[str, Any]] = {}
    for scale in sorted({*args.slo_scales, config.slo.ttft_scale}):
        print(f"[{name}] TTFT SLO scale {scale}", file=sys.stderr, flush=True)
        scaled = apply_point(config, {"slo.ttft_scale": scale})
        keep = page is not None and scale == config.slo.ttft_scale
        by_scale[str(scale)] = headline_at(workload, scaled, args, keep)
    default = by_scale[str(config.slo.ttft_scale)]
    found, at_ref = default.pop("_outcomes")
    for entry in by_scale.values():
        entry.pop("_outcomes", None)
    high = default["max_sustainable_rate_rps"]["tetris-greedy"]
    print(f"[{name}] tetris vs tetris-greedy at tetris-greedy's max rate {high:.3f}",
          file=sys.stderr)
    at_high = searches(workload, config, ("tetris", "tetris-greedy"), args.jobs, args.rel_tol,
                       args.max_evals, rates={p: (high,) for p in ("tetris", "tetris-greedy")})
    default["headline"]["tetris_vs_greedy_p90_ttft_at_high_load"] = {
        "rate_rps": high,
        **{p: at_high[p].at_rates[0].metrics["ttft_p90_s"] for p in ("tetris", "tetris-greedy")},
    }
    result = {
        "trace": {"name": workload.name, "requests": len(workload.requests),
                  "mean_rate_rps": workload.mean_rate_rps, "notes": list(workload.notes)},
        "default_slo_scale": config.slo.ttft_scale,
        **{k: v for k, v in default.items() if k != "plans_validated"},
        "by_slo_scale": by_scale,
        "plans_validated": (sum(e["plans_validated"] for e in by_scale.values())
                            + sum(o.plans_validated for o in at_high.values())),
        "wall_s": time.perf_counter() - t0,
    }
    if page is not None:
        page.mkdir(parents=True, exist_ok=True)
        ref = default["max_sustainable_rate_rps"]["loongserve"]
        plot_attainment_vs_rate({p: o.capacity["evaluations"] for p, o in found.items()},
                                page / f"{name}_attainment.png",
                                title=f"{name}: SLO attainment vs rate")
        plot_cdfs({p: at_ref[p].at_rates[0].records or [] for p in POLICIES},
                  page / f"{name}_cdf.png", title=f"{name} at loongserve's max rate "
                                                  f"({ref:.2f} req/s)")
        plot_sweep({p: [(float(s), e["max_sustainable_rate_rps"][p]) for s, e in by_scale.items()]
                    for p in POLICIES},
                   page / f"{name}_slo_sweep.png", xlabel="TTFT SLO scale (× isolated best)",
                   ylabel="max sustainable rate (req/s)", title=f"{name}: capacity vs SLO")
    return result


def _ratio(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def write_page(page: Path, config: SimConfig, results: dict[str, Any], command: str) -> None:
    lines = [
        "# Paper comparison (simulated)", "",
        f"Generated by `{command}`. Every number below is printed by that script.", "",
        f"Cluster: {config.total_gpus} × {config.hardware} GPUs, model {config.model}; "
        f"disaggregated policies use {config.prefill_instances} prefill + "
        f"{config.decode_instances} decode instances, LoongServe all {config.total_gpus} as "
        "unified instances.",
        f"SLOs: TTFT ≤ S × the request's best isolated TTFT on one node "
        f"({config.reference_gpus()} GPUs), mean TBT ≤ {config.slo.tbt_s} s; a rate is "
        "sustained at ≥ 90% joint attainment. The whole comparison runs at every TTFT SLO "
        f"scale S below; the detailed table and plots are at the default S = "
        f"{config.slo.ttft_scale}.", "",
    ]
    for name, r in results.items():
        lines += [f"## {name}", "", *(f"- {n}" for n in r["trace"]["notes"]), "",
                  "Headline at every TTFT SLO scale (paper: ≥ 1.45× capacity, ≥ 4.35× lower "
                  "P90 TTFT and ≥ 40% lower median TBT at loongserve's max rate):", "",
                  "| TTFT SLO scale | max rate tetris / loongserve (req/s) | capacity ratio | "
                  "P90 TTFT loongserve / tetris (s) | P90 ratio | median TBT loongserve → "
                  "tetris (ms) | TBT reduction |", "|---|---|---|---|---|---|---|"]
        for scale, e in r["by_slo_scale"].items():
            h, rate = e["headline"], e["max_sustainable_rate_rps"]
            at = e["at_loongserve_max_rate"]
            lo, te = at["loongserve"], at["tetris"]
            lines.append(
                f"| {scale} | {rate['tetris']:.3f} / {rate['loongserve']:.3f} | "
                f"{_ratio(h['capacity_ratio_tetris_vs_loongserve'], '.2f')}× | "
                f"{lo['ttft_p90_s']:.3f} / {te['ttft_p90_s']:.3f} | "
                f"{_ratio(h['p90_ttft_ratio_loongserve_over_tetris'], '.2f')}× | "
                f"{1e3 * lo['tbt_p50_s']:.1f} → {1e3 * te['tbt_p50_s']:.1f} | "
                f"{_ratio(h['median_tbt_reduction_vs_loongserve'], '.0%')} |")
        lines += ["", "Max sustainable rate (req/s) by TTFT SLO scale:", "",
                  "| TTFT SLO scale | " + " | ".join(POLICIES) + " |",
                  "|---|" + "---|" * len(POLICIES)]
        for scale, e in r["by_slo_scale"].items():
            rates = e["max_sustainable_rate_rps"]
            lines.append(f"| {scale} | " + " | ".join(f"{rates[p]:.3f}" for p in POLICIES)
                         + " |")
        lines += ["", f"At the default scale {r['default_slo_scale']}:", "",
                  "| policy | max sustainable rate (req/s) | P90 TTFT at loongserve's max (s) |"
                  " median TBT there (s) | attainment there |", "|---|---|---|---|---|"]
        for p, rate in r["max_sustainable_rate_rps"].items():
            row = r["at_loongserve_max_rate"][p]
            lines.append(f"| {p} | {rate:.3f} | {row['ttft_p90_s']:.3f} | "
                         f"{row['tbt_p50_s']:.4f} | {row['slo_attainment']:.3f} |")
        lines += ["", f"- tetris vs tetris-greedy P90 TTFT at high load: "
                  f"{r['headline']['tetris_vs_greedy_p90_ttft_at_high_load']}", "",
                  f"![attainment]({name}_attainment.png)", f"![cdf]({name}_cdf.png)",
                  f"![slo sweep]({name}_slo_sweep.png)", ""]
    (page / "paper_comparison.md").write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--traces", nargs="+", default=list(TRACES), choices=list(TRACES))
    parser.add_argument("--head", type=int, help="only the first N requests of each trace")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--rel-tol", type=float, default=0.05)
    parser.add_argument("--max-evals", type=int, default=10)
    parser.add_argument("--slo-scales", type=float, nargs="+",
                        default=[2.0, 5.0, 10.0, 20.0, 40.0])
    parser.add_argument("--config", type=Path, help="SimConfig JSON (default: SimConfig())")
    parser.add_argument("--page", type=Path, help="write the results page and plots here")
    args = parser.parse_args()
    config = (SimConfig.model_validate_json(args.config.read_text()) if args.config
              else SimConfig())
    results = {}
    for name in args.traces:
        workload = load_workload(TRACES[name])
        if args.head:
            workload = workload.head(args.head)
        results[name] = run_trace(name, workload, config, args, args.page)
    command = "python benchmarks/paper_comparison.py " + " ".join(sys.argv[1:])
    if args.page is not None:
        write_page(args.page, config, results, command)
    json.dump({"config": config.model_dump(mode="json"), "command": command,
               "results": results}, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
