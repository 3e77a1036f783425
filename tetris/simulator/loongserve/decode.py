"""LoongServe's decode iterations (re-implemented, no code copied).

`router/manager.py` `_schedule_decode_batch_list`: batches short of KV slots merge with batches
that have spare slots or scale up onto idle instances, and each batch gets its multi-master plan
(`models/llama/layer_infer/longserve_transformer_layer_infer.py`
`_token_decode_attention_overlapped`): every instance with room becomes a master for a share of
the sequences and stores their new KV. Then one lock-step iteration runs and its tokens come out.
"""

from __future__ import annotations

from tetris.simulator.loongserve.kv_ledger import KvLedger
from tetris.simulator.loongserve.state import LoongServeState
from tetris.simulator.loongserve.types import Batch, Masters, Req


class DecodePlanner:
    """Plans, times and completes decode iterations of any list of batches."""

    __slots__ = ("ledger", "state")

    def __init__(self, state: LoongServeState, ledger: KvLedger) -> None:
        self.state = state
        self.ledger = ledger

    def plan(self, batches: list[Batch], extra: list[int] | None
             ) -> tuple[bool, list[Batch], list[tuple[Batch, Masters]]]:
        """Their `_schedule_decode_batch_list`. `extra=None`: any instance holding no KV may
        be taken (their can_use_extra_instances); else only those listed."""
        s = self.state
        cap, used, opts, st = s.cap, s.used, s.opts, s.st
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
            extra = [i for i in range(s.n) if used[i] == 0]
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
                        s.fail("decode scale-up found too few free KV slots")
                    short_b.instances += extra[:k]
                    del extra[:k]
                    st["scale_ups"] += 1
                can.append((group, room))
            batches = []
            for group, _ in can:
                for other in group[1:]:
                    self.ledger.merge(group[0], other)
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
                        st["scale_ups"] += 1
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
                st["fallback_plans"] += 1
                for i, lo, hi in list(masters):
                    take = min(cap - used[i] - (hi - lo), need)
                    if take > 0:
                        masters.append((i, pos, pos + take))
                        pos += take
                        need -= take
                if need > 0:
                    s.fail("a decode batch found no room for its next tokens")
            b.instances = members + full
            for i in gone:
                b.bused.pop(i, None)
            plans.append((b, masters))
        return True, batches, plans

    def launch(self, plans: list[tuple[Batch, Masters]], start: float) -> float:
        """Start one decode iteration of every planned batch; return the lock-step length.

        A batch on several instances: each master runs the dense layers for its share, every
        member reads its local KV for all queries, partial attention is reduced per layer (one
        link latency per layer) — one step lasts the slowest master's dense part plus the
        slowest member's KV read."""
        s = self.state
        st = s.st
        fixed, kv_s, lin, step_intra, step_inter = s.dec
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
                multi_node = s.cm.cluster.spans_nodes(b.instances)
                seconds += step_inter if multi_node else step_intra
                st["multi_master_iterations"] += int(len(masters) > 1)
            seconds = s.noise.apply(seconds)
            s.occupy(b.instances, start, start + seconds)
            longest = max(longest, seconds)
        st["decode_steps"] += 1
        st["decode_iterations"] += len(plans)
        return longest

    def finish(self, plans: list[tuple[Batch, Masters]], now: float) -> list[int]:
        """Tokens out, KV in, finished requests freed; returns instances that became free."""
        used = self.state.used
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
                freed += self.ledger.retire(b, done)
        self.state.check_memory(touched)
        return freed
