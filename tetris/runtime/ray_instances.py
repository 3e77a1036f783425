"""`InstancePool` over Ray actors: the engine's calls, as awaitable actor calls.

`actors.WorkerPool` starts the actors and owns their process groups; this is what the engine
calls on them. Every call is made from the engine's event-loop thread, so Ray runs each actor's
calls in the order they were made.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from tetris.runtime.actors import WorkerPool
from tetris.runtime.batch_attend import DecodeEntry
from tetris.runtime.instance_pool import PrefillResult
from tetris.runtime.kv_moves import KVMove
from tetris.runtime.sampling import SamplingParams
from tetris.solver.plan import ChunkSpec


class RayInstances:
    def __init__(self, workers: WorkerPool) -> None:
        self.workers = workers

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

    async def prefill(self, request_id: str, chunk: ChunkSpec, chunk_ids: Sequence[int],
                      sampling: SamplingParams | None) -> list[PrefillResult | BaseException]:
        ids = list(chunk_ids)
        results: list[PrefillResult | BaseException] = await asyncio.gather(*(
            self.workers.actor(g).prefill.remote(request_id, chunk, ids, sampling)
            for g in chunk.instances), return_exceptions=True)
        return results

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
        return [r for r in results if isinstance(r, BaseException)]

    async def decode_step(self, entries_by_rank: Mapping[int, Sequence[DecodeEntry]]
                          ) -> dict[str, int]:
        answers = await asyncio.gather(*(self.workers.actor(r).decode_step.remote(list(es))
                                         for r, es in entries_by_rank.items()))
        tokens: dict[str, int] = {}
        for answer in answers:
            tokens.update(answer)
        return tokens

    def free(self, request_id: str, ranks: Sequence[int]) -> None:
        for r in ranks:
            self.workers.actor(r).free.remote(request_id)
