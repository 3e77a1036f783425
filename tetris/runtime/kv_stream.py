"""KV streaming: a request's finished chunks' KV goes to its decode instances while later chunks
of it compute (`PolicySettings.stream_kv`).

With streaming on, a request is queued for decode room when its first chunk ends. If the
dispatcher places it while it still prefills (`DecodeRunner.admit`), its decode shares are
fixed for the whole prompt (`kv_moves.KVRoute`) and every finished chunk's KV — the tokens each
rank of the chunk's group computed, which sit at the end of that rank's append order — leaves
as one `KVBatch` on the instances' transfer thread (`InstancePool.stream_kv`), while the prefill
ranks go on with the next chunk. The batch made at the last chunk's end also carries the
sampler to the lead. Once the last chunk has ended and every batch has landed, the prefill
copy is freed (`Ledger.kv_moved`; later chunks attended to it until then) and the request joins
the decode batch. A request placed only after its prefill ended moves as before
(`DecodeRunner._move_in`).

A stream is cut when its request is released (cancel, deadline, failure) or must be redone (an
instance lost, a batch failed) — but only once no batch of it is in flight, so nothing is freed
under a running transfer; then `Ledger.kv_moved(failed=True)` hands back what may be freed and
the request is redone or left to the end of its running chunk, as recovery wants.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tetris.runtime.engine_api import KVLanding
from tetris.runtime.engine_request import EngineRequest, Phase
from tetris.runtime.instance_pool import InstancePool
from tetris.runtime.kv_moves import KVBatch, KVRoute
from tetris.runtime.live_requests import LiveRequests
from tetris.runtime.metrics import ServingMetrics
from tetris.solver.plan import ChunkSpec
from tetris.solver.policy.ledger import Ledger

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    state: EngineRequest
    route: KVRoute
    in_flight: int = 0
    sampler_sent: bool = False
    errors: list[BaseException] = field(default_factory=list)


class KVStreams:
    def __init__(self, pool: InstancePool, ledger: Ledger, requests: LiveRequests,
                 metrics: ServingMetrics,
                 on_fault: Callable[[EngineRequest, Sequence[BaseException]], bool],
                 on_ready: Callable[[EngineRequest], None]) -> None:
        self.pool, self.ledger, self.requests, self.metrics = pool, ledger, requests, metrics
        self.on_fault, self.on_ready = on_fault, on_ready
        self.by_id: dict[str, _Stream] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        # A release the ledger defers while a stream is open may leave no work in flight to
        # finish it: the stream is told, and cuts itself.
        requests.on_deferred = self.poke

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.by_id

    def begin(self, state: EngineRequest, route: KVRoute) -> None:
        """`state` was placed on `route.dests` while it prefills (its decode room already
        reserved in the ledger): send what its finished chunks hold."""
        self.by_id[state.request_id] = _Stream(state, route)
        self._send(self.by_id[state.request_id])

    def chunk_done(self, state: EngineRequest, chunk: ChunkSpec) -> None:
        """A chunk of `state` ended well (after the first token was taken, for the last
        chunk): its ranks hold their shares of it; stream them if placed."""
        for g, n in chunk.kv_shares().items():
            state.kv_done[g] = state.kv_done.get(g, 0) + n
        stream = self.by_id.get(state.request_id)
        if stream is not None:
            self._send(stream)

    def poke(self, request_id: str) -> None:
        """Something happened to the request outside its stream (released, to be redone):
        cut the stream now if no batch of it is in flight (else when the last one lands)."""
        stream = self.by_id.get(request_id)
        if stream is not None:
            self._settle(stream)

    def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()

    def _send(self, stream: _Stream) -> None:
        state = stream.state
        if state.phase is Phase.DONE or state.redo_pending or stream.errors:
            return  # being cut: nothing more goes out
        batch = stream.route.next_batch(state.kv_done)
        last = stream.route.done and state.request_id not in self.ledger.prefill \
            and not stream.sampler_sent
        if batch is None and not last:
            return
        if batch is None:
            batch = KVBatch((), {}, {})  # only the sampler is left to hand over
        stream.sampler_sent |= last
        stream.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._transfer(stream, batch, last))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _transfer(self, stream: _Stream, batch: KVBatch, last: bool) -> None:
        state = stream.state
        lead = stream.route.dests[0]
        try:
            errors = await self.pool.stream_kv(
                state.request_id, batch, lead, *((state.request.sampling, state.sampler_state)
                                                  if last else (None, None)))
        except Exception as err:
            errors = [err]
        stream.in_flight -= 1
        if errors:
            stream.errors.extend(errors)
        else:
            state.summary.kv_landed.append(KVLanding(
                sum(stream.route.sent.values()), time.monotonic() - state.arrival_wall))
        self._settle(stream)

    def _settle(self, stream: _Stream) -> None:
        """After a batch landed or the request changed: finish the stream, cut it, or wait."""
        if stream.in_flight:
            return
        state, rid = stream.state, stream.state.request_id
        entry = self.ledger.entry(rid)
        assert entry is not None and entry.moving, f"stream of {rid!r} not in the ledger"
        gone = entry.release_pending or state.phase is Phase.DONE
        if not (gone or state.redo_pending or stream.errors):
            if stream.sampler_sent:
                self._finish(stream)
            return  # later chunks still to come
        del self.by_id[rid]
        _, released = self.ledger.kv_moved(rid, failed=True)
        self.requests.free(released)
        self.requests.wake.set()
        if gone:
            return  # freed here or by its running chunk's end
        if stream.errors:
            log.error("KV stream of %r failed: %s", rid, stream.errors[0])
            if not self.on_fault(state, stream.errors):
                self.requests.failed(state, f"KV transfer of {rid!r} failed: "
                                     f"{stream.errors[0]}")
        elif not entry.running:
            self.on_fault(state, [])  # KV of it was lost meanwhile: redo it now

    def _finish(self, stream: _Stream) -> None:
        state = stream.state
        del self.by_id[state.request_id]
        _, released = self.ledger.kv_moved(state.request_id)
        self.requests.free(released)  # the prefill copy, now on decode
        self.requests.wake.set()
        prefilled = state.summary.prefilled_after_s
        if prefilled is not None:
            self.metrics.observe_kv_handoff(time.monotonic() - state.arrival_wall - prefilled)
        self.on_ready(state)
