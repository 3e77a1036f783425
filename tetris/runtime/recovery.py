"""What the engine does when an instance fails: no request lost, none hung, capacity restored.

Two kinds of fault reach the engine, both as a failed call on a worker:
- an instance is lost (its process died: killed, out of memory, its node gone): the pool says so
  with `InstanceLost`, for a call or a ping (`probe`, every `PROBE_INTERVAL_S`, sees idle ones);
- a call failed with the instance alive (a rank raised, or timed out in a collective waiting for
  one that did): its peers were released by the collective timeout, and the groups involved
  may hold unmatched messages.

Either way the work's requests are redone: everything they hold is freed, and each is prefilled
again from token 0 on the instances serving — its prompt plus the tokens it already generated,
so a decoding request's next token comes from that prefill and its stream goes on with no token
repeated or missing (greedy decoding gives the same tokens; a sampled request continues with a
fresh random stream). A request that has held KV on a lost instance is redone too, even if it
was not running there. A request whose work fails `MAX_REDOS` times ends with an error.

Then capacity comes back: the lost instances are replaced (new actors load the model while the
rest serve, using only process groups that already exist), and once the new ones are ready the
engine pauses, waits for every call in flight to end, and every rank joins a new data plane
(`reform`; also done, without a replacement, after a fault of the second kind). The ledger
takes the instances back and serving resumes on all of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tetris.runtime.engine_request import EngineRequest, Phase
from tetris.runtime.instance_pool import InstanceLost

if TYPE_CHECKING:
    from tetris.runtime.engine import Engine

log = logging.getLogger(__name__)
MAX_REDOS = 3
PROBE_INTERVAL_S = 0.25
RETRY_S = 5.0  # between attempts to replace an instance (e.g. its node is still gone)


class Recovery:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.lost: set[int] = set()  # world ranks lost and not yet serving again
        self.poisoned = False  # a call failed on live ranks: a new data plane is needed
        self._task: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        return not self.lost and not self.poisoned

    # -- faults -------------------------------------------------------------------------------
    def work_failed(self, state: EngineRequest, errors: Sequence[BaseException]) -> bool:
        """The request's chunk, transfer or step failed with `errors` (its work has ended;
        none: it ended well but KV of it was on an instance lost meanwhile): True when it is
        redone, False when the failure is the request's own (no KV room),
        for the caller to fail it as before."""
        lost = [e.rank for e in errors if isinstance(e, InstanceLost)]
        redos = state.redos
        for rank in lost:
            self.lose(rank)
        if errors and not lost and all(isinstance(e, MemoryError) for e in errors):
            return False  # refused before any collective: nothing is out of step
        if not lost and errors:
            log.warning("work of %r failed on live instances (%s): new data plane",
                        state.request_id, errors)
            self.poisoned = True
            self._start()
        if state.redos == redos and state.phase is not Phase.DONE:
            self.redo(state)  # unless losing the instance redid it already
        return True

    def lose(self, rank: int) -> None:
        """World rank `rank`'s process is gone (idempotent until it serves again)."""
        e = self.engine
        if rank in self.lost:
            return
        self.lost.add(rank)
        p = e.pool.num_prefill
        role = "prefill" if rank < p else "decode"
        log.error("%s instance %d (rank %d) lost", role, rank if rank < p else rank - p, rank)
        affected = e.ledger.instance_lost(rank) if rank < p else \
            e.ledger.decode_instance_lost(rank - p)
        e.instances_lost += 1
        e.metrics.instance_lost(role)
        self.update_gauges()
        for rid in affected:
            state = e.requests.get(rid)
            entry = e.ledger.entry(rid)
            if state is None or entry is None:
                continue
            if entry.running or entry.moving:
                state.redo_pending = True  # redone when that work returns
                e.decode.streams.poke(rid)  # a KV stream between batches: cut now
            else:
                self.redo(state)
        self._start()

    def redo(self, state: EngineRequest) -> None:
        """Free all it holds and prefill it again, prompt and output so far (once its running
        chunk has ended and its KV stream is cut, if it has either)."""
        e = self.engine
        entry = e.ledger.entry(state.request_id)
        if entry is not None and (entry.running or entry.moving):
            state.redo_pending = True
            e.decode.streams.poke(state.request_id)
            return
        state.redo_pending = False
        state.kv_done = {}
        state.redos += 1
        e.decode.forget(state)
        e.requests.queue.remove(state.request_id)
        if state.redos > MAX_REDOS:
            e.requests.failed(state, f"request {state.request_id!r} was interrupted by "
                              f"instance failures {state.redos} times; giving up")
            return
        ids = [*state.request.prompt_ids, *state.output]
        state.redo_ids = ids
        e.requests.free(e.ledger.redo(state.request_id, len(ids)))
        state.phase = Phase.WAITING
        e.requests_recovered += 1
        e.metrics.request_recovered()
        e.requests.update_gauges()
        e.wake()

    # -- detection and replacement ----------------------------------------------------------
    async def watch(self) -> None:
        """Notice instances that die while no call of ours is running on them."""
        while True:
            try:
                found = self.engine.pool.probe()
            except Exception:
                log.exception("probing the instances failed")
                found = []
            for rank in found:
                self.lose(rank)
            await asyncio.sleep(PROBE_INTERVAL_S)

    def update_gauges(self) -> None:
        h = self.engine.health()
        self.engine.metrics.set_instances_live("prefill", h.prefill_live)
        self.engine.metrics.set_instances_live("decode", h.decode_live)

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        e = self.engine
        while not self.healthy and e.running:
            lost = sorted(self.lost)
            try:
                if lost:
                    await e.pool.replace(lost)
                e.paused = True
                await e.drained()
                self.poisoned = False
                await e.pool.reform()
            except Exception:
                log.exception("replacing instances %s failed; retrying in %s s", lost, RETRY_S)
                e.paused = False
                e.wake()
                await asyncio.sleep(RETRY_S)
                continue
            p = e.pool.num_prefill
            for rank in lost:
                if rank < p:
                    e.ledger.instance_back(rank)
                else:
                    e.ledger.decode_instance_back(rank - p)
                self.lost.discard(rank)
            log.warning("instances %s serve again", lost)
            e.paused = False
            self.update_gauges()
            e.wake()
