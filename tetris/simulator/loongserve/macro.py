"""LoongServe's macro-iteration: prefill with decoding (re-implemented, no code copied).

`router/manager.py` `_schedule_new_req_list_with_decoding`: optionally compact decode KV onto
fewer instances (paid migration), pick the decode batches whose instances the prefill takes
(those batches stall for the whole macro-iteration), batch the prompts and size each batch's
ESP group by their DP, and run the prefill batches while the untouched decode batches keep
decoding. `_dispatch_independ_batch_list` / `_run_independent_batch_list`: each runs as its own
coroutine (`Co`); instances that free up meanwhile take more prefill greedily if it fits in the
macro-iteration's predicted length; at the end the stalled batches rejoin.
"""

from __future__ import annotations

from tetris.simulator.events import PRIORITY_COMPLETE, PRIORITY_DECIDE
from tetris.simulator.loongserve.admission import Admission
from tetris.simulator.loongserve.compaction import Compaction
from tetris.simulator.loongserve.decode import DecodePlanner
from tetris.simulator.loongserve.kv_ledger import KvLedger
from tetris.simulator.loongserve.prefill import PrefillRunner
from tetris.simulator.loongserve.state import LoongServeState
from tetris.simulator.loongserve.types import CO_END, CO_WAKE, EPS_S, Batch, Co, Masters, Req


class MacroIteration:
    """Starts a macro-iteration and drives its coroutines to the end."""

    __slots__ = ("admission", "compaction", "decode", "ledger", "prefill", "state")

    def __init__(self, state: LoongServeState, ledger: KvLedger, decode: DecodePlanner,
                 admission: Admission, compaction: Compaction, prefill: PrefillRunner) -> None:
        self.state = state
        self.ledger = ledger
        self.decode = decode
        self.admission = admission
        self.compaction = compaction
        self.prefill = prefill

    # -- start --------------------------------------------------------------------------------
    def start(self, new: list[Req], now: float) -> None:
        """Their `_schedule_new_req_list_with_decoding` + `_dispatch_independ_batch_list`."""
        s = self.state
        s.st["macro_iterations"] += 1
        cap, n, used = s.cap, s.n, s.used
        s1 = sum(q.need for q in new)
        s2 = sum(q.need * q.need for q in new)
        inv = sum(1.0 / q.need for q in new)
        avail = [i for i in range(n) if used[i] == 0]
        n_idle = len(avail)
        max_idle = n - (sum(used) + cap - 1) // cap
        delay = 0.0
        if n - max_idle < n - n_idle and s1 <= max_idle * cap and not s.opts.disable_scale_up:
            n_idle, delay = self.compaction.compact(n_idle, max_idle, avail, s1, s2)
        pending, run_dec = self._take_decode_instances(s1, s2, inv, n_idle, avail)
        dec_batches, plans, avail = self._plan_untouched(run_dec, avail, pending, s1)
        order, layout = self.prefill.plan(new, avail)
        if layout is None:  # their code asserts here; every instance then goes to the prefill
            s.st["fallback_plans"] += 1
            pending += dec_batches
            dec_batches, plans = [], []
            order, layout = self.prefill.plan(new, range(n))
            if layout is None:
                s.fail("no prefill plan fits even on every instance")
        s.st["stalled_batches"] += len(pending)
        t0 = now + delay
        s.mode = "macro"
        s.running = []
        s.pending = pending
        s.macro_start = t0
        s.macro_len = max(pb.predicted_s for pb in layout)
        s.cos = []
        if dec_batches:
            co = Co(dec_batches)
            s.cos.append(co)
            self._launch_decode(co, plans, t0)
        s.num_running_prefill = len(layout)
        for pb in layout:
            co = Co([], prefill=True, counted=True)
            s.cos.append(co)
            self.prefill.launch(co, new[pb.first_req:pb.end_req],
                                order[pb.first_inst:pb.end_inst], t0)

    def _take_decode_instances(self, s1: int, s2: int, inv: float, n_idle: int,
                               avail: list[int]) -> tuple[list[Batch], list[Batch]]:
        """Split the running batches into those the prefill takes (stalled; their instances
        join `avail`) and those that keep decoding."""
        s = self.state
        cap, pred = s.cap, s.pred
        running = s.running
        pending: list[Batch] = []
        short = s1 - n_idle * cap
        if short > 0:
            by_room = sorted(((b, len(b.instances) * cap - sum(b.bused.values()))
                              for b in running), key=lambda e: e[1])
            while short > 0:
                if not by_room:
                    s.fail("admitted prompts exceed the free KV slots")
                b, room = by_room.pop()
                pending.append(b)
                short -= room
                avail += b.instances
                n_idle += len(b.instances)
            running = [b for b, _ in by_room]
        run_dec: list[Batch] = []
        for b in running:
            cur = pred.predict(n_idle, s1, s2)
            nxt = pred.predict(n_idle + len(b.instances), s1, s2)
            speedup = (cur - nxt) * inv
            out_factor = len(b.reqs) / sum(len(q.record.token_times) for q in b.reqs)
            slowdown = nxt * len(b.reqs) * out_factor
            # Scale the prefill up into this decode batch's instances (stalling it) when the
            # input-token latency it saves outweighs the output-token latency it adds.
            if speedup < slowdown:
                run_dec.append(b)
            else:
                pending.append(b)
                avail += b.instances
                n_idle += len(b.instances)
        return pending, run_dec

    def _plan_untouched(self, run_dec: list[Batch], avail: list[int], pending: list[Batch],
                        s1: int) -> tuple[list[Batch], list[tuple[Batch, Masters]], list[int]]:
        """The decode plan of the batches that keep decoding: short of slots, they get the
        prefill's instances one by one while the prompts still fit, else they stall too
        (joining `pending`) and every instance goes to the prefill."""
        s = self.state
        ok, dec_batches, plans = self.decode.plan(run_dec, [])
        if not ok:
            extra: list[int] = []
            while s1 <= (len(avail) - 1) * s.cap and not ok:
                extra.append(avail.pop())
                ok, dec_batches, plans = self.decode.plan(run_dec, list(extra))
            if not ok:
                pending += run_dec
                dec_batches, plans, avail = [], [], list(range(s.n))
        return dec_batches, plans, avail

    # -- coroutines ---------------------------------------------------------------------------
    def _launch_decode(self, co: Co, plans: list[tuple[Batch, Masters]], start: float) -> None:
        co.plans = plans
        co.prefill = False
        co.inflight += 1
        self.state.events.push(start + self.decode.launch(plans, start), PRIORITY_COMPLETE,
                               CO_END, co)

    def co_end(self, co: Co, now: float) -> None:
        s = self.state
        co.inflight -= 1
        if co.inflight > 0:
            return  # its other batches of this iteration are still running
        if co.prefill:
            for b in co.batches:
                self.prefill.finish(co, b, now)
            co.batches = [b for b in co.batches if b.reqs]
            co.prefill = False
            if co.counted:
                co.counted = False
                s.num_running_prefill -= 1
                if s.num_running_prefill == 0:
                    for other in s.cos:
                        if other.waiting:
                            self.co_continue(other, now)
        else:
            co.idle += self.decode.finish(co.plans, now)
            co.batches = [b for b in co.batches if b.reqs]
        self.co_continue(co, now)

    def co_continue(self, co: Co, now: float) -> None:
        """The rest of their `_run_independent_batch_list` loop body."""
        s = self.state
        if not co.batches:
            co.waiting = False
            if s.num_running_prefill > 0:
                left = s.macro_len - (now - s.macro_start)
                if left > EPS_S and co.idle:
                    s.st["decisions"] += 1
                    greedy = self.admission.select_greedy(co.idle, left)
                    if greedy:
                        s.st["greedy_prefills"] += 1
                        self.prefill.greedy(co, greedy, now)
                        return
                if left > EPS_S:
                    co.waiting = True
                    co.epoch += 1
                    s.events.push(s.macro_start + s.macro_len, PRIORITY_DECIDE, CO_WAKE,
                                  (co, co.epoch))
                    return
                self._co_done(co, now)
                return
        if s.num_running_prefill == 0:
            self._co_done(co, now)
            return
        ok, batches, plans = self.decode.plan(co.batches, [])
        if not ok:
            self._co_done(co, now)
            return
        co.batches = batches
        self._launch_decode(co, plans, now)

    def _co_done(self, co: Co, now: float) -> None:
        co.done = True
        co.waiting = False
        if all(c.done for c in self.state.cos):
            self._end(now)

    def _end(self, now: float) -> None:
        """Merge the stalled decode batches into whichever new batch now shares an instance."""
        s = self.state
        new_list = [b for c in s.cos for b in c.batches]
        result = new_list
        if s.pending:
            result = s.pending
            for nb in new_list:
                mine = set(nb.instances)
                kept = [nb]
                for b in result:
                    if mine.intersection(b.instances):
                        self.ledger.merge(nb, b)
                        mine = set(nb.instances)
                    else:
                        kept.append(b)
                result = kept
        s.running = result
        s.pending = []
        s.cos = []
        s.mode = "decode"
        s.queue_step(now)
