"""LoongServe (SOSP'24, elastic sequence parallelism) as a policy of our discrete-event simulator.

A faithful re-implementation of the global manager of github.com/LoongServe/LoongServe
(`loongserve/longserve_server/router/manager.py` `RouterManager`, `router/req_queue.py`
`ReqQueue`, `longserve_c_scheduler/src/main.cpp`), written from their code and paper — see
docs/baselines-loongserve.md for the mapping, the simplifications and the default knobs.

N unified instances each prefill and decode. The manager loop (`RouterManager._step`):
- Every `max_wait_tokens` decode iterations (or when idle) it admits waiting requests
  (`loongserve_admission.py`, their `generate_new_req_list`: FCFS with bounded out-of-order
  admission, a KV reservation test, and two cost/benefit rules deciding whether a prefill may
  take instances that hold decode batches). Admitted requests start a *macro-iteration*
  (`_start_macro`, their `_schedule_new_req_list_with_decoding`): optionally compact decode KV
  onto fewer instances (paid migration), pick the decode batches whose instances the prefill
  takes (those batches stall for the whole macro-iteration), batch the prompts and size each
  batch's ESP group by their DP, and run the prefill batches while the untouched decode batches
  keep decoding. Instances that free up meanwhile take more prefill greedily if it fits in the
  macro-iteration's predicted length.
- Otherwise all decode batches run one iteration in lock-step (`_plan_decode`, their
  `_schedule_decode_batch_list`): batches short of KV slots merge with batches that have spare
  slots or scale up onto idle instances; a batch spread over several instances decodes with
  several masters (multi-master decoding); new KV goes to the fullest instance with room.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from tetris.simulator.events import PRIORITY_ARRIVAL, PRIORITY_COMPLETE, PRIORITY_DECIDE
from tetris.simulator.loongserve.batching import place_prefill_kv, plan_prefill_batches
from tetris.simulator.loongserve.compaction import LoongServeCompaction
from tetris.simulator.loongserve.types import EPS_S, Batch, Co, LoongServeOptions, Masters, Req
from tetris.simulator.records import ChunkRecord, SimOutcome, SimRequest
from tetris.solver.cost_model import CostModel

__all__ = ["LoongServeOptions", "LoongServeSim", "simulate_loongserve"]

ARRIVAL, STEP, DECODE_END, CO_END, CO_WAKE, CO_RETRY = (
    "arrival", "step", "decode_end", "co_end", "co_wake", "co_retry")


class LoongServeSim(LoongServeCompaction):
    """Their `RouterManager` loop over the simulated core."""

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> SimOutcome:
        started = time.perf_counter()
        for q in self.reqs:
            self.events.push(q.record.request.arrival_s, PRIORITY_ARRIVAL, ARRIVAL, q)
        events = 0
        pop = self.events.pop
        while self.events:
            now, _, _, kind, payload = pop()
            if now < self.now:
                self._fail("time went backwards")
            self.now = now
            events += 1
            if kind == DECODE_END:
                self._decode_end(payload, now)
            elif kind == CO_END:
                self._co_end(payload, now)
            elif kind == ARRIVAL:
                self._arrive(payload, now)
            elif kind == STEP:
                self.step_queued = False
                self._step(now)
            elif kind == CO_WAKE:
                co, epoch = payload
                if co.waiting and co.epoch == epoch:
                    self._co_continue(co, now)
            else:
                self.retry_queued = False
                for co in list(self.cos):
                    if co.waiting:
                        self._co_continue(co, now)
        self.st["invariant_checks"] += 1
        unfinished = [q.record.request_id for q in self.reqs
                      if len(q.record.token_times) != q.output]
        if unfinished:
            raise RuntimeError(f"LoongServe simulation ended with {len(unfinished)} unfinished "
                               f"requests (first: {unfinished[0]!r})")
        return self._outcome(events, time.perf_counter() - started)

    def _outcome(self, events: int, wall: float) -> SimOutcome:
        st = self.st
        st["events"] = events
        st["wall_s"] = wall
        st["simulated_s"] = self.now
        iters = st["prefill_iterations"]
        st["mean_prefill_sp"] = st.pop("prefill_sp_sum") / iters if iters else 0.0
        reqs = st["prefill_requests"]
        st["mean_request_prefill_sp"] = st.pop("prefill_request_sp_sum") / reqs if reqs else 0.0
        return SimOutcome("loongserve", [q.record for q in self.reqs], st)

    def _queue_step(self, now: float) -> None:
        if not self.step_queued:
            self.step_queued = True
            self.events.push(now, PRIORITY_DECIDE, STEP)

    def _arrive(self, q: Req, now: float) -> None:
        self.waiting.append(q)
        if self.mode == "idle":
            self._queue_step(now)
        elif self.mode == "macro" and not self.retry_queued and any(c.waiting for c in self.cos):
            # Their waiting coroutines poll every 10 ms; here they look at each arrival.
            self.retry_queued = True
            self.events.push(now, PRIORITY_DECIDE, CO_RETRY)

    def _step(self, now: float) -> None:
        """Their `RouterManager._step`."""
        self.st["decisions"] += 1
        is_idle = not self.running
        if is_idle or self.has_wait >= self.opts.max_wait_tokens:
            new = self._select_new()
            if new:
                self.has_wait = 0
                self._start_macro(new, now)
                return
            if is_idle:
                self.mode = "idle"
                return
        ok, batches, plans = self._plan_decode(self.running, None)
        if not ok:
            self._pause_one()
            self.has_wait = 0
            self._queue_step(now)
            return
        self.running = batches
        self.mode = "decode"
        end = now + self._launch_decode(plans, now)
        self.events.push(end, PRIORITY_COMPLETE, DECODE_END, plans)

    def _decode_end(self, plans: list[tuple[Batch, Masters]], now: float) -> None:
        self._finish_decode(plans, now)
        self.running = [b for b in self.running if b.reqs]
        self.has_wait += 1
        self._queue_step(now)

    # -- macro-iteration (prefill with decoding) --------------------------------------------------
    def _start_macro(self, new: list[Req], now: float) -> None:
        """Their `_schedule_new_req_list_with_decoding` + `_dispatch_independ_batch_list`."""
        self.st["macro_iterations"] += 1
        cap, n, pred, used = self.cap, self.n, self.pred, self.used
        s1 = sum(q.need for q in new)
        s2 = sum(q.need * q.need for q in new)
        inv = sum(1.0 / q.need for q in new)
        avail = [i for i in range(n) if used[i] == 0]
        n_idle = len(avail)
        max_idle = n - (sum(used) + cap - 1) // cap
        delay = 0.0
        if n - max_idle < n - n_idle and s1 <= max_idle * cap and not self.opts.disable_scale_up:
            n_idle, delay = self._compact(n_idle, max_idle, avail, s1, s2)
        running = self.running
        pending: list[Batch] = []
        short = s1 - n_idle * cap
        if short > 0:
            by_room = sorted(((b, len(b.instances) * cap - sum(b.bused.values()))
                              for b in running), key=lambda e: e[1])
            while short > 0:
                if not by_room:
                    self._fail("admitted prompts exceed the free KV slots")
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
        ok, dec_batches, plans = self._plan_decode(run_dec, [])
        if not ok:
            extra: list[int] = []
            while s1 <= (len(avail) - 1) * cap and not ok:
                extra.append(avail.pop())
                ok, dec_batches, plans = self._plan_decode(run_dec, list(extra))
            if not ok:
                pending += run_dec
                dec_batches, plans, avail = [], [], list(range(n))
        new.sort(key=lambda q: q.need, reverse=True)
        avail.sort(key=lambda i: (used[i], i // self.per_node))
        prune = self.opts.dp_pruning
        layout = plan_prefill_batches([q.need for q in new], [cap - used[i] for i in avail], pred,
                                      prune)
        if layout is None:  # their code asserts here; every instance then goes to the prefill
            self.st["fallback_plans"] += 1
            pending += dec_batches
            dec_batches, plans = [], []
            avail = sorted(range(n), key=lambda i: (used[i], i // self.per_node))
            layout = plan_prefill_batches([q.need for q in new], [cap - used[i] for i in avail],
                                          pred, prune)
            if layout is None:
                self._fail("no prefill plan fits even on every instance")
        self.st["stalled_batches"] += len(pending)
        t0 = now + delay
        self.mode = "macro"
        self.running = []
        self.pending = pending
        self.macro_start = t0
        self.macro_len = max(pb.predicted_s for pb in layout)
        self.cos = []
        if dec_batches:
            co = Co(dec_batches)
            self.cos.append(co)
            self._launch_co_decode(co, plans, t0)
        self.num_running_prefill = len(layout)
        for pb in layout:
            co = Co([], prefill=True, counted=True)
            self.cos.append(co)
            self._launch_prefill(co, new[pb.first_req:pb.end_req], avail[pb.first_inst:pb.end_inst],
                                 t0)

    def _launch_prefill(self, co: Co, reqs: list[Req], group: list[int], start: float) -> None:
        """One prefill batch on one ESP group; its KV lands where the migration plan says."""
        used, cap = self.used, self.cap
        lengths = [q.need for q in reqs]
        order, pieces = place_prefill_kv(lengths, group, used, cap)
        bused: dict[int, int] = {}
        s1 = s2 = 0
        for q, length, mine in zip(reqs, lengths, pieces, strict=True):
            s1 += length
            s2 += length * length
            if q.paused:
                q.paused = False
                self.paused -= 1
            for i, t in mine:
                q.kv[i] = q.kv.get(i, 0) + t
                bused[i] = bused.get(i, 0) + t
                used[i] += t
        self._check_memory(order)
        sp = len(order)
        seconds = self.noise.apply(
            self.pred.actual(sp, self.cm.cluster.spans_nodes(order), s1, s2))
        end = start + seconds
        self._occupy(order, start, end)
        members = tuple(sorted(order))
        for q, length in zip(reqs, lengths, strict=True):
            q.record.chunks.append(ChunkRecord(0, length, members, start, end))
        co.batches.append(Batch(list(reqs), order, bused))
        co.prefill = True
        st = self.st
        st["prefill_iterations"] += 1
        st["prefill_requests"] += len(reqs)
        st["prefill_sp_sum"] += sp
        st["prefill_request_sp_sum"] += sp * len(reqs)
        self.events.push(end, PRIORITY_COMPLETE, CO_END, co)
        co.inflight += 1

    def _launch_co_decode(self, co: Co, plans: list[tuple[Batch, Masters]],
                          start: float) -> None:
        co.plans = plans
        co.prefill = False
        co.inflight += 1
        self.events.push(start + self._launch_decode(plans, start), PRIORITY_COMPLETE, CO_END, co)

    def _co_end(self, co: Co, now: float) -> None:
        co.inflight -= 1
        if co.inflight > 0:
            return  # its other batches of this iteration are still running
        if co.prefill:
            for b in co.batches:
                self._finish_prefill(co, b, now)
            co.batches = [b for b in co.batches if b.reqs]
            co.prefill = False
            if co.counted:
                co.counted = False
                self.num_running_prefill -= 1
                if self.num_running_prefill == 0:
                    for other in self.cos:
                        if other.waiting:
                            self._co_continue(other, now)
        else:
            co.idle += self._finish_decode(co.plans, now)
            co.batches = [b for b in co.batches if b.reqs]
        self._co_continue(co, now)

    def _co_continue(self, co: Co, now: float) -> None:
        """The rest of their `_run_independent_batch_list` loop body."""
        if not co.batches:
            co.waiting = False
            if self.num_running_prefill > 0:
                left = self.macro_len - (now - self.macro_start)
                if left > EPS_S and co.idle:
                    self.st["decisions"] += 1
                    greedy = self._select_greedy(co.idle, left)
                    if greedy:
                        self.st["greedy_prefills"] += 1
                        self._greedy_prefill(co, greedy, now)
                        return
                if left > EPS_S:
                    co.waiting = True
                    co.epoch += 1
                    self.events.push(self.macro_start + self.macro_len, PRIORITY_DECIDE,
                                     CO_WAKE, (co, co.epoch))
                    return
                self._co_done(co, now)
                return
        if self.num_running_prefill == 0:
            self._co_done(co, now)
            return
        ok, batches, plans = self._plan_decode(co.batches, [])
        if not ok:
            self._co_done(co, now)
            return
        co.batches = batches
        self._launch_co_decode(co, plans, now)

    def _greedy_prefill(self, co: Co, reqs: list[Req], now: float) -> None:
        reqs.sort(key=lambda q: q.need, reverse=True)
        avail = sorted(co.idle, key=lambda i: (self.used[i], i // self.per_node))
        layout = plan_prefill_batches([q.need for q in reqs],
                                      [self.cap - self.used[i] for i in avail], self.pred,
                                      self.opts.dp_pruning)
        if layout is None:
            self._fail("greedy prefill admitted requests that do not fit the freed instances")
        co.idle = []
        for pb in layout:
            self._launch_prefill(co, reqs[pb.first_req:pb.end_req],
                                 avail[pb.first_inst:pb.end_inst], now)

    def _co_done(self, co: Co, now: float) -> None:
        co.done = True
        co.waiting = False
        if all(c.done for c in self.cos):
            self._end_macro(now)

    def _end_macro(self, now: float) -> None:
        """Merge the stalled decode batches into whichever new batch now shares an instance."""
        new_list = [b for c in self.cos for b in c.batches]
        result = new_list
        if self.pending:
            result = self.pending
            for nb in new_list:
                mine = set(nb.instances)
                kept = [nb]
                for b in result:
                    if mine.intersection(b.instances):
                        self._merge(nb, b)
                        mine = set(nb.instances)
                    else:
                        kept.append(b)
                result = kept
        self.running = result
        self.pending = []
        self.cos = []
        self.mode = "decode"
        self._queue_step(now)


def simulate_loongserve(requests: Sequence[SimRequest], cost_model: CostModel, *, seed: int = 0,
                        noise_cv: float = 0.0,
                        options: LoongServeOptions | None = None) -> SimOutcome:
    """Replay `requests` under LoongServe's scheduling on the unified instances of
    `cost_model.cluster` (its prefill_instances; decode_instances is ignored)."""
    if not requests:
        return SimOutcome("loongserve", [], {"events": 0, "wall_s": 0.0})
    return LoongServeSim(requests, cost_model, seed, noise_cv, options or LoongServeOptions()).run()
