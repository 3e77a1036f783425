"""Requests the deployment can never serve are refused on arrival, naming the limit."""

from __future__ import annotations

import pytest

from tetris.runtime.admission import Limits, check_request
from tetris.runtime.engine_api import RequestRejected

# context 100, vocab 50; prefill: 2 instances of 30 KV tokens; decode: 2 of 40.
LIMITS = Limits(context_tokens=100, vocab_size=50, prefill_kv_tokens=30, prefill_group=2,
                decode_kv_tokens=40, decode_max_sp=2)


@pytest.mark.parametrize(("prompt", "max_tokens", "param", "words"), [
    ([], 5, "prompt", "empty"),
    ([1, 50], 5, "prompt", "token id 50"),
    ([1] * 60, 41, "max_tokens", "context is 100"),
    ([1] * 61, 5, "prompt", "31 tokens of KV"),  # ceil(61 / 2) > 30
    ([1] * 10, 42, "max_tokens", "41 of them on one instance"),  # 41 generated > 40
    ([1] * 60, 30, "max_tokens", "limit is 80"),  # 60 + 29 > 2 × 40
])
def test_refused(prompt: list[int], max_tokens: int, param: str, words: str) -> None:
    """Each limit refuses with a 400-style error naming its parameter and the numbers."""
    with pytest.raises(RequestRejected, match=words) as err:
        check_request(LIMITS, prompt, max_tokens)
    assert err.value.param == param


def test_at_every_limit_exactly_is_accepted() -> None:
    """60 prompt tokens (30 per prefill instance) + 21 new: 80 decode tokens, 20 on the lead."""
    check_request(LIMITS, [49] * 60, 21)
    check_request(LIMITS, [0] * 10, 41)  # 40 generated on one decode instance
