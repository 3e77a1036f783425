"""Whether a request can ever be served by this deployment, decided when it arrives.

Everything that would otherwise fail later, deep in a worker (where one failing rank of a group
would leave its peers waiting in a collective), is refused up front with a 400 naming the limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tetris.runtime.engine_api import RequestRejected


@dataclass(frozen=True)
class Limits:
    context_tokens: int
    vocab_size: int
    prefill_kv_tokens: int  # per prefill instance
    prefill_group: int  # the widest group a chunk may use
    decode_kv_tokens: int  # per decode instance
    decode_max_sp: int


def check_request(limits: Limits, prompt_ids: Sequence[int], max_tokens: int) -> None:
    prompt = len(prompt_ids)
    if prompt == 0:
        raise RequestRejected("the prompt is empty", "prompt")
    bad = next((t for t in prompt_ids if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise RequestRejected(f"token id {bad} is outside the vocabulary (0 to "
                              f"{limits.vocab_size - 1})", "prompt")
    if prompt + max_tokens > limits.context_tokens:
        raise RequestRejected(
            f"this model's context is {limits.context_tokens} tokens; the prompt has {prompt} "
            f"and max_tokens is {max_tokens} ({prompt + max_tokens} in all)", "max_tokens")
    share = math.ceil(prompt / limits.prefill_group)
    if share > limits.prefill_kv_tokens:
        raise RequestRejected(
            f"the prompt ({prompt} tokens) needs {share} tokens of KV on each of "
            f"{limits.prefill_group} prefill instances, which hold {limits.prefill_kv_tokens} "
            "each", "prompt")
    # Generated tokens' KV stays on the lead decode instance; the last one's is never made.
    generated = max_tokens - 1
    need = prompt + generated
    limit = limits.decode_kv_tokens * limits.decode_max_sp
    if generated > limits.decode_kv_tokens or need > limit:
        raise RequestRejected(
            f"the prompt ({prompt} tokens) plus max_tokens ({max_tokens}) needs {need} tokens "
            f"of decode KV, {generated} of them on one instance; the limit is {limit} "
            f"({limits.decode_max_sp} decode instance(s) of {limits.decode_kv_tokens})",
            "max_tokens")
