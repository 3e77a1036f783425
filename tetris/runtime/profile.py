"""`tetris profile`: measure chunks and decode steps on the live workers, fit the cost model.

Prefill: for each (tokens, prefix, SP size) of a grid, the prefix is prefilled untimed on the
group, then the chunk is timed from the driver (what the engine waits for: the compute plus
the actor call), median of `repeats`. The prefill coefficients of T(c, p, s) are fitted to
those rows (`solver.calibration.fit_coefficients`, relative-error NNLS, leave-one-out error).
Decode: steps of b sequences holding K KV tokens in all, timed the same way; D(b, K) =
decode_fixed + kv_read·K + lin·b is fitted for decode_fixed and kv_read (lin from prefill).
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tetris.runtime.actors import WorkerPool
from tetris.runtime.batch_attend import DecodeEntry
from tetris.runtime.sampling import SamplingParams
from tetris.solver.calibration import Calibration, Measurement, fit_coefficients, nnls
from tetris.solver.cost_model import CostCoefficients
from tetris.solver.model_spec import ModelSpec
from tetris.solver.plan import ChunkSpec

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ProfileGrid:
    tokens: Sequence[int] = (32, 128, 512, 1024)
    prefixes: Sequence[int] = (0, 1024)
    sp_sizes: Sequence[int] | None = None  # None: 1 .. every prefill instance
    decode_batches: Sequence[int] = (1, 4, 8)
    decode_kv: Sequence[int] = (64, 512)
    repeats: int = 3


# What `tetris serve` measures at start when no calibration exists (about a minute here).
QUICK_GRID = ProfileGrid(tokens=(32, 256), prefixes=(0, 512), decode_batches=(1, 8),
                         decode_kv=(64, 512), repeats=1)


def zero_coefficients() -> CostCoefficients:
    """The base of a CPU host's fit: no datasheet, so every coefficient is measured (one host:
    the cross-node ones stay 0). The runtime gathers the group's KV before attending, so its
    link time adds to compute (no ring overlap)."""
    rates = {name: 0.0 for name in CostCoefficients.model_fields if name != "ring_overlap"}
    return CostCoefficients(**rates, ring_overlap=False)


@dataclass(frozen=True)
class DecodeFit:
    num_rows: int
    mean_abs_pct_error: float
    max_abs_pct_error: float


def _timed(ray: Any, calls: Sequence[tuple[Any, tuple[Any, ...]]]) -> float:
    """Seconds until every `method.remote(*args)` of `calls` has returned."""
    started = time.perf_counter()
    ray.get([method.remote(*args) for method, args in calls])
    return time.perf_counter() - started


def measure_prefill(ray: Any, pool: WorkerPool, grid: ProfileGrid,
                    progress: Progress = lambda _: None) -> list[Measurement]:
    sizes = grid.sp_sizes or range(1, pool.num_prefill + 1)
    rows = []
    for n, (sp, prefix, tokens) in enumerate(itertools.product(sizes, grid.prefixes,
                                                               grid.tokens)):
        ranks = tuple(range(sp))
        pool.ensure_group(ranks)
        actors = [pool.prefill[r] for r in ranks]
        times = []
        for rep in range(grid.repeats + 1):  # the first run warms up
            rid = f"profile-{n}-{rep}"
            if prefix:
                head = ChunkSpec(0, prefix, ranks)
                ray.get([a.prefill.remote(rid, head, [1] * prefix, None) for a in actors])
            chunk = ChunkSpec(prefix, prefix + tokens, ranks)
            seconds = _timed(ray, [(a.prefill, (rid, chunk, [1] * tokens, None))
                                   for a in actors])
            ray.get([a.free.remote(rid) for a in actors])
            if rep:
                times.append(seconds)
        rows.append(Measurement(tokens, prefix, sp, statistics.median(times)))
        progress(f"prefill tokens={tokens} prefix={prefix} sp={sp}: {rows[-1].seconds:.4f} s")
    return rows


def measure_decode(ray: Any, pool: WorkerPool, grid: ProfileGrid,
                   progress: Progress = lambda _: None) -> list[tuple[int, int, float]]:
    """(batch, KV tokens in all, seconds) per decode step, on decode instance 0."""
    actor, rank = pool.decode[0], 0 if pool.elastic else pool.num_prefill  # its world rank
    rows = []
    for batch, kv in itertools.product(grid.decode_batches, grid.decode_kv):
        ids = [f"profile-decode-{batch}-{kv}-{i}" for i in range(batch)]
        for rid in ids:
            ray.get(actor.prefill.remote(rid, ChunkSpec(0, kv, (rank,)), [1] * kv, None))
            ray.get([actor.allocate.remote(rid, grid.repeats + 1),
                     actor.set_sampler.remote(rid, SamplingParams(max_tokens=1 << 20))])
        times = []
        for step in range(grid.repeats + 1):
            entries = [DecodeEntry(rid, 1, kv + step, rank, (rank,)) for rid in ids]
            seconds = _timed(ray, [(actor.decode_step, (entries,))])
            if step:
                times.append(seconds)
        ray.get([actor.free.remote(rid) for rid in ids])
        rows.append((batch, batch * kv, statistics.median(times)))
        progress(f"decode batch={batch} kv={batch * kv}: {rows[-1][2]:.4f} s")
    return rows


def fit_decode(rows: Sequence[tuple[int, int, float]], lin_s_per_token: float
               ) -> tuple[float, float, DecodeFit]:
    """decode_fixed_s, decode_kv_s_per_token and the fit's errors (relative-error NNLS)."""
    seconds = np.array([s for _, _, s in rows], dtype=np.float64)
    target = seconds - lin_s_per_token * np.array([b for b, _, _ in rows], dtype=np.float64)
    features = np.array([[1.0, float(k)] for _, k, _ in rows], dtype=np.float64)
    a = features / seconds[:, None]
    scale = np.linalg.norm(a, axis=0)
    theta = nnls(a / scale, target / seconds) / scale
    predicted = features @ theta + (seconds - target)
    pct = 100.0 * np.abs(predicted - seconds) / seconds
    return float(theta[0]), float(theta[1]), DecodeFit(len(rows), float(pct.mean()),
                                                       float(pct.max()))


def calibrate(ray: Any, pool: WorkerPool, model: ModelSpec, hardware: str,
              base: CostCoefficients, grid: ProfileGrid,
              progress: Progress = lambda _: None) -> tuple[Calibration, DecodeFit,
                                                            list[Measurement]]:
    rows = measure_prefill(ray, pool, grid, progress)
    coefficients, report = fit_coefficients(rows, base)
    decode_rows = measure_decode(ray, pool, grid, progress)
    fixed, kv, decode_fit = fit_decode(decode_rows, coefficients.lin_s_per_token)
    coefficients = coefficients.model_copy(update={"decode_fixed_s": fixed,
                                                   "decode_kv_s_per_token": kv})
    return (Calibration(model=model.name, hardware=hardware, coefficients=coefficients,
                        report=report), decode_fit, rows)
