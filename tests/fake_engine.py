"""A stand-in `EngineAPI` for HTTP tests: one token per character, the reply is the prompt reversed.

It streams one token per event (yielding to the loop between tokens), honours max_tokens and stop
strings the way the real engine must (text held back while it could still become a stop
string), admits requests with the real engine's own checks (`runtime/admission.py`), reports to a
`ServingMetrics` like the real engine, and can be told to fail. Its vocabulary is the Unicode
code points; a surrogate id decodes to U+FFFD, as a real detokenizer renders a broken byte run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from tetris.runtime.admission import Limits, check_request
from tetris.runtime.engine_api import (
    ChunkRun,
    EngineHealth,
    FinishReason,
    GenerationRequest,
    QueueFull,
    RequestSummary,
    TokenEvent,
)
from tetris.runtime.metrics import ServingMetrics

LIVE_PLAN: dict[str, Any] = {
    "solver": {"name": "cp", "status": "optimal", "wall_ms": 3.5, "objective": 1.25,
               "bound": 1.25, "stats": {"branches": 12}},
    "availability_s": [0.0, 0.0, 0.5, 0.5],
    "plans": [{
        "request_id": "cmpl-live", "arrival_s": 0.0, "prompt_tokens": 4096, "prefill_end_s": 1.25,
        "ttft_s": 1.25, "ttft_slo_s": 5.0, "slo_slack_s": 3.75,
        "chunks": [
            {"start_token": 0, "end_token": 2048, "instances": [0, 1], "start_s": 0.0,
             "end_s": 0.5},
            {"start_token": 2048, "end_token": 4096, "instances": [0, 1, 2, 3], "start_s": 0.5,
             "end_s": 1.25},
        ],
    }],
}


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    for n in range(min(len(text), max((len(s) for s in stops), default=0)), 0, -1):
        if any(len(s) > n and s.startswith(text[-n:]) for s in stops):
            return n
    return 0


class FakeStream:
    def __init__(self, engine: FakeEngine, request: GenerationRequest) -> None:
        self.engine = engine
        self.request = request
        n = len(request.prompt_ids)
        half = n // 2
        chunks = [ChunkRun(0, half, (0,), 0.01)] if half else []
        chunks.append(ChunkRun(half, n, (0, 1), 0.02))
        self.summary = RequestSummary(prompt_tokens=n, chunks=chunks, decode_instances=(2,))
        self.cancelled = False
        self.done = False
        self.arrival = time.perf_counter()

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._events()

    async def cancel(self) -> None:
        self.engine.cancels.append(self.request.request_id)
        if not self.cancelled and not self.done:
            self.cancelled = True
            self.engine.running -= 1
            self.engine.metrics.request_finished("abort")

    async def _events(self) -> AsyncIterator[TokenEvent]:
        engine, metrics, sampling = self.engine, self.engine.metrics, self.request.sampling
        reply = list(reversed(self.request.prompt_ids))[: sampling.max_tokens]
        emitted, pending, last = "", "", self.arrival
        for i, token in enumerate(reply):
            await asyncio.sleep(engine.token_delay_s)
            if self.cancelled:
                return
            if engine.fail_after is not None and i >= engine.fail_after:
                raise engine.failure
            now = time.perf_counter()
            if i == 0:
                metrics.observe_ttft(now - self.arrival)
            else:
                metrics.observe_inter_token(now - last)
            last = now
            self.summary.completion_tokens += 1
            self.summary.token_ids.append(token)
            pending += "\ufffd" if 0xD800 <= token < 0xE000 else chr(token)
            full = emitted + pending
            hits = [full.find(s) for s in sampling.stop if s in full]
            finish: FinishReason | None = None
            if hits:
                text, finish = full[len(emitted): min(hits)], "stop"
            elif i == len(reply) - 1:
                text = pending
                finish = "length" if len(reply) == sampling.max_tokens else "stop"
            else:
                keep = held_back(full, sampling.stop)
                text, pending = pending[: len(pending) - keep], pending[len(pending) - keep:]
                emitted += text
            if finish is not None:
                self._finish(finish)
            yield TokenEvent((token,), text, finish)
            if finish is not None:
                return

    def _finish(self, reason: FinishReason) -> None:
        self.done = True
        metrics = self.engine.metrics
        metrics.observe_e2e(time.perf_counter() - self.arrival)
        metrics.count_tokens(self.summary.prompt_tokens, self.summary.completion_tokens)
        metrics.request_finished(reason)
        self.engine.running -= 1
        metrics.set_requests(self.engine.running, 0)


VOCAB_SIZE = 0x110000
MAX_TOKEN_CHARS = 1  # one character a token


class FakeEngine:
    """Knobs: `is_serving`, `engine_health` (what health() reports while serving), `max_queue`
    (queue_room is what it leaves), `queue_full` (submit raises QueueFull whatever the room),
    `fail_after` (tokens before the stream raises `failure`), `token_delay_s`, `encode_gate`
    (encode waits until it is set; `encode_entered` is set once one waits). Records `submitted`
    requests, their `streams`, `cancels` (request ids) and `encoded` (texts it tokenized)."""

    def __init__(self, metrics: ServingMetrics, *, context_tokens: int = 256) -> None:
        self.model_name = "fake-model"
        self.context_tokens = context_tokens
        self.default_max_tokens = context_tokens
        self.metrics = metrics
        self.is_serving = True
        self.engine_health = EngineHealth("ok", 2, 2, 1, 1)
        self.max_queue = 8
        self.queue_full = False
        self.fail_after: int | None = None
        self.failure: Exception = RuntimeError("fake engine: device lost")
        self.token_delay_s = 0.0
        self.encode_gate: threading.Event | None = None
        self.encode_entered = threading.Event()
        self.encoded: list[str] = []
        self.limits = Limits(context_tokens, VOCAB_SIZE, prefill_kv_tokens=context_tokens,
                             prefill_group=1, decode_kv_tokens=context_tokens, decode_max_sp=1)
        self.running = 0
        self.submitted: list[GenerationRequest] = []
        self.streams: list[FakeStream] = []
        self.cancels: list[str] = []

    @property
    def serving(self) -> bool:
        return self.is_serving

    def health(self) -> EngineHealth:
        if not self.is_serving:
            return dataclasses.replace(self.engine_health, status="unavailable")
        return self.engine_health

    @property
    def queue_room(self) -> int:
        return max(self.max_queue - self.running, 0)

    def encode(self, text: str) -> list[int]:
        if self.encode_gate is not None:
            self.encode_entered.set()
            self.encode_gate.wait(timeout=10)
        self.encoded.append(text)
        return [ord(c) for c in text]

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.encode("\n".join(f"{m['role']}: {m['content']}" for m in messages))

    async def submit(self, request: GenerationRequest) -> FakeStream:
        check_request(self.limits, request.prompt_ids, request.sampling.max_tokens)
        if self.queue_full or self.running >= self.max_queue:
            raise QueueFull(f"the waiting queue is full ({self.max_queue} requests)")
        self.submitted.append(request)
        stream = FakeStream(self, request)
        self.streams.append(stream)
        self.running += 1
        self.metrics.set_requests(self.running, 0)
        self.metrics.observe_queue_time(0.0)
        for chunk in stream.summary.chunks:
            self.metrics.count_chunk(len(chunk.instances))
        return stream

    def live_plan(self) -> dict[str, Any]:
        return LIVE_PLAN
