"""A stand-in `InstancePool` for engine tests: no Ray, no model, KV kept as token counts.

Prefill keeps each rank's share of a chunk (the zigzag split the real workers use), the rank
holding the prompt's last token answers with the first token, KV transfers move the counts to
the decode ranks (which reserve what the engine asks), and a decode step makes every led request
one token (`NEXT_TOKEN`, never EOS). Each call waits its configured delay; a prefill of a request
named in `fail_prefill` raises on its last rank, as a dying worker would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tetris.runtime.batch_attend import DecodeEntry
from tetris.runtime.instance_pool import PrefillResult
from tetris.runtime.kv_moves import KVMove
from tetris.runtime.sampling import SamplingParams
from tetris.solver.plan import ChunkSpec

NEXT_TOKEN = 65  # "A" to the fake tokenizer


@dataclass
class FakePool:
    num_prefill: int = 2
    num_decode: int = 1
    prefill_kv_tokens: int = 4096
    decode_kv_tokens: int = 4096
    prefill_delay_s: float = 0.01
    transfer_delay_s: float = 0.01
    step_delay_s: float = 0.005
    fail_prefill: set[str] = field(default_factory=set)
    kv: dict[int, dict[str, int]] = field(default_factory=dict)  # rank -> request -> tokens
    groups: set[tuple[int, ...]] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.kv = {r: {} for r in range(self.num_prefill + self.num_decode)}

    def held(self) -> int:
        return sum(n for per in self.kv.values() for n in per.values())

    def ensure_group(self, ranks: tuple[int, ...]) -> None:
        self.groups.add(ranks)

    async def prefill(self, request_id: str, chunk: ChunkSpec, chunk_ids: Sequence[int],
                      sampling: SamplingParams | None) -> list[PrefillResult | BaseException]:
        self.calls.append(f"prefill {request_id} [{chunk.start_token},{chunk.end_token}) "
                          f"{chunk.instances}")
        assert len(chunk_ids) == chunk.tokens
        assert chunk.sp == 1 or chunk.instances in self.groups
        await asyncio.sleep(self.prefill_delay_s)
        out: list[PrefillResult | BaseException] = []
        for i, g in enumerate(chunk.instances):
            share = chunk.tokens_on(g)
            if share > self.prefill_kv_tokens - sum(self.kv[g].values()):
                out.append(MemoryError(f"rank {g}: no KV room for {share} tokens"))
                continue
            if request_id in self.fail_prefill and i == chunk.sp - 1:
                out.append(RuntimeError(f"rank {g} died"))
                continue
            self.kv[g][request_id] = self.kv[g].get(request_id, 0) + share
            has_last = any(a <= chunk.end_token - 1 < b for a, b in chunk.piece_bounds(i))
            first = NEXT_TOKEN if sampling is not None and has_last else None
            out.append(PrefillResult(self.prefill_delay_s, first, "sampler" if first else None))
        return out

    async def move_kv(self, request_id: str, moves: Sequence[KVMove], dests: Sequence[int],
                      reserve: Sequence[int], sampling: SamplingParams,
                      sampler_state: Any) -> list[BaseException]:
        self.calls.append(f"move {request_id}")
        assert sampler_state == "sampler"
        await asyncio.sleep(self.transfer_delay_s)
        for m in moves:
            assert self.kv[m.source].get(request_id, 0) >= m.tokens
        for g in {m.source for m in moves}:
            self.kv[g].pop(request_id, None)
        for d, n in zip(dests, reserve, strict=True):
            self.kv[d][request_id] = n
        return []

    async def decode_step(self, entries_by_rank: Mapping[int, Sequence[DecodeEntry]]
                          ) -> dict[str, int]:
        await asyncio.sleep(self.step_delay_s)
        tokens = {}
        for rank, entries in entries_by_rank.items():
            for e in entries:
                assert e.request_id in self.kv[rank], (rank, e.request_id)
                if e.lead == rank:
                    tokens[e.request_id] = NEXT_TOKEN
        return tokens

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
