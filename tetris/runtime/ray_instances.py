"""`InstancePool` over Ray actors: the engine's calls, as awaitable actor calls.

`actors.WorkerPool` starts the actors and owns their process groups; this is what the engine
calls on them. Every call is made from the engine's event-loop thread, so Ray runs each actor's
calls in the order they were made.

Loss: Ray fails every call to an actor whose process died (`RayActorError`); each is turned into
`InstanceLost(rank)`. An idle actor's death is seen by `probe`: every actor always has one
`ping` outstanding, which Ray fails when the actor dies, even if the actor was busy.

Elastic roles (`WorkerPool.elastic`): the engine's ranks stay prefill g and decode P + j, and
both name actor g (resp. j); the actor keeps each role's KV of a request under its own key
(`kv_key`), so freeing one role's KV never touches the other's, and a hand-off from a GPU's
prefill role to its own decode role is a copy inside its cache (`InstanceWorker.send_kv`).
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
    def elastic(self) -> bool:
        return self.workers.elastic

    def _phys(self, rank: int) -> int:
        """The world rank of the actor serving engine rank `rank`."""
        return rank % self.num_prefill if self.workers.elastic else rank

    def kv_key(self, request_id: str, rank: int) -> str:
        """The name of the request's KV on engine rank `rank`'s actor."""
        if not self.workers.elastic:
            return request_id
        return ("d:" if rank >= self.num_prefill else "p:") + request_id

    def _moves(self, moves: Sequence[KVMove]) -> list[KVMove]:
        return sorted((KVMove(self._phys(m.source), self._phys(m.dest), m.tokens)
                       for m in moves), key=lambda m: (m.source, m.dest))

    def _home(self, rank: int, request_id: str) -> str:
        """The key of the request's KV on the other role of `rank`'s GPU."""
        p = self.num_prefill
        return self.kv_key(request_id, rank + p if rank < p else rank - p)

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
        self.workers.ensure_group(tuple(self._phys(r) for r in ranks))

    def can_group(self, ranks: tuple[int, ...]) -> bool:
        return self.workers.can_group(tuple(self._phys(r) for r in ranks))

    # -- loss and replacement -----------------------------------------------------------------
    def _translate(self, rank: int, result: Any) -> Any:
        """`result` of a call on engine rank `rank`: a dead actor's error as InstanceLost."""
        if isinstance(result, self.ray.exceptions.RayActorError):
            self._mark_lost(self._phys(rank))
            return InstanceLost(rank, type(result).__name__)
        return result

    def _mark_lost(self, rank: int) -> None:
        """World rank `rank`'s actor is gone."""
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
                # Elastic: the GPU's two roles are lost together.
                found += [rank, rank + self.num_prefill] if self.workers.elastic else [rank]
        return found

    async def replace(self, ranks: Sequence[int]) -> None:
        loads = [self.workers.replace(self.ray, r)
                 for r in dict.fromkeys(self._phys(r) for r in ranks)]
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
            self.workers.actor(g).prefill.remote(self.kv_key(request_id, g), chunk, ids,
                                                 sampling)
            for g in chunk.instances), return_exceptions=True)
        return [self._translate(g, r) for g, r in zip(chunk.instances, results, strict=True)]

    async def move_kv(self, request_id: str, moves: Sequence[KVMove], dests: Sequence[int],
                      reserve: Sequence[int], sampling: SamplingParams | None,
                      sampler_state: Any) -> list[BaseException]:
        sources = sorted({m.source for m in moves})
        world = self._moves(moves)
        # Every send before every receive: an actor that is both (elastic) copies its own
        # share in `send_kv` first (its room taken there), and `recv_kv` takes the rest.
        sends = [self.workers.actor(g).send_kv.remote(
            self.kv_key(request_id, g), world, 0, False, self._home(g, request_id))
            for g in sources]
        recvs = [self.workers.actor(d).recv_kv.remote(
            self.kv_key(request_id, d), world, n,
            *((sampling, sampler_state) if i == 0 and sampling is not None else ()))
            for i, (d, n) in enumerate(zip(dests, reserve, strict=True))]
        results = await asyncio.gather(*sends, *recvs, return_exceptions=True)
        ranks = [*sources, *dests]
        return [self._translate(r, x) for r, x in zip(ranks, results, strict=True)
                if isinstance(x, BaseException)]

    async def migrate_kv(self, request_id: str, source: int, dest: int, reserve: int,
                         sampling: SamplingParams | None) -> list[BaseException]:
        try:
            tokens, state = await self.workers.actor(source).kv_held.remote(
                self.kv_key(request_id, source))
        except Exception as err:
            return [self._translate(source, err)]
        moves = [KVMove(source, dest, tokens)]
        lead = sampling is not None
        if lead and state is None:
            return [RuntimeError(f"rank {source} does not lead the decode of {request_id!r}")]
        return await self.move_kv(request_id, moves, (dest,), (reserve,), sampling, state)

    async def stream_kv(self, request_id: str, batch: KVBatch, lead: int,
                        sampling: SamplingParams | None = None,
                        sampler_state: Any = None) -> list[BaseException]:
        moves = self._moves(batch.moves)
        if any(m.source == m.dest for m in moves):
            # A GPU parks its prefill role only once no request still prefilling holds KV
            # on it (`Ledger.may_park`), so a streamed source is never a decode destination.
            raise ValueError(f"streamed KV of {request_id!r} to its own GPU: {moves}")
        sources = sorted(batch.starts)
        receivers = sorted({*batch.receivers, *((lead,) if sampling is not None else ())})

        def kv(rank: int, method: str) -> Any:
            return getattr(self.workers.actor(rank),
                           method).options(concurrency_group=KV_GROUP)

        sends = [kv(g, "send_kv").remote(self.kv_key(request_id, g), moves,
                                         batch.starts[g], True) for g in sources]
        recvs = [kv(d, "recv_kv").remote(
            self.kv_key(request_id, d), moves, batch.reserve.get(d, 0),
            *((sampling, sampler_state) if d == lead and sampling is not None else (None, None)),
            True) for d in receivers]
        results = await asyncio.gather(*sends, *recvs, return_exceptions=True)
        return [self._translate(r, x) for r, x in zip([*sources, *receivers], results,
                                                      strict=True)
                if isinstance(x, BaseException)]

    async def decode_step(self, entries_by_rank: Mapping[int, Sequence[DecodeEntry]]
                          ) -> StepResult:
        ranks = list(entries_by_rank)
        if self.workers.elastic:
            p = self.num_prefill
            keys = {self.kv_key(e.request_id, e.lead): e.request_id
                    for es in entries_by_rank.values() for e in es}
            calls = {r: [DecodeEntry(self.kv_key(e.request_id, e.lead), e.token_id,
                                     e.position, e.lead - p, tuple(x - p for x in e.ranks))
                         for e in entries_by_rank[r]] for r in ranks}
        else:
            keys, calls = {}, {r: list(entries_by_rank[r]) for r in ranks}
        answers = await asyncio.gather(*(self.workers.actor(r).decode_step.remote(calls[r])
                                         for r in ranks), return_exceptions=True)
        tokens: dict[str, int] = {}
        failed: dict[int, BaseException] = {}
        for r, answer in zip(ranks, answers, strict=True):
            if isinstance(answer, BaseException):
                failed[r] = self._translate(r, answer)
            else:
                tokens.update({keys.get(k, k): t for k, t in answer.items()})
        return StepResult(tokens, failed)

    def free(self, request_id: str, ranks: Sequence[int]) -> None:
        for r in ranks:
            if self._phys(r) not in self._lost:
                self.workers.actor(r).free.remote(self.kv_key(request_id, r))
