"""A stand-in `InstancePool` for engine tests: no Ray, no model, KV kept as token counts.

Prefill keeps each rank's share of a chunk (the zigzag split the real workers use), the rank
holding the prompt's last token answers with the first token, KV transfers move the counts to
the decode ranks (which reserve what the engine asks; a streamed batch leaves the sources' counts
until the engine frees them), and a decode step makes every led request one token. The token
produced after position p is `token_after(p)`, so a stream that repeats or skips a token shows
it. Each call waits its configured delay. `calls` records each call as it starts, and
"prefilled"/"streamed" as a chunk or streamed batch ends.

Faults, as the real pool reports them: a prefill of a request named in `fail_prefill` raises on
its last rank (a live rank failing); `kill(rank)` ends an instance (its KV gone, every call on
it InstanceLost, its peers in a call with it fail, `probe` reports it); `kill_in_prefill` /
`kill_in_decode` kill a rank in the middle of a request's chunk or of its n-th decode step.
`replace` and `reform` bring lost ranks back empty.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tetris.runtime.batch_attend import DecodeEntry
from tetris.runtime.instance_pool import InstanceLost, PrefillResult, StepResult
from tetris.runtime.kv_moves import KVBatch, KVMove
from tetris.runtime.sampling import SamplingParams
from tetris.solver.plan import ChunkSpec


def token_after(position: int) -> int:
    """The fake model's next token after `position`: A..Z in turn, never EOS."""
    return 65 + (position + 1) % 26


@dataclass
class FakePool:
    num_prefill: int = 2
    num_decode: int = 1
    elastic: bool = False
    prefill_kv_tokens: int = 4096
    decode_kv_tokens: int = 4096
    prefill_delay_s: float = 0.01
    transfer_delay_s: float = 0.01
    step_delay_s: float = 0.005
    fail_prefill: set[str] = field(default_factory=set)
    kill_in_prefill: dict[str, int] = field(default_factory=dict)  # request -> rank to kill
    kill_in_decode: dict[int, int] = field(default_factory=dict)  # rank -> steps before
    kv: dict[int, dict[str, int]] = field(default_factory=dict)  # rank -> request -> tokens
    groups: set[tuple[int, ...]] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)
    dead: set[int] = field(default_factory=set)
    world_intact: bool = True
    reforms: int = 0
    _unreported: list[int] = field(default_factory=list)
    _steps: dict[int, int] = field(default_factory=dict)
    _reforming: bool = False

    def __post_init__(self) -> None:
        self.kv = {r: {} for r in range(self.num_prefill + self.num_decode)}

    def held(self) -> int:
        return sum(n for per in self.kv.values() for n in per.values())

    def ensure_group(self, ranks: tuple[int, ...]) -> None:
        assert self.can_group(ranks), f"group {ranks} made while the world is broken"
        self.groups.add(ranks)

    # -- faults -------------------------------------------------------------------------------
    def kill(self, rank: int) -> None:
        if rank not in self.dead:
            self.dead.add(rank)
            self._unreported.append(rank)
            self.kv[rank].clear()
            self.world_intact = False

    def can_group(self, ranks: tuple[int, ...]) -> bool:
        return len(ranks) == 1 or self.world_intact or ranks in self.groups

    def probe(self) -> list[int]:
        found, self._unreported = self._unreported, []
        return found

    async def replace(self, ranks: Sequence[int]) -> None:
        self.calls.append(f"replace {list(ranks)}")
        await asyncio.sleep(self.prefill_delay_s)
        for r in ranks:
            assert not self.kv[r], f"rank {r} replaced holding KV"
            self.dead.discard(r)

    async def reform(self) -> None:
        assert not self.dead, f"reform with ranks {self.dead} still dead"
        self.calls.append("reform")
        self._reforming = True  # any call made meanwhile fails its assertion
        await asyncio.sleep(self.step_delay_s * 4)
        self._reforming = False
        self.groups.clear()
        self.world_intact = True
        self.reforms += 1

    def _fault(self, rank: int, peers: Sequence[int]) -> BaseException | None:
        if rank in self.dead:
            if rank in self._unreported:  # a call saw it first, as Ray's would
                self._unreported.remove(rank)
            return InstanceLost(rank)
        if any(p in self.dead for p in peers):
            return RuntimeError(f"rank {rank}: a peer's connection closed")
        return None

    # -- work ---------------------------------------------------------------------------------
    async def prefill(self, request_id: str, chunk: ChunkSpec, chunk_ids: Sequence[int],
                      sampling: SamplingParams | None) -> list[PrefillResult | BaseException]:
        self.calls.append(f"prefill {request_id} [{chunk.start_token},{chunk.end_token}) "
                          f"{chunk.instances}")
        assert not self._reforming, "work sent while the data plane is re-formed"
        assert len(chunk_ids) == chunk.tokens
        assert chunk.sp == 1 or chunk.instances in self.groups
        await asyncio.sleep(self.prefill_delay_s / 2)
        victim = self.kill_in_prefill.get(request_id)
        if victim in chunk.instances:
            del self.kill_in_prefill[request_id]
            self.kill(victim)
        await asyncio.sleep(self.prefill_delay_s / 2)
        out: list[PrefillResult | BaseException] = []
        for i, g in enumerate(chunk.instances):
            fault = self._fault(g, chunk.instances)
            if fault is not None:
                out.append(fault)
                continue
            share = chunk.tokens_on(g)
            if share > self.prefill_kv_tokens - sum(self.kv[g].values()):
                out.append(MemoryError(f"rank {g}: no KV room for {share} tokens"))
                continue
            if request_id in self.fail_prefill and i == chunk.sp - 1:
                out.append(RuntimeError(f"rank {g} raised"))
                continue
            self.kv[g][request_id] = self.kv[g].get(request_id, 0) + share
            has_last = any(a <= chunk.end_token - 1 < b for a, b in chunk.piece_bounds(i))
            first = token_after(chunk.end_token - 1) if sampling is not None and has_last \
                else None
            out.append(PrefillResult(self.prefill_delay_s, first, "sampler" if first else None))
        self.calls.append(f"prefilled {request_id} [{chunk.start_token},{chunk.end_token})")
        return out

    async def stream_kv(self, request_id: str, batch: KVBatch, lead: int,
                        sampling: SamplingParams | None = None,
                        sampler_state: Any = None) -> list[BaseException]:
        self.calls.append(f"stream {request_id} {sum(m.tokens for m in batch.moves)}"
                          f"{' +sampler' if sampling is not None else ''}")
        assert not self._reforming, "work sent while the data plane is re-formed"
        assert sampling is None or sampler_state == "sampler"
        await asyncio.sleep(self.transfer_delay_s)
        ranks = sorted({*batch.starts, *batch.receivers, lead})
        errors = [f for r in ranks if (f := self._fault(r, ranks)) is not None]
        if errors:
            return errors
        for g, start in batch.starts.items():
            sent = sum(m.tokens for m in batch.moves if m.source == g)
            assert self.kv[g].get(request_id, 0) >= start + sent, (g, start, sent)
        for d, n in batch.reserve.items():
            self.kv[d][request_id] = self.kv[d].get(request_id, 0) + n
        for d in {m.dest for m in batch.moves} | ({lead} if sampling is not None else set()):
            assert request_id in self.kv[d], f"rank {d} receives {request_id} with no room"
        self.calls.append(f"streamed {request_id}")
        return []

    async def move_kv(self, request_id: str, moves: Sequence[KVMove], dests: Sequence[int],
                      reserve: Sequence[int], sampling: SamplingParams | None,
                      sampler_state: Any) -> list[BaseException]:
        self.calls.append(f"move {request_id}")
        assert not self._reforming, "work sent while the data plane is re-formed"
        assert sampler_state == "sampler"
        await asyncio.sleep(self.transfer_delay_s)
        ranks = sorted({m.source for m in moves} | set(dests))
        errors = [f for r in ranks if (f := self._fault(r, ranks)) is not None]
        if errors:
            return errors
        for m in moves:
            assert self.kv[m.source].get(request_id, 0) >= m.tokens
        for g in {m.source for m in moves}:
            self.kv[g].pop(request_id, None)
        for d, n in zip(dests, reserve, strict=True):
            self.kv[d][request_id] = n
        return []

    async def migrate_kv(self, request_id: str, source: int, dest: int, reserve: int,
                         sampling: SamplingParams | None) -> list[BaseException]:
        self.calls.append(f"migrate {request_id} {source}->{dest}")
        assert not self._reforming, "work sent while the data plane is re-formed"
        await asyncio.sleep(self.transfer_delay_s)
        errors = [f for r in (source, dest) if (f := self._fault(r, (source, dest))) is not None]
        if errors:
            return errors
        assert request_id in self.kv[source] and request_id not in self.kv[dest]
        self.kv[source].pop(request_id)
        self.kv[dest][request_id] = reserve
        return []

    async def decode_step(self, entries_by_rank: Mapping[int, Sequence[DecodeEntry]]
                          ) -> StepResult:
        assert not self._reforming, "work sent while the data plane is re-formed"
        await asyncio.sleep(self.step_delay_s / 2)
        for rank in entries_by_rank:
            if rank in self.kill_in_decode:
                self._steps[rank] = self._steps.get(rank, 0) + 1
                if self._steps[rank] > self.kill_in_decode[rank]:
                    del self.kill_in_decode[rank]
                    self.kill(rank)
        await asyncio.sleep(self.step_delay_s / 2)
        tokens, failed = {}, {}
        for rank, entries in entries_by_rank.items():
            peers = sorted({r for e in entries for r in e.ranks})
            fault = self._fault(rank, peers)
            if fault is not None:
                failed[rank] = fault
                continue
            for e in entries:
                assert e.request_id in self.kv[rank], (rank, e.request_id)
                if e.lead == rank:
                    tokens[e.request_id] = token_after(e.position)
        return StepResult(tokens, failed)

    def free(self, request_id: str, ranks: Sequence[int]) -> None:
        for r in ranks:
            self.kv[r].pop(request_id, None)


class FakeTokenizer:
    """One character per token (code point); token 2 is EOS."""

    eos_ids = frozenset({2})

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.encode("".join(m["content"] for m in messages))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids if i not in self.eos_ids)
