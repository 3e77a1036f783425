"""A stand-in `EngineAPI` for HTTP tests: one token per character, the reply is the prompt reversed.

It streams one token per event (yielding to the loop between tokens), honours max_tokens and stop
strings the way the real engine must (text held back while it could still become a stop
string), reports to a `ServingMetrics` like the real engine, and can be told to fail.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from tetris.runtime.engine_api import (
    ChunkRun,
    FinishReason,
    GenerationRequest,
    QueueFull,
    RequestRejected,
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
                raise RuntimeError("fake engine: device lost")
            now = time.perf_counter()
            if i == 0:
                metrics.observe_ttft(now - self.arrival)
            else:
                metrics.observe_inter_token(now - last)
            last = now
            self.summary.completion_tokens += 1
            self.summary.token_ids.append(token)
            pending += chr(token)
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


class FakeEngine:
    """Knobs: `is_serving`, `queue_full`, `fail_after` (tokens before the stream raises),
    `token_delay_s`. Records `submitted` requests, their `streams` and `cancels` (request ids)."""

    def __init__(self, metrics: ServingMetrics, *, context_tokens: int = 256) -> None:
        self.model_name = "fake-model"
        self.context_tokens = context_tokens
        self.default_max_tokens = context_tokens
        self.metrics = metrics
        self.is_serving = True
        self.queue_full = False
        self.fail_after: int | None = None
        self.token_delay_s = 0.0
        self.running = 0
        self.submitted: list[GenerationRequest] = []
        self.streams: list[FakeStream] = []
        self.cancels: list[str] = []

    @property
    def serving(self) -> bool:
        return self.is_serving

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.encode("\n".join(f"{m['role']}: {m['content']}" for m in messages))

    async def submit(self, request: GenerationRequest) -> FakeStream:
        if self.queue_full:
            raise QueueFull("the waiting queue is full (8 requests)")
        needed = len(request.prompt_ids) + request.sampling.max_tokens
        if needed > self.context_tokens:
            raise RequestRejected(
                f"prompt ({len(request.prompt_ids)} tokens) + max_tokens "
                f"({request.sampling.max_tokens}) exceeds the context of {self.context_tokens} "
                "tokens", param="max_tokens")
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
