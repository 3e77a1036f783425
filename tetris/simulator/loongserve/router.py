"""LoongServe's router loop over the simulator's events (re-implemented, no code copied).

`router/manager.py` `RouterManager._step`: every `max_wait_tokens` decode iterations (or when
idle) it tries to admit waiting requests and, if any are admitted, starts a macro-iteration;
otherwise all decode batches run one lock-step iteration, pausing the newest request first if
even merging and scale-up leave a sequence without a KV slot. Their router polls (5 ms idle,
10 ms between greedy retries); here arrivals and completions wake it.
"""

from __future__ import annotations

import time

from tetris.simulator.events import PRIORITY_ARRIVAL, PRIORITY_COMPLETE, PRIORITY_DECIDE
from tetris.simulator.loongserve.admission import Admission
from tetris.simulator.loongserve.decode import DecodePlanner
from tetris.simulator.loongserve.kv_ledger import KvLedger
from tetris.simulator.loongserve.macro import MacroIteration
from tetris.simulator.loongserve.state import LoongServeState
from tetris.simulator.loongserve.types import (
    ARRIVAL,
    CO_END,
    CO_RETRY,
    CO_WAKE,
    DECODE_END,
    STEP,
    Batch,
    Masters,
    Req,
)
from tetris.simulator.records import SimOutcome


class Router:
    """Their `RouterManager` loop: dispatches every event to the component it concerns."""

    __slots__ = ("admission", "decode", "ledger", "macro", "state")

    def __init__(self, state: LoongServeState, ledger: KvLedger, decode: DecodePlanner,
                 admission: Admission, macro: MacroIteration) -> None:
        self.state = state
        self.ledger = ledger
        self.decode = decode
        self.admission = admission
        self.macro = macro

    def run(self) -> SimOutcome:
        s = self.state
        started = time.perf_counter()
        for q in s.reqs:
            s.events.push(q.record.request.arrival_s, PRIORITY_ARRIVAL, ARRIVAL, q)
        events = 0
        pop = s.events.pop
        macro = self.macro
        while s.events:
            now, _, _, kind, payload = pop()
            if now < s.now:
                s.fail("time went backwards")
            s.now = now
            events += 1
            if kind == DECODE_END:
                self._decode_end(payload, now)
            elif kind == CO_END:
                macro.co_end(payload, now)
            elif kind == ARRIVAL:
                self._arrive(payload, now)
            elif kind == STEP:
                s.step_queued = False
                self._step(now)
            elif kind == CO_WAKE:
                co, epoch = payload
                if co.waiting and co.epoch == epoch:
                    macro.co_continue(co, now)
            else:
                s.retry_queued = False
                for co in list(s.cos):
                    if co.waiting:
                        macro.co_continue(co, now)
        s.st["invariant_checks"] += 1
        unfinished = [q.record.request_id for q in s.reqs
                      if len(q.record.token_times) != q.output]
        if unfinished:
            raise RuntimeError(f"LoongServe simulation ended with {len(unfinished)} unfinished "
                               f"requests (first: {unfinished[0]!r})")
        return self._outcome(events, time.perf_counter() - started)

    def _outcome(self, events: int, wall: float) -> SimOutcome:
        s = self.state
        st = s.st
        st["events"] = events
        st["wall_s"] = wall
        st["simulated_s"] = s.now
        iters = st["prefill_iterations"]
        st["mean_prefill_sp"] = st.pop("prefill_sp_sum") / iters if iters else 0.0
        reqs = st["prefill_requests"]
        st["mean_request_prefill_sp"] = st.pop("prefill_request_sp_sum") / reqs if reqs else 0.0
        return SimOutcome("loongserve", [q.record for q in s.reqs], st)

    def _arrive(self, q: Req, now: float) -> None:
        s = self.state
        s.waiting.append(q)
        if s.mode == "idle":
            s.queue_step(now)
        elif s.mode == "macro" and not s.retry_queued and any(c.waiting for c in s.cos):
            # Their waiting coroutines poll every 10 ms; here they look at each arrival.
            s.retry_queued = True
            s.events.push(now, PRIORITY_DECIDE, CO_RETRY)

    def _step(self, now: float) -> None:
        """Their `RouterManager._step`."""
        s = self.state
        s.st["decisions"] += 1
        is_idle = not s.running
        if is_idle or s.has_wait >= s.opts.max_wait_tokens:
            new = self.admission.select_new()
            if new:
                s.has_wait = 0
                self.macro.start(new, now)
                return
            if is_idle:
                s.mode = "idle"
                return
        ok, batches, plans = self.decode.plan(s.running, None)
        if not ok:
            self.ledger.pause_newest()
            s.has_wait = 0
            s.queue_step(now)
            return
        s.running = batches
        s.mode = "decode"
        end = now + self.decode.launch(plans, now)
        s.events.push(end, PRIORITY_COMPLETE, DECODE_END, plans)

    def _decode_end(self, plans: list[tuple[Batch, Masters]], now: float) -> None:
        s = self.state
        self.decode.finish(plans, now)
        s.running = [b for b in s.running if b.reqs]
        s.has_wait += 1
        s.queue_step(now)
