"""LoongServe's admission of waiting requests (re-implemented, no code copied).

`router/req_queue.py` of github.com/LoongServe/LoongServe: `ReqQueue.generate_new_req_list`
(FCFS with bounded out-of-order admission, the KV reservation test, the two cost/benefit rules
that decide whether new prompts may take instances holding decode batches) and
`generate_greedy_req_list` (prefill on instances freed inside a macro-iteration).
"""

from __future__ import annotations

from tetris.simulator.loongserve.reservation import Reservation
from tetris.simulator.loongserve.state import LoongServeState
from tetris.simulator.loongserve.types import Req


class Admission:
    """Their request queue's decisions: which waiting requests to prefill now."""

    __slots__ = ("state",)

    def __init__(self, state: LoongServeState) -> None:
        self.state = state

    def _can_add(self, res: Reservation, q: Req, limit: int, paused: int) -> bool:
        held, left = q.tuple_tokens()
        others = paused - (1 if q.paused else 0)
        return res.peak_with(held, left) <= limit and \
            len(res) + 1 + others <= self.state.opts.running_max_req_size

    def select_new(self) -> list[Req]:
        """Their `ReqQueue.generate_new_req_list`."""
        s = self.state
        opts, pred, cap, n = s.opts, s.pred, s.cap, s.n
        if not s.waiting:
            return []
        exist = sum(len(b.reqs) for b in s.running) + s.paused
        if exist >= opts.running_max_req_size:
            return []
        avg_iters = s.sum_out / s.num_fin
        est_iters = float(opts.min_estimated_iterations)
        inv_decode = 0.0
        entries = []
        for b in s.running:
            for q in b.reqs:
                g = len(q.record.token_times)
                inv_decode += 1.0 / g
                est_iters = max(est_iters, avg_iters - g, 0.1 * g)
                entries.append(q.tuple_tokens())
        est_wait = est_iters * s.avg_decode_s
        num_used = sum(s.used)
        max_idle = n - (num_used + cap - 1) // cap
        isolated = cap * max_idle
        bmt = min(opts.batch_max_tokens, n * cap - num_used)
        num_idle = sum(1 for u in s.used if u == 0)
        res = Reservation(entries)
        limit = n * cap
        paused = s.paused
        allow_ooe = s.num_ooe < opts.max_num_ooe
        can_run: list[Req] = []
        new_waiting: list[Req] = []
        s1 = s2 = 0
        is_ooe, before_ooe, need_break = False, 0, False
        und: list[Req] = []
        us1 = us2 = 0
        uinv = 0.0
        can_append_und, run_idx = True, 0
        for k, q in enumerate(s.waiting):
            length = q.need
            ns = s1 + length
            if self._can_add(res, q, limit, paused) and ns <= bmt and \
                    (not opts.disable_scale_up or ns <= num_idle * cap):
                und_empty = not und
                if (und_empty or allow_ooe) and ns <= isolated:
                    nsq = s2 + length * length
                    cur = pred.predict(max_idle, ns, nsq)
                    satisfy = cur <= opts.max_prefill_time_s
                    # Slowdown of prefilling on the instances free of decode KV (after
                    # compaction) instead of all N, against the wait for decode to drain.
                    if cur - pred.predict(n, ns, nsq) <= est_wait and (not can_run or satisfy):
                        need_break = need_break or not satisfy
                        if not und_empty and not is_ooe:
                            before_ooe, is_ooe = len(can_run), True
                        can_run.append(q)
                        res.add(*q.tuple_tokens())
                        s1, s2 = ns, nsq
                        if q.paused:
                            paused -= 1
                        continue
                can_add = self._can_add(res, q, limit, paused)
                if opts.quirk_undecided_clears_reservations:
                    res.reset(())
                if can_append_und and can_add and ns + us1 <= bmt:
                    und.append(q)
                    us1 += length
                    us2 += length * length
                    uinv += 1.0 / length
                    t = pred.predict(n, us1 + s1, us2 + s2)
                    satisfy = t <= opts.max_prefill_time_s
                    # Preempting every decode batch: the prefill time added to each decoding
                    # request (per output token so far) against the wait it saves the new
                    # ones (per prompt token).
                    if t * inv_decode <= est_wait * uinv and \
                            (len(can_run) + len(und) == 1 or satisfy):
                        need_break = need_break or not satisfy
                        run_idx = len(und)
                    continue
                can_append_und = False
            if allow_ooe and not need_break:
                if not is_ooe:
                    before_ooe, is_ooe = len(can_run), True
                new_waiting.append(q)
            else:
                new_waiting.extend(s.waiting[k:])
                break
        # Their first-branch size test leaves out the undecided requests, so an out-of-order
        # admission can push the total past the free KV slots and crash their scheduler (empty
        # pop / DP assert): drop undecided ones from the end until the prompts fit.
        while run_idx > 0 and s1 + sum(q.need for q in und[:run_idx]) > bmt:
            run_idx -= 1
            s.st["admission_trims"] += 1
        can_run += und[:run_idx]
        if not can_run:
            return []
        if is_ooe and before_ooe < len(can_run):
            s.num_ooe += 1
            s.st["ooe_admissions"] += 1
        else:
            s.num_ooe = 0
        s.waiting = und[run_idx:] + new_waiting
        return can_run

    def select_greedy(self, idle: list[int], left_s: float) -> list[Req]:
        """Their `ReqQueue.generate_greedy_req_list`: any waiting request whose prefill still
        fits on the freed instances within what is left of the macro-iteration."""
        s = self.state
        m = len(idle)
        res = Reservation()
        # Their limit is m·capacity; a freed instance can still hold a stalled batch's KV, so
        # count real free slots (else their DP assert trips).
        limit = sum(s.cap - s.used[i] for i in idle)
        paused = s.paused
        can_run: list[Req] = []
        rest: list[Req] = []
        s1 = s2 = 0
        for q in s.waiting:
            length = q.need
            ns, nsq = s1 + length, s2 + length * length
            if self._can_add(res, q, limit, paused) and ns <= s.opts.batch_max_tokens and \
                    s.pred.predict(m, ns, nsq) <= left_s:
                can_run.append(q)
                res.add(*q.tuple_tokens())
                s1, s2 = ns, nsq
                if q.paused:
                    paused -= 1
            else:
                rest.append(q)
        if can_run:
            s.waiting = rest
        return can_run
