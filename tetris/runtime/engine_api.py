"""What the HTTP daemon sees of the engine: submit a tokenized request, read its tokens as they
come, cancel it; the live plan; whether it is serving. The daemon codes against `EngineAPI`, so
tests can drive it with a stand-in engine.

Text is the engine's business: each `TokenEvent` carries the new text already detokenized
incrementally and cut at a stop string, so every consumer sees the same characters.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from tetris.runtime.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort"]


class QueueFull(Exception):
    """The waiting queue is at its configured bound: the request was not accepted (HTTP 429)."""


class RequestRejected(ValueError):
    """The request cannot be served as asked (HTTP 400); `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class DeadlineExceeded(RuntimeError):
    """Raised by a request's stream when it ran past the server's deadline (HTTP 504); the
    tokens streamed before it stand."""


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: Sequence[int]
    sampling: SamplingParams


@dataclass(frozen=True)
class ChunkRun:
    """One prefill chunk as executed: tokens [start, end) on prefill `instances`."""

    start_token: int
    end_token: int
    instances: tuple[int, ...]
    seconds: float


@dataclass(frozen=True)
class KVLanding:
    """A streamed batch of the prompt's KV is on the decode instances: `tokens` of it there by
    then, `after_s` seconds after the request arrived."""

    tokens: int
    after_s: float


@dataclass(frozen=True)
class TokenEvent:
    """New output since the previous event. `finish_reason` is set on the last event only."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None = None


@dataclass
class RequestSummary:
    """Filled in as the request runs; complete once the last event has been read."""

    prompt_tokens: int
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # every output token, EOS included
    chunks: list[ChunkRun] = field(default_factory=list)
    decode_instances: tuple[int, ...] = ()
    prefilled_after_s: float | None = None  # when its (latest) last chunk ended, after arrival
    kv_landed: list[KVLanding] = field(default_factory=list)  # streamed batches, in order


class RequestStream(Protocol):
    @property
    def summary(self) -> RequestSummary: ...

    def __aiter__(self) -> AsyncIterator[TokenEvent]: ...

    async def cancel(self) -> None:
        """Stop generating and free the request's KV and plan (a client went away).
        Idempotent: it may come after the stream ended or raised, and more than once."""


@dataclass(frozen=True)
class EngineHealth:
    """What `/health` reports: "ok" while every instance serves, "degraded" while some were
    lost but each role still has one (200 either way), "unavailable" when a role has none or
    the engine is not serving (503)."""

    status: Literal["ok", "degraded", "unavailable"]
    prefill_live: int
    prefill_total: int
    decode_live: int
    decode_total: int
    instances_lost: int = 0  # losses since start (an instance lost twice counts twice)
    requests_recovered: int = 0  # requests that survived a loss and went on


class EngineAPI(Protocol):
    model_name: str
    context_tokens: int
    # A chat request that names no max_tokens gets min(this, what the context leaves): every
    # request reserves its final KV up front, so "the whole context" would starve the others.
    default_max_tokens: int

    @property
    def serving(self) -> bool: ...

    def health(self) -> EngineHealth:
        """Cheap, on the event loop."""

    @property
    def queue_room(self) -> int:
        """Requests the engine would still accept before answering QueueFull (its bound less
        the requests it holds); the daemon also counts requests it is still tokenizing."""

    # Both may run in a worker thread (a long prompt must not stall other streams), so they
    # are thread-safe; ValueError means the input cannot be encoded (e.g. no chat template).
    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]: ...

    async def submit(self, request: GenerationRequest) -> RequestStream:
        """Raises QueueFull when the waiting queue is full, RequestRejected when the request
        can never be served (e.g. prompt + max_tokens over the context)."""

    def live_plan(self) -> dict[str, Any]:
        """The current plan in the `tetris plan --format json` schema (solver/plan_json.py).
        Called on the event loop: cheap."""
