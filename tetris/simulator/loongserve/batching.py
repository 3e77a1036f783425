"""LoongServe's prefill planning, re-implemented for the simulator (no code copied).

Three pieces of the LoongServe global manager (github.com/LoongServe/LoongServe):

- `PrefillPredictor` — its analytical prefill model (`router/profiler.py`, `Profiler.predict`):
  one iteration of a batch with prompt lengths l_i on an ESP group of s instances costs
  A[s] + B[s]·Σl + C[s]·Σl² (coefficients fitted per SP size by
  `test/longserve/2-find-time-function-prefill.py`). Here the rows follow from our cost model, so
  for one request the prediction equals `CostModel.chunk_seconds(l, 0, s)` exactly:
  A[s] = fixed + step·(s−1), B[s] = (lin + attn/2 + comm·(s−1))/s, C[s] = attn/(2s).
- `Reservation` — its memory admission test (`router/req_queue.py`, `_can_add_new_req`): the
  peak KV of the admitted requests if every one runs to its full output, sorted by tokens left.
- `plan_prefill_batches` — its batching / elastic instance allocation DP
  (`longserve_c_scheduler/src/main.cpp`, `minimize_prefill_iteration_time`, driven by
  `router/manager.py` `_schedule_new_req_list`), with the same pruning and tie-breaking, and
  `place_prefill_kv`, its proactive-migration plan (`_get_batch_prefill_migration_plan`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tetris.solver.cost_model import CostModel

INF = math.inf
_NEG = -(1 << 62)  # "no entry" in the reservation's max arrays (every real term is >= 0)


class PrefillPredictor:
    """A[s] + B[s]·Σl + C[s]·Σl² per SP size s (s = 1..N; s = 0 predicts +inf).

    Their table has one row per s, measured on groups inside a node; `predict` uses the link a
    group of s instances needs at least (the network once s exceeds a node), `actual` the link
    of the concrete group (what the simulated iteration really takes)."""

    __slots__ = ("_rows", "a", "b", "c", "instances")

    def __init__(self, cost_model: CostModel) -> None:
        co = cost_model.coefficients
        cluster = cost_model.cluster
        n = cluster.prefill_instances
        self.instances = n
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


class Reservation:
    """Peak KV tokens of a set of requests that all decode to their last token.

    Each entry is (tokens held now, tokens still to come). Sorted by tokens to come, descending,
    the k-th entry's finish is the worst moment: left_k·k + Σ_{j≤k} held_j; the peak is the max
    over k (lightllm's estimate, which LoongServe keeps). Prefix/suffix maxima make the test for
    one more entry O(log n) — the admission loop runs it for every waiting request."""

    __slots__ = ("_cum", "_entries", "_keys", "_prefix", "_suffix")

    def __init__(self, entries: Iterable[tuple[int, int]] = ()) -> None:
        self.reset(entries)

    def reset(self, entries: Iterable[tuple[int, int]]) -> None:
        self._entries = sorted(entries, key=lambda e: -e[1])
        self._rebuild()

    def _rebuild(self) -> None:
        entries = self._entries
        n = len(entries)
        self._keys = [-left for _, left in entries]
        cum = [0] * (n + 1)
        prefix = [_NEG] * (n + 1)
        terms = [0] * n
        for j, (held, left) in enumerate(entries):
            cum[j + 1] = cum[j] + held
            terms[j] = left * (j + 1) + cum[j + 1]
            prefix[j + 1] = max(prefix[j], terms[j])
        suffix = [_NEG] * (n + 1)
        for j in range(n - 1, -1, -1):
            suffix[j] = max(suffix[j + 1], terms[j] + entries[j][1])
        self._cum, self._prefix, self._suffix = cum, prefix, suffix

    def __len__(self) -> int:
        return len(self._entries)

    def peak(self) -> int:
        return max(0, self._prefix[-1])

    def peak_with(self, held: int, left: int) -> int:
        """The peak if (held, left) joined: entries before it keep their term, entries after it
        move one place down (one more `left` each) and all of those gain its `held`."""
        p = bisect.bisect_right(self._keys, -left)  # after equal lefts, as their stable sort
        own = left * (p + 1) + self._cum[p] + held
        return max(self._prefix[p], own, self._suffix[p] + held, 0)

    def add(self, held: int, left: int) -> None:
        p = bisect.bisect_right(self._keys, -left)
        self._entries.insert(p, (held, left))
        self._rebuild()


@dataclass(frozen=True, slots=True)
class PrefillBatch:
    """Requests [first_req, end_req) of the length-sorted list on instances
    [first_inst, end_inst) of the ordered instance list, predicted to take `predicted_s`."""

    first_req: int
    end_req: int
    first_inst: int
    end_inst: int
    predicted_s: float


def plan_prefill_batches(
    lengths: Sequence[int], left_tokens: Sequence[int], predictor: PrefillPredictor,
    prune: bool = True,
) -> list[PrefillBatch] | None:
    """LoongServe's batching + elastic instance allocation DP.

    `lengths` are sorted descending and `left_tokens` (free KV slots) follow the instance order
    the caller chose, so batch k pairs a run of consecutive requests with a run of consecutive
    instances. T[r][u] = least Σ_batches T_batch·Σ_{i∈batch} 1/l_i (their "average input token
    latency") serving the r longest requests on the first u instances, every batch's prompts
    fitting its instances' free slots. The answer uses the fewest instances among equal optima;
    None when no plan fits (their code asserts).

    `prune` keeps their two bounds: the last batch never grows past the best one with one
    instance fewer, the last group never shrinks below the best one with one request fewer.
    The second bound makes their DP degenerate: row 1 can only end in a group of all u
    instances (T[0][pu] is finite only for pu = 0), so by induction every row's best last group
    is all u instances and, wherever prompts fit, the plan is ONE batch on u instances (the u
    minimising T_u·Σ1/l). `prune=False` searches every split, as the paper describes."""
    r_total, u_total = len(lengths), len(left_tokens)
    if r_total == 0 or u_total == 0:
        return None
    p1, p2, pinv, lsum = [0], [0], [0.0], [0]
    for length in lengths:
        p1.append(p1[-1] + length)
        p2.append(p2[-1] + length * length)
        pinv.append(pinv[-1] + 1.0 / length)
    for left in left_tokens:
        lsum.append(lsum[-1] + left)
    a, b, c = predictor.a, predictor.b, predictor.c
    best = [[INF] * (u_total + 1) for _ in range(r_total + 1)]
    last_batch = [[-1] * (u_total + 1) for _ in range(r_total + 1)]
    last_group = [[-1] * (u_total + 1) for _ in range(r_total + 1)]
    best[0][0] = 0.0
    for r in range(1, r_total + 1):
        row, row_batch, row_group = best[r], last_batch[r], last_group[r]
        prev_group_row = last_group[r - 1]
        for u in range(1, u_total + 1):
            bound = row_batch[u - 1]
            max_batch = bound if bound != -1 and prune else r
            floor = prev_group_row[u]
            min_group = floor if floor != -1 and prune else 1
            cell = row[u]
            for size in range(1, max_batch + 1):
                pr = r - size
                s1 = p1[r] - p1[pr]
                s2 = p2[r] - p2[pr]
                inv = pinv[r] - pinv[pr]
                prev_row = best[pr]
                for group in range(u, min_group - 1, -1):
                    pu = u - group
                    if s1 > lsum[u] - lsum[pu]:
                        break  # fewer instances only have fewer free slots
                    total = (a[group] + b[group] * s1 + c[group] * s2) * inv + prev_row[pu]
                    if total < cell:
                        cell = total
                        row_batch[u] = size
                        row_group[u] = group
            row[u] = cell
    final = best[r_total]
    u_best, t_best = -1, INF
    for u in range(1, u_total + 1):
        if final[u] < t_best:
            u_best, t_best = u, final[u]
    if u_best == -1:
        return None
    batches = []
    r, u = r_total, u_best
    while r > 0:
        size, group = last_batch[r][u], last_group[r][u]
        if size <= 0 or group <= 0:
            raise RuntimeError(f"LoongServe DP back-track broke at ({r}, {u})")
        s1 = p1[r] - p1[r - size]
        s2 = p2[r] - p2[r - size]
        batches.append(PrefillBatch(r - size, r, u - group, u, predictor.predict(group, s1, s2)))
        r -= size
        u -= group
    if u != 0:
        raise RuntimeError("LoongServe DP back-track did not use exactly its instances")
    return batches


def place_prefill_kv(
    lengths: Sequence[int], group: Sequence[int], used: Sequence[int], capacity: int
) -> tuple[list[int], list[list[tuple[int, int]]]]:
    """Where each request's prefill KV lands (their proactive migration plan).

    The group is ordered by KV already held, fullest first, and the requests' KV is packed in
    order onto it, each instance up to its capacity: the ring prefill ships the KV straight to
    these places, so after the iteration the request already sits on as few instances as
    possible (scale-down for free). Returns the reordered group and, per request, its
    (instance, tokens) pieces."""
    order = sorted(group, key=lambda i: used[i], reverse=True)
    if len(order) == 1:
        return order, [[(order[0], length)] for length in lengths]
    pieces: list[list[tuple[int, int]]] = []
    k, filled = 0, 0
    for length in lengths:
        mine: list[tuple[int, int]] = []
        while length > 0:
            while filled + used[order[k]] >= capacity:
                k += 1
                filled = 0
                if k == len(order):
                    raise RuntimeError("prefill KV does not fit its group (DP bound broken)")
            take = min(length, capacity - used[order[k]] - filled)
            mine.append((order[k], take))
            length -= take
            filled += take
        pieces.append(mine)
    return order, pieces
