"""LoongServe's decode-KV compaction before a macro-iteration (re-implemented, no code copied).

`router/manager.py` of github.com/LoongServe/LoongServe, `_minimize_decoding_occupied_instances`:
decode KV is moved off the least-loaded instances onto the fullest ones, so a new prefill gets
more instances, as long as one more prefill instance saves more time than the move costs.
"""

from __future__ import annotations

from tetris.simulator.loongserve.kv_ledger import KvLedger
from tetris.simulator.loongserve.state import LoongServeState


class Compaction:
    """Empties decode instances for a prefill, paying the KV migration."""

    __slots__ = ("ledger", "state")

    def __init__(self, state: LoongServeState, ledger: KvLedger) -> None:
        self.state = state
        self.ledger = ledger

    def compact(self, n_idle: int, max_idle: int, avail: list[int], s1: int,
                s2: int) -> tuple[int, float]:
        """Their `_minimize_decoding_occupied_instances`: empty the least-loaded decode instances
        into the fullest ones while one more prefill instance saves more than the move costs.
        The router waits for each move, so the whole cluster pays the transfer time. Emptied
        instances join `avail`; returns the idle count and the delay."""
        s = self.state
        cap, used, pred, cm, st = s.cap, s.used, s.pred, s.cm, s.st
        owner = {i: b for b in s.running for i in b.instances}
        order = sorted(owner, key=lambda i: used[i], reverse=True)
        start = s.n - max_idle - 1
        delay = 0.0
        while n_idle < max_idle and order:
            src = order.pop()
            src_b = owner[src]
            if used[src] == 0:
                continue  # already counted idle (their code would list it twice)
            if s1 <= n_idle * cap:
                speedup = pred.predict(n_idle, s1, s2) - pred.predict(n_idle + 1, s1, s2)
                # Their estimate is link-blind (a fixed NVLink rate for LWM-7B): intra-node.
                if speedup < cm.kv_transfer_seconds(used[src], cross_node=False):
                    break
            while used[src] > 0:
                if not 0 <= start < len(order):
                    s.fail("KV compaction ran out of destination instances")
                dst = order[start]
                dst_b = owner[dst]
                amount = min(used[src], cap - used[dst])
                if amount == 0:
                    start -= 1
                    continue
                if src_b is not dst_b:
                    self.ledger.merge(dst_b, src_b)
                    s.running.remove(src_b)
                    for i in src_b.instances:
                        owner[i] = dst_b
                    src_b = dst_b
                moved = amount
                cross = cm.cluster.spans_nodes((src, dst))
                for q in src_b.reqs:
                    have = q.kv.get(src, 0)
                    if have == 0 or amount == 0:
                        continue
                    m = min(amount, have)
                    q.kv[src] = have - m
                    if q.kv[src] == 0:
                        del q.kv[src]
                    q.kv[dst] = q.kv.get(dst, 0) + m
                    q.record.kv_transfer_s += cm.kv_transfer_seconds(m, cross)
                    amount -= m
                used[src] -= moved
                used[dst] += moved
                src_b.bused[src] -= moved
                src_b.bused[dst] = src_b.bused.get(dst, 0) + moved
                seconds = cm.kv_transfer_seconds(moved, cross)
                delay += seconds
                st["migrations"] += 1
                st["migrated_tokens"] += moved
                st["migration_s"] += seconds
                s.check_memory((src, dst))
            self.ledger.scale_down(src_b, [src])
            avail.append(src)
            n_idle += 1
        return n_idle, delay
