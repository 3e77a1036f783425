"""`InstancePool` over Ray actors: the engine's calls, as awaitable actor calls.

`actors.WorkerPool` starts the actors and owns their process groups; this is what the engine
calls on them. Every call is made from the engine's event-loop thread, so Ray runs each actor's
calls in the order they were made.

Loss: Ray fails every call to an actor whose process died (`RayActorError`); each is turned into
`InstanceLost(rank)`. An idle actor's death is seen by `probe`: every actor always has one
`ping` outstanding, which Ray fails when the actor dies, even if the actor was busy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from tetris.runtime.actors import KV_GROUP, SETUP_TIMEOUT_S, WorkerPool
from tetris.runtime.batch_attend import DecodeEntry
from tetris.runtime.instance_pool import InstanceLost, PrefillResult, StepResult
from tetris.runtime.kv_moves import KVBatch, KVMove
from tetris.runtime.sampling import SamplingParams
from tetris.solver.plan import ChunkSpec


class RayInstances:
    def __init__(self, ray: Any, workers: WorkerPool) -> None:
        self.ray, self.workers = ray, workers
        self._pings: dict[int, Any] = {}
        self._lost: set[int] = set()

    @property
    def num_prefill(self) -> int:
        return self.workers.num_prefill

    @property
    def num_decode(self) -> int:
        return len(self.workers.decode)

    @property
    def prefill_kv_tokens(self) -> int:
        return self.workers.prefill_kv_tokens

    @property
    def decode_kv_tokens(self) -> int:
        return self.workers.decode_kv_tokens

    def ensure_group(self, ranks: tuple[int, ...]) -> None:
        self.workers.ensure_group(ranks)

    def can_group(self, ranks: tuple[int, ...]) -> bool:
        return self.workers.can_group(ranks)

    # -- loss and replacement -----------------------------------------------------------------
    def _translate(self, rank: int, result: Any) -> Any:
        if isinstance(result, self.ray.exceptions.RayActorError):
            self._mark_lost(rank)
            return InstanceLost(rank, type(result).__name__)
        return result

    def _mark_lost(self, rank: int) -> None:
        self._lost.add(rank)
        self._pings.pop(rank, None)
        self.workers.lost()

    def probe(self) -> list[int]:
        ray = self.ray
        for rank, actor in enumerate(self.workers.all):
            if rank not in self._lost and rank not in self._pings:
                self._pings[rank] = actor.ping.remote()
        refs = list(self._pings.values())
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        found = []
        for rank, ref in list(self._pings.items()):
            if ref not in done:
                continue
            del self._pings[rank]
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.RayActorError:
                self._mark_lost(rank)
                found.append(rank)
        return found

    async def replace(self, ranks: Sequence[int]) -> None:
        loads = [self.workers.replace(self.ray, r) for r in ranks]
        await asyncio.wait_for(asyncio.gather(*loads), SETUP_TIMEOUT_S)

    async def reform(self) -> None:
        w = self.workers
        address, port = await asyncio.wait_for(w.actor(0).rendezvous.remote(w.local),
                                               SETUP_TIMEOUT_S)
        await asyncio.wait_for(asyncio.gather(*w.reform(address, port)), SETUP_TIMEOUT_S)
        w.world_intact = True
        self._lost.clear()
        self._pings.clear()

    # -- work ---------------------------------------------------------------------------------
    async def prefill(self, request_id: str, chunk: ChunkSpec, chunk_ids: Sequence[int],
                      sampling: SamplingParams | None) -> list[PrefillResult | BaseException]:
        ids = list(chunk_ids)
        results = await asyncio.gather(*(
            self.workers.actor(g).prefill.remote(request_id, chunk, ids, sampling)
            for g in chunk.instances), return_exceptions=True)
        return [self._translate(g, r) for g, r in zip(chunk.instances, results, strict=True)]

    async def move_kv(self, request_id: str, moves: Sequence[KVMove], dests: Sequence[int],
                      reserve: Sequence[int], sampling: SamplingParams,
                      sampler_state: Any) -> list[BaseException]:
        sources = sorted({m.source for m in moves})
        moves = list(moves)
        sends = [self.workers.actor(g).send_kv.remote(request_id, moves) for g in sources]
        recvs = [self.workers.actor(d).recv_kv.remote(
            request_id, moves, n, *((sampling, sampler_state) if i == 0 else ()))
            for i, (d, n) in enumerate(zip(dests, reserve, strict=True))]
        results = await asyncio.gather(*sends, *recvs, return_exceptions=True)
        ranks = [*sources, *dests]
        return [self._translate(r, x) for r, x in zip(ranks, results, strict=True)
                if isinstance(x, BaseException)]

    async def stream_kv(self, request_id: str, batch: KVBatch, lead: int,
                        sampling: SamplingParams | None = None,
                        sampler_state: Any = None) -> list[BaseException]:
        moves = list(batch.moves)
        sources = sorted(batch.starts)
        receivers = sorted({*batch.receivers, *((lead,) if sampling is not None else ())})

        def kv(rank: int, method: str) -> Any:
            return getattr(self.workers.actor(rank), method).options(concurrency_group=KV_GROUP)

        sends = [kv(g, "send_kv").remote(request_id, moves, batch.starts[g], True)
                 for g in sources]
        recvs = [kv(d, "recv_kv").remote(
            request_id, moves, batch.reserve.get(d, 0),
            *((sampling, sampler_state) if d == lead and sampling is not None else (None, None)),
            True) for d in receivers]
        results = await asyncio.gather(*sends, *recvs, return_exceptions=True)
        return [self._translate(r, x) for r, x in zip([*sources, *receivers], results,
                                                      strict=True)
                if isinstance(x, BaseException)]

    async def decode_step(self, entries_by_rank: Mapping[int, Sequence[DecodeEntry]]
                          ) -> StepResult:
        ranks = list(entries_by_rank)
        answers = await asyncio.gather(*(self.workers.actor(r).decode_step.remote(
            list(entries_by_rank[r])) for r in ranks), return_exceptions=True)
        tokens: dict[str, int] = {}
        failed: dict[int, BaseException] = {}
        for r, answer in zip(ranks, answers, strict=True):
            if isinstance(answer, BaseException):
                failed[r] = self._translate(r, answer)
            else:
                tokens.update(answer)
        return StepResult(tokens, failed)

    def free(self, request_id: str, ranks: Sequence[int]) -> None:
        for r in ranks:
            if r not in self._lost:
                self.workers.actor(r).free.remote(request_id)
