"""The engine's decode side: placement on decode instances, KV transfer, continuous batching.

Prefilled requests queue first-come first-served. The head is placed by the decode dispatcher
(`solver.dispatch.choose_decode_instances`, the simulator's): the least-loaded decode instance
with room for its whole KV (prompt plus every token it may generate), or, when none has room,
the fewest instances whose free room covers it (decode SP). Its KV then moves point to point
from the prefill ranks holding it (`kv_moves.plan_kv_moves`). Every step runs one token of every
decoding request: each decode actor gets the entries it leads or lends KV to, all at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from tetris.runtime.actors import WorkerPool
from tetris.runtime.batch_attend import DecodeEntry
from tetris.runtime.engine_api import FinishReason
from tetris.runtime.engine_request import EngineRequest, Phase
from tetris.runtime.kv_moves import KVMove, plan_kv_moves
from tetris.runtime.metrics import ServingMetrics
from tetris.solver.dispatch import DecodeLoad, choose_decode_instances
from tetris.solver.plan import ChunkSpec

log = logging.getLogger(__name__)


class PrefillSide(Protocol):
    """What the decode side needs of the engine's prefill side."""

    def try_hold(self, instances: Sequence[int]) -> bool: ...

    def release(self, instances: Sequence[int]) -> None: ...

    def prefill_kv_moved(self, state: EngineRequest, free_remote: bool) -> None: ...


class DecodeRunner:
    def __init__(self, pool: WorkerPool, max_batch: int, max_sp: int,
                 metrics: ServingMetrics, prefill: PrefillSide) -> None:
        self.pool, self.max_batch, self.metrics = pool, max_batch, metrics
        self.prefill = prefill
        self.max_sp = max(1, min(max_sp, len(pool.decode)))
        self.queue: list[EngineRequest] = []
        self.active: list[EngineRequest] = []
        self.reserved = [0] * len(pool.decode)
        self.batch = [0] * len(pool.decode)
        self.reserve_of: dict[str, list[int]] = {}
        self.busy_s = [0.0] * len(pool.decode)
        self.t0 = time.monotonic()
        self._wake = asyncio.Event()
        self._stopped = False

    @property
    def num_requests(self) -> int:
        return len(self.queue) + len(self.active)

    def has(self, request_id: str) -> bool:
        return any(s.request_id == request_id for s in (*self.queue, *self.active))

    def kv_needed(self, prompt: int, max_tokens: int) -> int:
        # The last generated token's KV is never computed.
        return prompt + max_tokens - 1

    def submit(self, state: EngineRequest) -> None:
        self.queue.append(state)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    # -- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        while not self._stopped:
            if self.queue:
                await self._admit()
            if self.active:
                await self._step()
            else:
                await self._wake.wait()
                self._wake.clear()

    async def _admit(self) -> None:
        while self.queue:
            state = self.queue[0]
            need = self.kv_needed(state.prompt_tokens, state.request.sampling.max_tokens)
            loads = [DecodeLoad(r, b) for r, b in zip(self.reserved, self.batch, strict=True)]
            placement = choose_decode_instances(loads, need, self.pool.decode_kv_tokens,
                                                self.max_batch, self.max_sp)
            if placement is None:
                return  # first come first served: wait for room to free up
            # The lead keeps the generated tokens: the instance with the most room leads.
            instances = sorted(placement.instances, key=lambda j: (self.reserved[j], j))
            held = {g: sum(ChunkSpec(c.start_token, c.end_token, c.instances).tokens_on(g)
                           for c in state.summary.chunks)
                    for g in state.kv_instances}
            p = self.pool.num_prefill
            dests = tuple(p + j for j in instances)
            rooms = [self.pool.decode_kv_tokens - self.reserved[j] for j in instances]
            try:
                moves, reserve = plan_kv_moves(held, dests, rooms,
                                               state.request.sampling.max_tokens - 1)
            except ValueError:
                return  # the lead lacks room for the generated tokens yet: wait
            sources = tuple(sorted({m.source for m in moves}))
            if not self.prefill.try_hold(sources):
                return  # its prefill instances are computing: retried when a chunk ends
            self.queue.pop(0)
            await self._move_in(state, tuple(instances), sources, moves, reserve)

    async def _move_in(self, state: EngineRequest, instances: tuple[int, ...],
                       sources: tuple[int, ...], moves: list[KVMove],
                       reserve: list[int]) -> None:
        for j, n in zip(instances, reserve, strict=True):
            self.reserved[j] += n
            self.batch[j] += 1
        self.reserve_of[state.request_id] = reserve
        dests = tuple(self.pool.num_prefill + j for j in instances)
        state.decode_ranks = dests
        state.summary.decode_instances = instances
        state.phase = Phase.DECODE
        self.active.append(state)
        sends = [self.pool.prefill[g].send_kv.remote(state.request_id, moves) for g in sources]
        recvs = [self.pool.actor(d).recv_kv.remote(
            state.request_id, moves, n, *((state.request.sampling, state.sampler_state)
                                          if i == 0 else ()))
            for i, (d, n) in enumerate(zip(dests, reserve, strict=True))]
        results = await asyncio.gather(*sends, *recvs, return_exceptions=True)
        self.prefill.release(sources)
        # send_kv freed the prefill KV of the sources; free it everywhere in case a sender
        # failed first (freeing twice is harmless).
        self.prefill.prefill_kv_moved(state, free_remote=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            log.error("KV transfer of %r failed: %s", state.request_id, errors[0])
            self._release(state)
            state.fail(f"KV transfer of {state.request_id!r} failed: {errors[0]}")

    async def _step(self) -> None:
        batch = [s for s in self.active if not s.cancelled]
        entries = [DecodeEntry(s.request_id, s.output[-1], s.prompt_tokens + len(s.output) - 1,
                               s.decode_ranks[0], s.decode_ranks) for s in batch]
        by_rank: dict[int, list[DecodeEntry]] = {}
        for e in entries:
            self.pool.ensure_group(e.ranks)
            for r in e.ranks:
                by_rank.setdefault(r, []).append(e)
        started = time.monotonic()
        try:
            answers = await asyncio.gather(*(self.pool.actor(r).decode_step.remote(es)
                                             for r, es in by_rank.items()))
        except Exception as err:
            log.exception("decode step failed")
            for s in batch:
                self._release(s)
                s.fail(f"decode of {s.request_id!r} failed: {err}")
            return
        seconds = time.monotonic() - started
        for r in by_rank:
            j = r - self.pool.num_prefill
            self.busy_s[j] += seconds
            self.metrics.set_instance_busy(f"decode-{j}", "decode",
                                           self.busy_s[j] / max(time.monotonic() - self.t0,
                                                                1e-9))
        tokens: dict[str, int] = {}
        for answer in answers:
            tokens.update(answer)
        now = time.monotonic()
        for s in batch:
            if s.cancelled or s.phase is not Phase.DECODE:
                continue
            self.metrics.observe_inter_token(now - s.last_token_wall)
            finish = s.add_tokens([tokens[s.request_id]])
            if finish is not None:
                self._release(s)
                s.phase = Phase.DONE
                self.finished(s, finish)

    # -- endings ----------------------------------------------------------------------------
    def _release(self, state: EngineRequest) -> None:
        if state in self.active:
            self.active.remove(state)
        reserve = self.reserve_of.pop(state.request_id, None)
        if reserve is not None:
            for d, n in zip(state.decode_ranks, reserve, strict=True):
                j = d - self.pool.num_prefill
                self.reserved[j] -= n
                self.batch[j] -= 1
                self.pool.actor(d).free.remote(state.request_id)
        self._wake.set()

    def finished(self, state: EngineRequest, reason: FinishReason) -> None:
        self.metrics.observe_e2e(time.monotonic() - state.arrival_wall)
        self.metrics.count_tokens(state.prompt_tokens, len(state.output))
        self.metrics.request_finished(reason)

    def cancel(self, state: EngineRequest) -> None:
        if state in self.queue:
            self.queue.remove(state)
            self.prefill.prefill_kv_moved(state, free_remote=True)
        else:
            self._release(state)
