"""LoongServe's batching / elastic instance allocation, re-implemented (no code copied).

Their DP (`longserve_c_scheduler/src/main.cpp`, `minimize_prefill_iteration_time`, driven by
`router/manager.py` `_schedule_new_req_list`), with the same pruning and tie-breaking, and
`place_prefill_kv`, their proactive-migration plan (`_get_batch_prefill_migration_plan`). Pure
functions of lengths, free slots and the predictor's rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tetris.simulator.loongserve.predictor import INF, PrefillPredictor


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
