"""LoongServe's KV bookkeeping of batches (re-implemented, no code copied).

The moves that keep `state.used`, each `Batch.bused` and each `Req.kv` in step, from
`router/manager.py`: `_merge_batch` (two batches scale up to the union of their instances),
`_scale_down_batch`, `_handle_finish_req` (finished requests free their KV) and the `Fcfs` pause
of `router/pause_strategy.py` (a running request gives its KV back and waits again).
"""

from __future__ import annotations

from collections.abc import Sequence

from tetris.simulator.loongserve.state import LoongServeState
from tetris.simulator.loongserve.types import Batch, Req


class KvLedger:
    """Batch membership and KV accounts; all changes to a batch's instances go through here."""

    __slots__ = ("state",)

    def __init__(self, state: LoongServeState) -> None:
        self.state = state

    def merge(self, dst: Batch, src: Batch) -> None:
        """Their `_merge_batch` + `Batch.merge`: both scale up to the union of instances."""
        have = set(dst.instances)
        dst.instances += [i for i in src.instances if i not in have]
        dst.reqs += src.reqs
        for i, t in src.bused.items():
            dst.bused[i] = dst.bused.get(i, 0) + t
        self.state.st["merges"] += 1

    def scale_down(self, b: Batch, gone: Sequence[int]) -> None:
        drop = set(gone)
        b.instances = [i for i in b.instances if i not in drop]
        for i in drop:
            if b.bused.pop(i, 0):
                self.state.fail(f"scaled a batch down off instance {i} that holds its KV")

    def retire(self, b: Batch, done: list[Req]) -> list[int]:
        """Their `_handle_finish_req`: free the KV, scale the batch off emptied instances;
        returns the instances the batch left."""
        s = self.state
        used, bused = s.used, b.bused
        for q in done:
            if len(q.record.token_times) != q.output:
                s.fail(f"request {q.record.request_id!r} produced "
                       f"{len(q.record.token_times)} of {q.output} tokens")
            q.record.decode_instances = tuple(sorted(q.kv))
            for i, t in q.kv.items():
                used[i] -= t
                bused[i] -= t
            q.kv = {}
            s.sum_out += q.output
            s.num_fin += 1
        gone_ids = {id(q) for q in done}
        b.reqs = [q for q in b.reqs if id(q) not in gone_ids]
        s.st["invariant_checks"] += 1
        if not b.reqs:
            freed = list(b.instances)
            b.instances = []
            b.bused = {}
            return freed
        freed = [i for i in b.instances if bused.get(i, 0) == 0]
        if freed:
            self.scale_down(b, freed)
        return freed

    def pause_newest(self) -> None:
        """Their `select_paused_reqs` with `Fcfs`: drop the newest running request's KV and put
        it at the head of the queue, to be prefilled again with its output so far."""
        s = self.state
        b, q = max(((b, q) for b in s.running for q in b.reqs), key=lambda e: e[1].order)
        b.reqs.remove(q)
        for i, t in q.kv.items():
            s.used[i] -= t
            b.bused[i] -= t
        q.kv = {}
        q.paused = True
        s.paused += 1
        s.waiting.insert(0, q)
        s.st["preemptions"] += 1
        # Keep "no KV here <=> not in a batch" (their code scales down only after finishes).
        gone = [i for i in b.instances if b.bused.get(i, 0) == 0]
        if gone:
            self.scale_down(b, gone)
        s.running = [x for x in s.running if x.reqs]
