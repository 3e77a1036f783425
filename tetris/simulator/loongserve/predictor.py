"""LoongServe's analytical prefill model, re-implemented for the simulator (no code copied).

Their `router/profiler.py` `Profiler.predict`: one iteration of a batch with prompt lengths l_i
on an ESP group of s instances costs A[s] + B[s]·Σl + C[s]·Σl² (coefficients fitted per SP size
by `test/longserve/2-find-time-function-prefill.py` to measured iterations). Here the
"measurements" are our cost model's times of one request of each length on a geometric grid,
fitted the same way (least squares on relative error, coefficients ≥ 0). Without ring overlap
the cost model is exactly such a quadratic, so the fit reproduces it; with overlap (T is the
larger of two quadratics) the fit is LoongServe's approximation of it, as theirs is of the
hardware. `actual` is the cost model itself.
"""

from __future__ import annotations

import math

import numpy as np

from tetris.solver.calibration import nnls
from tetris.solver.cost_model import CostModel

INF = math.inf
# The profiled prompt lengths: 16 to 1M tokens, four per octave.
PROFILE_LENGTHS = tuple(sorted({int(16 * 2 ** (i / 4)) for i in range(65)}))


class PrefillPredictor:
    """A[s] + B[s]·Σl + C[s]·Σl² per SP size s (s = 1..N; s = 0 predicts +inf).

    Their table has one row per s, measured on groups inside a node; `predict` uses the link a
    group of s instances needs at least (the network once s exceeds a node), `actual` the link
    of the concrete group (what the simulated iteration really takes)."""

    __slots__ = ("a", "b", "c", "cost_model")

    def __init__(self, cost_model: CostModel) -> None:
        self.cost_model = cost_model
        cluster = cost_model.cluster
        n = cluster.prefill_instances
        per_node = cluster.gpus_per_node
        lengths = np.array(PROFILE_LENGTHS, dtype=np.float64)
        features = np.stack([np.ones_like(lengths), lengths, lengths * lengths], axis=1)
        self.a, self.b, self.c = [INF], [0.0], [0.0]
        for s in range(1, n + 1):
            seconds = np.array([cost_model.chunk_seconds(int(length), 0, s, s > per_node)
                                for length in PROFILE_LENGTHS])
            scaled = features / seconds[:, None]
            norms = np.linalg.norm(scaled, axis=0)
            a, b, c = (float(v) for v in nnls(scaled / norms, np.ones_like(seconds)) / norms)
            self.a.append(a)
            self.b.append(b)
            self.c.append(c)

    def predict(self, sp: int, length_sum: int, square_sum: int) -> float:
        """Their `Profiler.predict(sp, Σl, Σl²)` (seconds here, milliseconds there)."""
        if sp <= 0:
            return INF  # their row 0 is NaN; every comparison it meets then goes the same way
        return self.a[sp] + self.b[sp] * length_sum + self.c[sp] * square_sum

    def actual(self, sp: int, cross_node: bool, length_sum: int, square_sum: int) -> float:
        """What the batch's iteration takes: Σl query tokens, Σ l(l+1)/2 causal pairs."""
        return self.cost_model.batch_seconds(length_sum, (square_sum + length_sum) / 2,
                                             length_sum, sp, cross_node)
