"""What the engine needs of its instances: the `InstancePool` protocol.

`actors.WorkerPool` implements it with one Ray actor per instance (a model replica and its KV
cache each); tests implement it without Ray or a model. Ranks: prefill instance g is rank g,
decode instance j is rank `num_prefill + j`. Calls on one rank run in the order they were made
(the engine makes every call from its one event-loop thread), so a `free` made after a chunk,
a transfer or a step runs after it. `elastic`: prefill instance g and decode instance g are one
GPU's two roles (rank g and rank `num_prefill + g`, one actor, one KV memory).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tetris.runtime.batch_attend import DecodeEntry
from tetris.runtime.kv_moves import KVBatch, KVMove
from tetris.runtime.sampling import SamplingParams
from tetris.solver.plan import ChunkSpec


@dataclass(frozen=True)
class PrefillResult:
    seconds: float
    # Only on the rank that computed the prompt's last token, after the last chunk:
    first_token: int | None = None
    sampler_state: Any = None  # the sampler's generator state, handed to the decode lead
    logits: Any = None  # [vocab] tensor, when asked for (checks against a reference model)


class InstanceLost(RuntimeError):
    """The instance's process is gone (killed, out of memory, its node lost): what it held
    is lost and it takes no calls until replaced."""

    def __init__(self, rank: int, why: str = "") -> None:
        super().__init__(f"instance rank {rank} is lost{': ' + why if why else ''}")
        self.rank = rank


@dataclass(frozen=True)
class StepResult:
    """A decode step: each request's new token from the ranks that answered, and the ranks
    whose call failed (InstanceLost when the rank's process is gone)."""

    tokens: dict[str, int]
    failed: dict[int, BaseException]


class InstancePool(Protocol):
    @property
    def num_prefill(self) -> int: ...

    @property
    def num_decode(self) -> int: ...

    @property
    def elastic(self) -> bool: ...

    @property
    def prefill_kv_tokens(self) -> int:
        """KV tokens each prefill instance holds."""

    @property
    def decode_kv_tokens(self) -> int: ...

    def ensure_group(self, ranks: tuple[int, ...]) -> None:
        """The process group of `ranks` exists before any call that uses it is made."""

    def can_group(self, ranks: tuple[int, ...]) -> bool:
        """Whether work on `ranks` together may be sent now (after a loss, only groups that
        already exist may be used until `reform`)."""

    def probe(self) -> list[int]:
        """Ranks found lost since the last probe (cheap, never blocks)."""

    async def replace(self, ranks: Sequence[int]) -> None:
        """Start new instances for lost `ranks` (model loaded, KV cache empty); they serve
        after the next `reform`."""

    async def reform(self) -> None:
        """Every rank joins a new data plane (only while no call is in flight anywhere)."""

    async def prefill(self, request_id: str, chunk: ChunkSpec, chunk_ids: Sequence[int],
                      sampling: SamplingParams | None) -> list[PrefillResult | BaseException]:
        """Every rank of `chunk.instances` runs its share; one answer per rank, in that order,
        each awaited (a failing rank's peers may still be inside the chunk); InstanceLost for
        a rank whose process is gone."""

    async def move_kv(self, request_id: str, moves: Sequence[KVMove], dests: Sequence[int],
                      reserve: Sequence[int], sampling: SamplingParams | None,
                      sampler_state: Any) -> list[BaseException]:
        """Send the prompt's KV from the moves' sources (which free it) to `dests` (ranks,
        the lead first, each taking `reserve[i]` tokens of room; with `sampling`, the lead
        takes the sampler); the errors, if any (InstanceLost for a rank whose process is
        gone). Elastic: a move to the source's own GPU is a copy there."""

    async def migrate_kv(self, request_id: str, source: int, dest: int, reserve: int,
                         sampling: SamplingParams | None) -> list[BaseException]:
        """Move all of a decoding request's KV on decode rank `source` (which frees it) to
        decode rank `dest`, which takes `reserve` tokens of room; with `sampling`, `source`
        leads its decode and its sampler moves too. Only between its decode steps."""

    async def stream_kv(self, request_id: str, batch: KVBatch, lead: int,
                        sampling: SamplingParams | None = None,
                        sampler_state: Any = None) -> list[BaseException]:
        """Copy KV of finished chunks of a request (maybe still prefilling) to its decode
        ranks beside the instances' other work: the batch's sources send (and keep) their
        KV, its receivers take their room and receive; with `sampling`, the `lead` also
        gets the sampler (the last batch). Streamed batches keep the order they were made in
        among themselves on every rank. The errors, as `move_kv`'s."""

    async def decode_step(self, entries_by_rank: Mapping[int, Sequence[DecodeEntry]]
                          ) -> StepResult:
        """One continuous-batching step on every rank named."""

    def free(self, request_id: str, ranks: Sequence[int]) -> None:
        """Free the request's KV on `ranks` (no answer awaited; ordered after earlier calls)."""
