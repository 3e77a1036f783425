"""The engine's live requests, and how each one ends.

Whoever ends a request — the prefill side, the decode side, a client leaving — ends it here: its
KV is released in the ledger and freed on the workers that hold it, its stream gets its last
event, the metrics hear of it, and the scheduling loop is woken (room may have freed up). A
release the ledger defers (a chunk or KV transfer of the request still in flight) is freed by
whoever sees that work end, through `free`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from tetris.runtime.engine_api import FinishReason
from tetris.runtime.engine_request import EngineRequest, Phase
from tetris.runtime.instance_pool import InstancePool
from tetris.runtime.metrics import ServingMetrics
from tetris.solver.policy.dispatch import DecodeQueue
from tetris.solver.policy.ledger import Ledger, Released


class LiveRequests:
    def __init__(self, ledger: Ledger, pool: InstancePool, queue: DecodeQueue,
                 metrics: ServingMetrics, wake: asyncio.Event) -> None:
        self.ledger, self.pool, self.queue, self.metrics = ledger, pool, queue, metrics
        self.wake = wake
        self.by_id: dict[str, EngineRequest] = {}
        # Told of a release the ledger deferred (a KV stream's owner: see `kv_stream.py`).
        self.on_deferred: Callable[[str], None] = lambda request_id: None

    def __len__(self) -> int:
        return len(self.by_id)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.by_id

    def get(self, request_id: str) -> EngineRequest | None:
        return self.by_id.get(request_id)

    def add(self, state: EngineRequest) -> None:
        self.by_id[state.request_id] = state
        self.update_gauges()

    def free(self, released: Released | None) -> None:
        """Free on the workers what the ledger says a request held."""
        if released is None:
            return
        if released.prefill_kv:
            self.pool.free(released.request_id, sorted(released.prefill_kv))
        if released.decode_instances:
            p = self.pool.num_prefill
            self.pool.free(released.request_id, [p + j for j in released.decode_instances])

    def _end(self, state: EngineRequest) -> None:
        if state.deadline is not None:
            state.deadline.cancel()
        self.queue.remove(state.request_id)
        released = self.ledger.release(state.request_id)
        self.free(released)
        if released is None:
            self.on_deferred(state.request_id)
        self.by_id.pop(state.request_id, None)
        self.update_gauges()
        self.wake.set()

    def finished(self, state: EngineRequest, reason: FinishReason) -> None:
        """Its last token is out (`add_tokens` returned `reason`)."""
        state.phase = Phase.DONE
        self._end(state)
        self.metrics.observe_e2e(time.monotonic() - state.arrival_wall)
        self.metrics.count_tokens(state.prompt_tokens, len(state.output))
        self.metrics.request_finished(reason)

    def failed(self, state: EngineRequest, message: str, *, timed_out: bool = False) -> None:
        """A worker or the planner failed it, or it ran past its deadline: its client sees
        `message`."""
        self._end(state)
        state.fail(message, timed_out=timed_out)

    def cancelled(self, state: EngineRequest) -> None:
        """Its client went away."""
        state.cancelled = True
        self._end(state)
        state.finish("abort")
        self.metrics.request_finished("abort")

    def update_gauges(self) -> None:
        waiting = sum(1 for s in self.by_id.values() if s.phase is Phase.WAITING)
        self.metrics.set_requests(len(self.by_id) - waiting, waiting)
