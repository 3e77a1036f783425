"""`tetris profile`: time chunks of a (tokens, prefix, SP size) grid and decode steps on the live
workers, fit the cost model's coefficients, report the fit error and write a calibration file
that `tetris serve --calibration` and `tetris simulate/whatif --calibration` load.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from tetris.cli.arg_types import positive_int
from tetris.cli.output import emit
from tetris.cli.serve_options import add_deployment_flags, serve_config


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    p = subparsers.add_parser("profile", help="measure the workers and fit the cost model",
                              description=__doc__)
    add_deployment_flags(p, serving=False)
    p.add_argument("--out", type=Path, required=True, help="calibration JSON to write")
    p.add_argument("--tokens", type=positive_int, nargs="+", help="chunk sizes to time")
    p.add_argument("--prefixes", type=int, nargs="+", help="prefix lengths to time")
    p.add_argument("--repeats", type=positive_int, help="timed runs per point (median)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from tetris.runtime.deployment import start_workers
    from tetris.runtime.profile import ProfileGrid, calibrate, zero_coefficients
    from tetris.solver.cost_model import CostCoefficients
    from tetris.solver.hardware import load_hardware

    config = serve_config(args)
    grid = ProfileGrid()
    changes = {k: v for k, v in (("tokens", args.tokens), ("prefixes", args.prefixes),
                                 ("repeats", args.repeats)) if v is not None}
    grid = dataclasses.replace(grid, **changes)
    if any(p < 0 for p in grid.prefixes):
        raise ValueError("--prefixes must be >= 0")
    workers = start_workers(config)
    try:
        if workers.device == "cpu":
            hardware, base = "cpu", zero_coefficients()
        else:
            hardware = config.hardware
            # The runtime gathers KV, then attends: what it measures has no ring overlap.
            base = CostCoefficients.from_specs(workers.model.spec, load_hardware(hardware),
                                               ring_overlap=False)
        calibration, decode_fit, rows = calibrate(
            workers.ray, workers.pool, workers.model.spec, hardware, base, grid,
            progress=lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        workers.pool.shutdown(workers.ray)
    calibration.save(args.out)
    out = {"calibration": str(args.out), "model": calibration.model,
           "hardware": calibration.hardware,
           "coefficients": calibration.coefficients.model_dump(),
           "prefill_fit": calibration.report.model_dump(),
           "decode_fit": dataclasses.asdict(decode_fit),
           "rows": [dataclasses.asdict(r) for r in rows]}
    emit(out, args.format, _table)
    return 0


def _table(out: dict[str, Any]) -> None:
    fit, dec = out["prefill_fit"], out["decode_fit"]
    print(f"calibration written to {out['calibration']} ({out['model']} on {out['hardware']})")
    print(f"prefill fit: {fit['num_rows']} rows, mean error {fit['mean_abs_pct_error']:.1f}%, "
          f"max {fit['max_abs_pct_error']:.1f}%, leave-one-out "
          f"{fit['loo_mean_abs_pct_error'] or float('nan'):.1f}%, R² {fit['r_squared']:.4f}")
    print(f"decode fit: {dec['num_rows']} rows, mean error {dec['mean_abs_pct_error']:.1f}%, "
          f"max {dec['max_abs_pct_error']:.1f}%")
    for name, value in out["coefficients"].items():
        print(f"  {name:24s} {value:.4g}")
