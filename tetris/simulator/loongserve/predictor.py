"""LoongServe's analytical prefill model, re-implemented for the simulator (no code copied).

Their `router/profiler.py` `Profiler.predict`: one iteration of a batch with prompt lengths l_i
on an ESP group of s instances costs A[s] + B[s]·Σl + C[s]·Σl² (coefficients fitted per SP size
by `test/longserve/2-find-time-function-prefill.py`). Here the rows follow from our cost model,
so for one request the prediction equals `CostModel.chunk_seconds(l, 0, s)` exactly:
A[s] = fixed + step·(s−1), B[s] = (lin + attn/2 + comm·(s−1))/s, C[s] = attn/(2s).
"""

from __future__ import annotations

import math

from tetris.solver.cost_model import CostModel

INF = math.inf


class PrefillPredictor:
    """A[s] + B[s]·Σl + C[s]·Σl² per SP size s (s = 1..N; s = 0 predicts +inf).

    Their table has one row per s, measured on groups inside a node; `predict` uses the link a
    group of s instances needs at least (the network once s exceeds a node), `actual` the link
    of the concrete group (what the simulated iteration really takes)."""

    __slots__ = ("_rows", "a", "b", "c")

    def __init__(self, cost_model: CostModel) -> None:
        co = cost_model.coefficients
        cluster = cost_model.cluster
        n = cluster.prefill_instances
        rows: list[tuple[list[float], list[float], list[float]]] = []
        for cross in (False, True):
            step = co.step_inter_s if cross else co.step_intra_s
            comm = co.comm_inter_s_per_token if cross else co.comm_intra_s_per_token
            a, b, c = [INF], [0.0], [0.0]
            for s in range(1, n + 1):
                # One instance has no link: the same row whichever "link" is named.
                st, cm = (step, comm) if s > 1 else (0.0, 0.0)
                a.append(co.fixed_s + st * (s - 1))
                b.append((co.lin_s_per_token + co.attn_s_per_pair / 2 + cm * (s - 1)) / s)
                c.append(co.attn_s_per_pair / (2 * s))
            rows.append((a, b, c))
        self._rows = rows
        per_node = cluster.gpus_per_node
        self.a = [rows[int(s > per_node)][0][s] for s in range(n + 1)]
        self.b = [rows[int(s > per_node)][1][s] for s in range(n + 1)]
        self.c = [rows[int(s > per_node)][2][s] for s in range(n + 1)]

    def predict(self, sp: int, length_sum: int, square_sum: int) -> float:
        """Their `Profiler.predict(sp, Σl, Σl²)` (seconds here, milliseconds there)."""
        if sp <= 0:
            return INF  # their row 0 is NaN; every comparison it meets then goes the same way
        return self.a[sp] + self.b[sp] * length_sum + self.c[sp] * square_sum

    def actual(self, sp: int, cross_node: bool, length_sum: int, square_sum: int) -> float:
        a, b, c = self._rows[int(cross_node)]
        return a[sp] + b[sp] * length_sum + c[sp] * square_sum
