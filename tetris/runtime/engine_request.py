"""One request inside the engine: its phase, its output so far, and its output stream.

Where its chunks ran and what KV it holds are the ledger's (`tetris.solver.policy.ledger`); this
is what the client sees. The engine's event loop is the only writer; the HTTP side reads the
stream (an asyncio queue of `TokenEvent`s) and may cancel. Plain dataclass: it is touched on
every token.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from tetris.runtime.detokenize import Detokenizer
from tetris.runtime.engine_api import (
    ChunkRun,
    DeadlineExceeded,
    FinishReason,
    GenerationRequest,
    RequestSummary,
    TokenEvent,
)


class Phase(enum.Enum):
    WAITING = "waiting"  # no chunk started yet
    PREFILL = "prefill"  # some chunks done or running
    TO_DECODE = "to_decode"  # prefilled, waiting for decode room
    DECODE = "decode"
    DONE = "done"


class EngineError(RuntimeError):
    """The engine failed this request (a worker raised); the stream re-raises it."""


@dataclass
class EngineRequest:
    request: GenerationRequest
    arrival_s: float  # engine clock
    arrival_wall: float  # time.monotonic(), for latency metrics
    ttft_slo_s: float
    detok: Detokenizer
    eos_ids: frozenset[int]
    summary: RequestSummary
    phase: Phase = Phase.WAITING
    output: list[int] = field(default_factory=list)
    last_token_wall: float = 0.0
    sampler_state: object | None = None
    decode_ranks: tuple[int, ...] = ()  # world ranks, lead first
    cancelled: bool = False
    # Recovery (`recovery.py`): after its KV was lost the request is prefilled again, its
    # prompt plus the tokens it already generated (`redo_ids`), and decode goes on from there.
    redo_ids: list[int] | None = None
    redos: int = 0
    redo_pending: bool = False  # lost while its chunk or transfer was in flight
    # Prefill rank -> KV tokens of its finished chunks (of this attempt): what may stream.
    kv_done: dict[int, int] = field(default_factory=dict)
    events: asyncio.Queue[TokenEvent | Exception] = field(default_factory=asyncio.Queue)
    deadline: asyncio.TimerHandle | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def prefill_ids(self) -> Sequence[int]:
        """The tokens its prefill computes KV for: the prompt, or after a redo the prompt and
        the output so far (the last output token's KV too: the next token is sampled from
        the prefill, not from a decode step)."""
        return self.request.prompt_ids if self.redo_ids is None else self.redo_ids

    def add_tokens(self, token_ids: list[int]) -> FinishReason | None:
        """Record new output tokens and push their event; returns the finish reason when this
        ends the request (EOS, a stop string or max_tokens)."""
        self.output.extend(token_ids)
        self.summary.completion_tokens = len(self.output)
        self.summary.token_ids = self.output
        finish: FinishReason | None = None
        if self.output[-1] in self.eos_ids:
            finish = "stop"
        elif len(self.output) >= self.request.sampling.max_tokens:
            finish = "length"
        visible = [t for t in token_ids if t not in self.eos_ids]
        text = self.detok.add(visible, final=finish is not None)
        if self.detok.stopped:
            finish = "stop"
        self.events.put_nowait(TokenEvent(tuple(token_ids), text, finish))
        self.last_token_wall = time.monotonic()
        return finish

    def finish(self, reason: FinishReason) -> None:
        """End the stream without new tokens (cancel, or a stop found elsewhere)."""
        if self.phase is not Phase.DONE:
            self.phase = Phase.DONE
            self.events.put_nowait(TokenEvent((), "", reason))

    def fail(self, message: str, *, timed_out: bool = False) -> None:
        if self.phase is not Phase.DONE:
            self.phase = Phase.DONE
            error = DeadlineExceeded(message) if timed_out else EngineError(message)
            self.events.put_nowait(error)

    def record_chunk(self, start: int, end: int, instances: tuple[int, ...],
                     seconds: float) -> None:
        self.summary.chunks.append(ChunkRun(start, end, instances, seconds))


@dataclass
class Stream:
    """The `RequestStream` handed to the HTTP side."""

    state: EngineRequest
    on_cancel: Callable[[EngineRequest], Awaitable[None]]

    @property
    def summary(self) -> RequestSummary:
        return self.state.summary

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while True:
            event = await self.state.events.get()
            if isinstance(event, Exception):
                raise event
            yield event
            if event.finish_reason is not None:
                return

    async def cancel(self) -> None:
        await self.on_cancel(self.state)
