"""What a generation request passes between its body being valid and the engine's queue: limits
checked without a tokenizer, a place in the queue, and the tokenizing itself.

Tokenizing a long prompt takes a worker thread for a while, so it must be bounded the way the
queue is: a request takes a slot before it tokenizes and holds it until the engine has it (or
refused it). Without that, a burst of large prompts would all be tokenized only for most of them
to meet a full queue, and the threads would starve those the queue could take.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import anyio

from tetris.runtime.engine_api import EngineAPI
from tetris.runtime.server.errors import ApiError, queue_full

T = TypeVar("T")


class Intake:
    def __init__(self, engine: EngineAPI, max_token_chars: int | None) -> None:
        """`max_token_chars`: the most input characters one token can stand for (the
        tokenizer's `max_token_chars`); None skips the length check."""
        self.engine = engine
        self.max_token_chars = max_token_chars
        self.tokenizing = 0  # touched on the event loop only

    def check_max_tokens(self, max_tokens: int, param: str) -> None:
        context = self.engine.context_tokens
        if max_tokens >= context:
            raise ApiError(400, f"{param}: {max_tokens} leaves no room for a prompt in this "
                           f"model's context of {context} tokens.", param=param)

    def check_length(self, chars: int, param: str) -> None:
        """Refuses text that cannot fit in the context however it is tokenized."""
        if self.max_token_chars is None:
            return
        context = self.engine.context_tokens
        if chars > context * self.max_token_chars:
            raise ApiError(400, f"{param}: {chars} characters cannot fit in this model's "
                           f"context of {context} tokens, however tokenized (a token stands for "
                           f"at most {self.max_token_chars} characters).", param=param)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Held from before tokenizing until the engine's submit returns."""
        if self.engine.queue_room - self.tokenizing <= 0:
            raise queue_full("The server's request queue is full (counting the requests being "
                             "tokenized); retry later.")
        self.tokenizing += 1
        try:
            yield
        finally:
            self.tokenizing -= 1

    async def encode(self, func: Callable[[T], list[int]], value: T, param: str) -> list[int]:
        # In a worker thread: tokenizing a 128k-token prompt must not stall every other stream.
        try:
            ids = await anyio.to_thread.run_sync(func, value)
        except ValueError as exc:
            raise ApiError(400, f"Cannot tokenize the {param}: {exc}", param=param) from None
        if not ids:
            raise ApiError(400, f"{param}: encodes to no tokens.", param=param)
        return ids
