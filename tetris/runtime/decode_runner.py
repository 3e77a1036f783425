"""The engine's decode side: placement on decode instances, KV transfer, continuous batching.

Prefilled requests wait in the policy's `DecodeQueue`, first come first served. `admit` (run by
the engine's scheduling loop after each decision) places the head with the decode dispatcher
(`choose_decode_instances`, the simulator's) on the ledger's decode loads: the least-loaded
decode instance with room for its whole KV (prompt plus every token it may generate), or, when
none has room, the fewest instances whose free room covers it (decode SP). The instance with the
most room leads (it keeps the generated tokens); the prompt's KV then moves point to point from
the prefill ranks holding it (`kv_moves.plan_kv_moves`), which are held busy meanwhile. Once its
KV is in, the request joins the batch: every step runs one token of every decoding request,
each decode rank getting the entries it leads or lends KV to, all at once. A request placed while
it still prefills (KV streaming) is handed to `kv_stream.KVStreams` instead, which sends its
finished chunks' KV as they end and hands it back (`_joined`) once all of it is in.

Elastic roles: a GPU's own leftover prefill KV goes to its decode role by a copy (`home`), and a
decode instance turning to prefill is `drain`ed: between steps, each request on it moves its KV
(`InstancePool.migrate_kv`) to an open decode instance with room, and goes on decoding there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from tetris.runtime.batch_attend import DecodeEntry
from tetris.runtime.engine_request import EngineRequest, Phase
from tetris.runtime.instance_pool import InstancePool
from tetris.runtime.kv_moves import KVMove, KVRoute, plan_kv_moves, stream_shares
from tetris.runtime.kv_stream import KVStreams
from tetris.runtime.live_requests import LiveRequests
from tetris.runtime.metrics import ServingMetrics
from tetris.solver.policy.ledger import Ledger

log = logging.getLogger(__name__)


# Called with a request whose transfer or step failed with these errors; False: fail it.
OnFault = Callable[[EngineRequest, Sequence[BaseException]], bool]


class DecodeRunner:
    def __init__(self, pool: InstancePool, ledger: Ledger, requests: LiveRequests,
                 metrics: ServingMetrics, now: Callable[[], float], on_fault: OnFault) -> None:
        self.pool, self.ledger, self.requests, self.metrics = pool, ledger, requests, metrics
        self.queue = requests.queue
        self.now = now
        self.on_fault = on_fault
        self.paused = False  # the engine's `paused`: the data plane is being re-formed
        self.stepping = False
        self.active: list[EngineRequest] = []
        self.busy_s = [0.0] * pool.num_decode
        self.t0 = time.monotonic()
        self._work = asyncio.Event()
        self._transfers: set[asyncio.Task[None]] = set()
        self._stopped = False
        self.streams = KVStreams(pool, ledger, requests, metrics, on_fault, self._joined)
        self.draining: set[int] = set()  # decode instances whose requests move away
        self.after_change: Callable[[], None] = lambda: None  # a step or a move ended

    def submit(self, state: EngineRequest) -> None:
        """Queue it for decode room (its KV: the prompt plus every token still to come but the
        last, whose KV is never computed): once its first token is out, or with KV streaming
        once its first chunk ended."""
        if state.request_id not in self.queue and state.request_id not in self.streams:
            self.queue.submit(state.request_id,
                              state.prompt_tokens + state.request.sampling.max_tokens - 1)

    def forget(self, state: EngineRequest) -> None:
        """It ended outside a step (cancelled): leave the batch."""
        if state in self.active:
            self.active.remove(state)

    @property
    def in_flight(self) -> bool:
        return self.stepping or bool(self._transfers) or bool(self.streams.tasks)

    def drain(self, instance: int) -> None:
        """Move every request off decode instance `instance` (closed to new ones)."""
        self.draining.add(instance)
        self._work.set()

    def wake(self) -> None:
        self._work.set()

    def stop(self) -> None:
        self._stopped = True
        self._work.set()
        for task in list(self._transfers):
            task.cancel()
        self.streams.stop()

    # -- placement and KV transfer --------------------------------------------------------------
    def admit(self) -> None:
        """Place queued requests while the head fits; each placement's bookkeeping is done at
        once (the next placement sees its room taken), its transfer runs as a task."""
        ledger, p = self.ledger, self.pool.num_prefill
        while not self.paused and \
                (placed := self.queue.place_head(ledger.decode_loads())) is not None:
            rid, placement = placed
            state = self.requests.by_id[rid]
            instances = tuple(sorted(placement.instances,
                                     key=lambda j: (ledger.decode_reserved[j], j)))
            dests = tuple(p + j for j in instances)
            if not self.pool.can_group(dests):
                return  # a decode group that cannot be made until the data plane is re-formed
            rooms = [ledger.decode_room(j, self.pool.decode_kv_tokens) for j in instances]
            generate = state.request.sampling.max_tokens - len(state.output)
            if rid in ledger.prefill:  # still prefilling: its KV streams in from now on
                try:
                    shares = stream_shares(len(state.prefill_ids), rooms, generate)
                except ValueError:
                    return
                reserve = [*shares]
                reserve[0] += generate
                self.queue.pop()
                ledger.decode_begin(rid, instances, tuple(reserve))
                state.decode_ranks = dests
                state.summary.decode_instances = instances
                self.streams.begin(state, KVRoute(dests, shares, reserve))
                continue
            held = ledger.handoff[rid].kv_held
            home = {g: p + g for g in held} if self.pool.elastic else None
            try:
                moves, reserve = plan_kv_moves(held, dests, rooms, generate, home)
            except ValueError:
                return  # the lead lacks room for the generated tokens yet: wait
            sources = tuple(sorted({m.source for m in moves}))
            if not ledger.may_send(sources):
                return  # its prefill instances are computing: retried when a chunk ends
            self.queue.pop()
            ledger.hold(sources, self.now())
            ledger.decode_begin(rid, instances, tuple(reserve))
            state.decode_ranks = dests
            state.summary.decode_instances = instances
            state.phase = Phase.DECODE
            task = asyncio.get_running_loop().create_task(
                self._move_in(state, sources, moves, dests, reserve))
            self._transfers.add(task)
            task.add_done_callback(self._transfers.discard)

    async def _move_in(self, state: EngineRequest, sources: tuple[int, ...],
                       moves: list[KVMove], dests: tuple[int, ...], reserve: list[int]) -> None:
        try:
            errors = await self.pool.move_kv(state.request_id, moves, dests, reserve,
                                             state.request.sampling, state.sampler_state)
        except Exception as err:
            errors = [err]
        self.ledger.unhold(sources)
        _, released = self.ledger.kv_moved(state.request_id)
        # The senders freed their KV; free it on every holder in case one failed first
        # (freeing twice is harmless), and on the decode side if the client left meanwhile.
        self.requests.free(released)
        self.requests.wake.set()
        if released.decode_instances or state.phase is Phase.DONE:
            return
        if errors:
            log.error("KV transfer of %r failed: %s", state.request_id, errors[0])
            if not self.on_fault(state, errors):
                self.requests.failed(state, f"KV transfer of {state.request_id!r} failed: "
                                     f"{errors[0]}")
            return
        if state.redo_pending:
            self.on_fault(state, ())  # its KV was on an instance lost meanwhile
            return
        if state.summary.prefilled_after_s is not None:
            self.metrics.observe_kv_handoff(time.monotonic() - state.arrival_wall
                                            - state.summary.prefilled_after_s)
        self._joined(state)

    def _joined(self, state: EngineRequest) -> None:
        """All of its KV is on its decode instances: it decodes from the next step on."""
        state.phase = Phase.DECODE
        self.active.append(state)
        self._work.set()

    # -- continuous batching ----------------------------------------------------------------
    # -- drains (elastic roles) ------------------------------------------------------------------
    def _start_moves(self) -> None:
        """Between steps: each active request on a draining instance moves to the open decode
        instance with the most room for its share there (none: it stays for now)."""
        ledger, p = self.ledger, self.pool.num_prefill
        for s in [s for s in self.active if any(r - p in self.draining
                                                for r in s.decode_ranks)]:
            e = ledger.decode.get(s.request_id)
            if e is None or e.decode is None or e.moving:
                continue
            old = next(r - p for r in s.decode_ranks if r - p in self.draining)
            share = e.decode[1][e.decode[0].index(old)]
            fits = [(ledger.decode_room(j, self.pool.decode_kv_tokens), -j) for j in
                    range(self.pool.num_decode) if j not in e.decode[0] and j not in
                    self.draining and not ledger.decode_off[j]
                    and ledger.decode_batch[j] < self.queue.max_batch]
            fits = [f for f in fits if f[0] >= share]
            if not fits:
                continue
            new = -max(fits)[1]
            i, n = ledger.decode_move(s.request_id, old, new)
            self.active.remove(s)
            task = asyncio.get_running_loop().create_task(self._move(s, i, old, new, n))
            self._transfers.add(task)
            task.add_done_callback(self._transfers.discard)

    async def _move(self, state: EngineRequest, i: int, old: int, new: int, n: int) -> None:
        p = self.pool.num_prefill
        try:
            errors = await self.pool.migrate_kv(state.request_id, p + old, p + new, n,
                                                state.request.sampling if i == 0 else None)
        except Exception as err:
            errors = [err]
        released = self.ledger.decode_moved(state.request_id, old, n)
        state.decode_ranks = tuple(p + new if r == p + old else r for r in state.decode_ranks)
        state.summary.decode_instances = tuple(r - p for r in state.decode_ranks)
        self.after_change()
        if released is not None or state.phase is Phase.DONE:
            self.requests.free(released)
            return
        if errors:
            log.error("KV move of %r off decode instance %d failed: %s", state.request_id, old,
                      errors[0])
            if not self.on_fault(state, errors):
                self.requests.failed(state, f"KV move of {state.request_id!r} failed: "
                                     f"{errors[0]}")
            return
        self.metrics.count_kv_migration()
        self._joined(state)

    async def run(self) -> None:
        while not self._stopped:
            if self.draining and not self.paused:
                self._start_moves()
            if self.active and not self.paused:
                await self._step()
                self.after_change()
            else:
                await self._work.wait()
                self._work.clear()

    async def _step(self) -> None:
        batch = list(self.active)
        by_rank: dict[int, list[DecodeEntry]] = {}
        for s in batch:
            entry = DecodeEntry(s.request_id, s.output[-1], s.prompt_tokens + len(s.output) - 1,
                                s.decode_ranks[0], s.decode_ranks)
            self.pool.ensure_group(entry.ranks)
            for r in entry.ranks:
                by_rank.setdefault(r, []).append(entry)
        started = time.monotonic()
        self.stepping = True
        try:
            result = await self.pool.decode_step(by_rank)
        finally:
            self.stepping = False
        now = time.monotonic()
        self._account(by_rank, now - started)
        for s in batch:
            if s.phase is not Phase.DECODE:
                continue  # it ended while the step ran (cancelled), or is being redone
            errors = [result.failed[r] for r in s.decode_ranks if r in result.failed]
            if errors or s.redo_pending:
                # Its step failed on some rank (the KV may be half-written): redo it.
                if errors:
                    log.error("decode step of %r failed: %s", s.request_id, errors[0])
                self.forget(s)
                if not self.on_fault(s, errors or ()):
                    self.requests.failed(s, f"decode of {s.request_id!r} failed: {errors[0]}")
                continue
            self.metrics.observe_inter_token(now - s.last_token_wall)
            finish = s.add_tokens([result.tokens[s.request_id]])
            if finish is not None:
                self.forget(s)
                self.requests.finished(s, finish)

    def _account(self, by_rank: dict[int, Any], seconds: float) -> None:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        for r in by_rank:
            j = r - self.pool.num_prefill
            self.busy_s[j] += seconds
            self.metrics.set_instance_busy(f"decode-{j}", "decode", self.busy_s[j] / elapsed)
