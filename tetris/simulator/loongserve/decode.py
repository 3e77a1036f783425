"""LoongServe's simulated cluster state and decode side (re-implemented, no code copied).

The per-instance KV and batches LoongServe's router tracks (types in `loongserve_types.py`), the
run's invariants, and the decode mechanics of `router/manager.py`: `_schedule_decode_batch_list`
(merging batches short of KV slots, elastic scale-up onto idle instances, the multi-master plan),
`_handle_finish_req` (scale-down off emptied instances), `_merge_batch` and the `Fcfs` pause of
`router/pause_strategy.py`. `loongserve.py` drives this core with the manager's loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

from tetris.simulator.events import EventQueue
from tetris.simulator.loongserve.batching import PrefillPredictor
from tetris.simulator.loongserve.types import EPS_S, Batch, Co, LoongServeOptions, Masters, Req
from tetris.simulator.noise import DurationNoise
from tetris.simulator.records import RequestRecord, SimRequest
from tetris.solver.cost_model import CostModel


class LoongServeCore:
    """State and decode mechanics; `LoongServeSim` adds the manager loop."""

    def __init__(self, requests: Sequence[SimRequest], cost_model: CostModel, seed: int,
                 noise_cv: float, options: LoongServeOptions) -> None:
        self.cm = cost_model
        self.opts = options
        self.n = n = cost_model.cluster.prefill_instances
        self.per_node = cost_model.cluster.gpus_per_node
        self.cap = cost_model.kv_capacity_tokens
        self.pred = PrefillPredictor(cost_model)
        self.noise = DurationNoise(noise_cv, seed)
        self.avg_decode_s = options.decoding_time_s(n)
        co = cost_model.coefficients
        self.dec = (co.decode_fixed_s, co.decode_kv_s_per_token, co.lin_s_per_token,
                    co.step_intra_s, co.step_inter_s)
        self.events = EventQueue()
        self.reqs = [Req(i, r.prompt_tokens, r.output_tokens, RequestRecord(r))
                     for i, r in enumerate(requests)]
        self._validate()
        self.used = [0] * n
        self.busy_until = [0.0] * n
        self.running: list[Batch] = []
        self.waiting: list[Req] = []
        self.paused = 0
        self.has_wait = 0
        self.num_ooe = 0
        self.sum_out = options.prior_output_tokens
        self.num_fin = 1
        self.mode = "idle"
        self.step_queued = False
        self.now = 0.0
        # macro-iteration state
        self.cos: list[Co] = []
        self.pending: list[Batch] = []
        self.num_running_prefill = 0
        self.macro_start = 0.0
        self.macro_len = 0.0
        self.retry_queued = False
        self.st: dict[str, Any] = dict.fromkeys((
            "decisions", "prefill_iterations", "prefill_requests", "prefill_sp_sum",
            "prefill_request_sp_sum", "decode_steps", "decode_iterations", "macro_iterations",
            "greedy_prefills", "stalled_batches", "migrations", "migrated_tokens", "merges",
            "scale_ups", "multi_master_iterations", "preemptions", "ooe_admissions",
            "fallback_plans", "admission_trims", "invariant_checks"), 0)
        self.st["migration_s"] = 0.0

    def _validate(self) -> None:
        ids = set()
        for q in self.reqs:
            r = q.record.request
            ids.add(r.request_id)
            if q.prompt < 1 or q.output < 1:
                raise ValueError(f"request {r.request_id!r}: needs >= 1 prompt and output token")
            held, left = q.tuple_tokens()
            if held + left > self.n * self.cap:
                raise ValueError(
                    f"request {r.request_id!r}: its KV ({q.prompt} + {q.output} tokens) can never "
                    f"fit in memory, even over all {self.n} instances ({self.cap} tokens each)")
            if q.prompt > self.opts.batch_max_tokens:
                raise ValueError(f"request {r.request_id!r}: prompt of {q.prompt} tokens exceeds "
                                 f"batch_max_tokens={self.opts.batch_max_tokens}")
        if len(ids) != len(self.reqs):
            raise ValueError("request ids must be unique")

    # -- invariants ---------------------------------------------------------------------------
    def _fail(self, what: str) -> NoReturn:
        raise RuntimeError(f"LoongServe invariant broken at t={self.now:.6f}s: {what}")

    def _occupy(self, instances: Sequence[int], start: float, end: float) -> None:
        """An instance never runs two iterations at once."""
        bu = self.busy_until
        for i in instances:
            if bu[i] > start + EPS_S:
                self._fail(f"instance {i} starts at {start:.6f}s but is busy to {bu[i]:.6f}s")
            bu[i] = end
        self.st["invariant_checks"] += 1

    def _check_memory(self, instances: Sequence[int]) -> None:
        used, cap = self.used, self.cap
        for i in instances:
            if used[i] > cap or used[i] < 0:
                self._fail(f"instance {i} holds {used[i]} KV tokens (capacity {cap})")
        self.st["invariant_checks"] += 1

    # -- decoding (scale-up, merging, multi-master) ---------------------------------------------
    def _merge(self, dst: Batch, src: Batch) -> None:
        """Their `_merge_batch` + `Batch.merge`: both scale up to the union of instances."""
        have = set(dst.instances)
        dst.instances += [i for i in src.instances if i not in have]
        dst.reqs += src.reqs
        for i, t in src.bused.items():
            dst.bused[i] = dst.bused.get(i, 0) + t
        self.st["merges"] += 1

    def _scale_down(self, b: Batch, gone: Sequence[int]) -> None:
        drop = set(gone)
        b.instances = [i for i in b.instances if i not in drop]
        for i in drop:
            if b.bused.pop(i, 0):
                self._fail(f"scaled a batch down off instance {i} that holds its KV")

    def _plan_decode(self, batches: list[Batch], extra: list[int] | None
                     ) -> tuple[bool, list[Batch], list[tuple[Batch, Masters]]]:
        """Their `_schedule_decode_batch_list`. `extra=None`: any instance holding no KV may
        be taken (their can_use_extra_instances); else only those listed."""
        cap, used, opts = self.cap, self.used, self.opts
        can: list[tuple[list[Batch], int]] = []
        cannot: list[tuple[Batch, int]] = []
        total = 0
        for b in batches:
            room = cap * len(b.instances) - sum(used[i] for i in b.instances) - len(b.reqs)
            total += room
            if room >= 0:
                can.append(([b], room))
            else:
                cannot.append((b, room))
        if extra is None:
            extra = [i for i in range(self.n) if used[i] == 0]
        # Their count assumes every extra instance is empty (true for the idle ones); the ones
        # a macro-iteration hands back may hold stalled KV, so count their real free slots.
        total += sum(cap - used[i] for i in extra)
        if total < 0:
            return False, batches, []
        if cannot:
            cannot.sort(key=lambda e: e[1])
            can.sort(key=lambda e: e[1])
            for short_b, room in cannot:
                group = [short_b]
                while can:
                    more, more_room = can.pop()
                    group += more
                    room += more_room
                    if room >= 0:
                        break
                if room < 0:
                    k = 0
                    while room < 0 and k < len(extra):
                        room += cap - used[extra[k]]
                        k += 1
                    if room < 0:
                        self._fail("decode scale-up found too few free KV slots")
                    short_b.instances += extra[:k]
                    del extra[:k]
                    self.st["scale_ups"] += 1
                can.append((group, room))
            batches = []
            for group, _ in can:
                for other in group[1:]:
                    self._merge(group[0], other)
                batches.append(group[0])
        plans = []
        bound = opts.min_comp_bound_decoding_batch_size
        for b in batches:
            inst = sorted(b.instances, key=lambda i: used[i], reverse=True)
            need = len(b.reqs)
            masters: Masters = []
            members: list[int] = []
            full: list[int] = []
            gone: list[int] = []
            pos = 0
            idx = 0
            while idx < len(inst):
                i = inst[idx]
                left = cap - used[i]
                if left > 0:
                    rest = len(inst) - len(full) - len(gone) - len(members)
                    added = []
                    while need // rest > bound and extra:
                        added.append(extra.pop())
                        rest += 1
                    if added:
                        inst += added
                        self.st["scale_ups"] += 1
                    share = min(need, left, max(need // rest, bound))
                    if share > 0:
                        masters.append((i, pos, pos + share))
                        pos += share
                        need -= share
                        members.append(i)
                    elif b.bused.get(i, 0) > 0:
                        members.append(i)
                    else:
                        gone.append(i)
                elif b.bused.get(i, 0) > 0:
                    full.append(i)
                else:
                    gone.append(i)
                idx += 1
            if need > 0:
                # Their per-master cap can strand tokens (their assert would trip): hand the
                # rest to the masters' remaining room, fullest first.
                self.st["fallback_plans"] += 1
                for i, lo, hi in list(masters):
                    take = min(cap - used[i] - (hi - lo), need)
                    if take > 0:
                        masters.append((i, pos, pos + take))
                        pos += take
                        need -= take
                if need > 0:
                    self._fail("a decode batch found no room for its next tokens")
            b.instances = members + full
            for i in gone:
                b.bused.pop(i, None)
            plans.append((b, masters))
        return True, batches, plans

    def _launch_decode(self, plans: list[tuple[Batch, Masters]], start: float) -> float:
        """Start one decode iteration of every planned batch; return the lock-step length.

        A batch on several instances: each master runs the dense layers for its share, every
        member reads its local KV for all queries, partial attention is reduced per layer (one
        link latency per layer) — one step lasts the slowest master's dense part plus the
        slowest member's KV read."""
        fixed, kv_s, lin, step_intra, step_inter = self.dec
        longest = 0.0
        for b, masters in plans:
            bused = b.bused
            kv_max = max(bused.get(i, 0) for i in b.instances)
            if len(masters) == 1:
                share_max = masters[0][2] - masters[0][1]
            else:
                shares: dict[int, int] = {}
                for i, lo, hi in masters:
                    shares[i] = shares.get(i, 0) + hi - lo
                share_max = max(shares.values())
            seconds = fixed + kv_s * kv_max + lin * share_max
            if len(b.instances) > 1:
                multi_node = self.cm.cluster.spans_nodes(b.instances)
                seconds += step_inter if multi_node else step_intra
                self.st["multi_master_iterations"] += int(len(masters) > 1)
            seconds = self.noise.apply(seconds)
            self._occupy(b.instances, start, start + seconds)
            longest = max(longest, seconds)
        self.st["decode_steps"] += 1
        self.st["decode_iterations"] += len(plans)
        return longest

    def _finish_decode(self, plans: list[tuple[Batch, Masters]], now: float) -> list[int]:
        """Tokens out, KV in, finished requests freed; returns instances that became free."""
        used = self.used
        freed: list[int] = []
        touched: list[int] = []
        for b, masters in plans:
            reqs = b.reqs
            done: list[Req] = []
            bused = b.bused
            for i, lo, hi in masters:
                bused[i] = bused.get(i, 0) + hi - lo
                used[i] += hi - lo
                touched.append(i)
                for q in reqs[lo:hi]:
                    kv = q.kv
                    kv[i] = kv.get(i, 0) + 1
                    times = q.record.token_times
                    times.append(now)
                    if len(times) >= q.output:
                        done.append(q)
            if done:
                freed += self._retire(b, done)
        self._check_memory(touched)
        return freed

    def _finish_prefill(self, co: Co, b: Batch, now: float) -> None:
        done = []
        for q in b.reqs:
            times = q.record.token_times
            times.append(now)
            if len(times) >= q.output:
                done.append(q)
        if done:
            co.idle += self._retire(b, done)
        gone = [i for i in b.instances if b.bused.get(i, 0) == 0]
        if gone and b.reqs:
            self._scale_down(b, gone)
            co.idle += gone

    def _retire(self, b: Batch, done: list[Req]) -> list[int]:
        """Their `_handle_finish_req`: free the KV, scale the batch off emptied instances."""
        used, bused = self.used, b.bused
        for q in done:
            if len(q.record.token_times) != q.output:
                self._fail(f"request {q.record.request_id!r} produced "
                           f"{len(q.record.token_times)} of {q.output} tokens")
            q.record.decode_instances = tuple(sorted(q.kv))
            for i, t in q.kv.items():
                used[i] -= t
                bused[i] -= t
            q.kv = {}
            self.sum_out += q.output
            self.num_fin += 1
        gone_ids = {id(q) for q in done}
        b.reqs = [q for q in b.reqs if id(q) not in gone_ids]
        self.st["invariant_checks"] += 1
        if not b.reqs:
            freed = list(b.instances)
            b.instances = []
            b.bused = {}
            return freed
        freed = [i for i in b.instances if bused.get(i, 0) == 0]
        if freed:
            self._scale_down(b, freed)
        return freed

    def _pause_one(self) -> None:
        """Their `select_paused_reqs` with `Fcfs`: drop the newest running request's KV and put
        it at the head of the queue, to be prefilled again with its output so far."""
        b, q = max(((b, q) for b in self.running for q in b.reqs), key=lambda e: e[1].order)
        b.reqs.remove(q)
        for i, t in q.kv.items():
            self.used[i] -= t
            b.bused[i] -= t
        q.kv = {}
        q.paused = True
        self.paused += 1
        self.waiting.insert(0, q)
        self.st["preemptions"] += 1
        # Keep "no KV here <=> not in a batch" (their code scales down only after finishes).
        gone = [i for i in b.instances if b.bused.get(i, 0) == 0]
        if gone:
            self._scale_down(b, gone)
        self.running = [x for x in self.running if x.reqs]
