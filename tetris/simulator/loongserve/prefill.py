"""LoongServe's prefill batches on elastic ESP groups (re-implemented, no code copied).

`router/manager.py` `_schedule_new_req_list`: the prompts, longest first, and the instances,
emptiest first, go to their batching / group-sizing DP (`plan_prefill_batches`); each batch then
runs one ring-prefill iteration on its group, its KV landing where their proactive migration
plan (`_get_batch_prefill_migration_plan`, `place_prefill_kv`) puts it, and instances left
without KV leave the batch when it ends (scale-down for free).
"""

from __future__ import annotations

from collections.abc import Iterable

from tetris.simulator.events import PRIORITY_COMPLETE
from tetris.simulator.loongserve.kv_ledger import KvLedger
from tetris.simulator.loongserve.prefill_plan import (
    PrefillBatch,
    place_prefill_kv,
    plan_prefill_batches,
)
from tetris.simulator.loongserve.state import LoongServeState
from tetris.simulator.loongserve.types import CO_END, Batch, Co, Req
from tetris.simulator.records import ChunkRecord


class PrefillRunner:
    """Plans prefill batches and their groups, runs them, and completes them."""

    __slots__ = ("ledger", "state")

    def __init__(self, state: LoongServeState, ledger: KvLedger) -> None:
        self.state = state
        self.ledger = ledger

    def plan(self, reqs: list[Req], instances: Iterable[int]
             ) -> tuple[list[int], list[PrefillBatch] | None]:
        """Sort `reqs` longest first (in place) and `instances` by KV held, then node, and run
        the DP on them; returns the ordered instances the layout indexes and the layout (None:
        no plan fits)."""
        s = self.state
        used, cap, per_node = s.used, s.cap, s.per_node
        reqs.sort(key=lambda q: q.need, reverse=True)
        order = sorted(instances, key=lambda i: (used[i], i // per_node))
        return order, plan_prefill_batches([q.need for q in reqs], [cap - used[i] for i in order],
                                           s.pred, s.opts.dp_pruning)

    def launch(self, co: Co, reqs: list[Req], group: list[int], start: float) -> None:
        """One prefill batch on one ESP group; its KV lands where the migration plan says."""
        s = self.state
        used, cap = s.used, s.cap
        lengths = [q.need for q in reqs]
        order, pieces = place_prefill_kv(lengths, group, used, cap)
        bused: dict[int, int] = {}
        s1 = s2 = 0
        for q, length, mine in zip(reqs, lengths, pieces, strict=True):
            s1 += length
            s2 += length * length
            if q.paused:
                q.paused = False
                s.paused -= 1
            for i, t in mine:
                q.kv[i] = q.kv.get(i, 0) + t
                bused[i] = bused.get(i, 0) + t
                used[i] += t
        s.check_memory(order)
        sp = len(order)
        seconds = s.noise.apply(s.pred.actual(sp, s.cm.cluster.spans_nodes(order), s1, s2))
        end = start + seconds
        s.occupy(order, start, end)
        members = tuple(sorted(order))
        for q, length in zip(reqs, lengths, strict=True):
            q.record.chunks.append(ChunkRecord(0, length, members, start, end))
        co.batches.append(Batch(list(reqs), order, bused))
        co.prefill = True
        st = s.st
        st["prefill_iterations"] += 1
        st["prefill_requests"] += len(reqs)
        st["prefill_sp_sum"] += sp
        st["prefill_request_sp_sum"] += sp * len(reqs)
        s.events.push(end, PRIORITY_COMPLETE, CO_END, co)
        co.inflight += 1

    def greedy(self, co: Co, reqs: list[Req], now: float) -> None:
        """Prefill `reqs` on the instances `co` freed (their greedy path)."""
        order, layout = self.plan(reqs, co.idle)
        if layout is None:
            self.state.fail("greedy prefill admitted requests that do not fit the freed instances")
        co.idle = []
        for pb in layout:
            self.launch(co, reqs[pb.first_req:pb.end_req], order[pb.first_inst:pb.end_inst], now)

    def finish(self, co: Co, b: Batch, now: float) -> None:
        """First tokens out; finished requests retire, instances left without KV go idle."""
        done = []
        for q in b.reqs:
            times = q.record.token_times
            times.append(now)
            if len(times) >= q.output:
                done.append(q)
        if done:
            co.idle += self.ledger.retire(b, done)
        gone = [i for i in b.instances if b.bused.get(i, 0) == 0]
        if gone and b.reqs:
            self.ledger.scale_down(b, gone)
            co.idle += gone
