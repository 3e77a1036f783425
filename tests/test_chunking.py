"""Chunk plans as `tetris generate` takes them, and the zigzag split of a chunk over its group."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tetris.runtime.chunking import parse_chunks, zigzag_positions
from tetris.runtime.sampling import Sampler, SamplingParams
from tetris.solver.plan import ChunkSpec


def test_parse_nested_plan() -> None:
    """512:1,1024:2,rest:4 over 2000 tokens: [0,512) on {0}, [512,1536) on {0,1}, rest on 0-3."""
    assert parse_chunks("512:1,1024:2,rest:4", 2000) == [
        ChunkSpec(0, 512, (0,)), ChunkSpec(512, 1536, (0, 1)), ChunkSpec(1536, 2000, (0, 1, 2, 3)),
    ]


@pytest.mark.parametrize(("text", "message"), [
    ("512:2,rest:1", "SP may only grow"),
    ("rest:1,5:1", "'rest' must be the last"),
    ("5000:1", "prompt has 2000 tokens"),
    ("100:1", "cover 100 of 2000"),
    ("0:1,rest:1", "at least one token"),
    ("abc", "expected TOKENS:SP"),
    ("100:0,rest:1", "SP must be >= 1"),
    ("", "no chunks"),
])
def test_bad_plans_name_the_problem(text: str, message: str) -> None:
    """Each malformed plan is a ValueError naming what is wrong."""
    with pytest.raises(ValueError, match=message):
        parse_chunks(text, 2000)


def test_zigzag_balances_causal_work() -> None:
    """8 tokens on 2 ranks: pieces of 2; rank 0 takes the first and last, rank 1 the middle."""
    chunk = ChunkSpec(100, 108, (0, 1))
    assert zigzag_positions(chunk, 0).tolist() == [100, 101, 106, 107]
    assert zigzag_positions(chunk, 1).tolist() == [102, 103, 104, 105]


@settings(max_examples=200, deadline=None)
@given(start=st.integers(0, 5000), tokens=st.integers(1, 300), sp=st.integers(1, 8))
def test_zigzag_is_a_partition(start: int, tokens: int, sp: int) -> None:
    """Over any chunk and group, the ranks' positions partition the chunk exactly once."""
    chunk = ChunkSpec(start, start + tokens, tuple(range(sp)))
    parts = [zigzag_positions(chunk, r) for r in range(sp)]
    assert sorted(torch.cat(parts).tolist()) == list(range(start, start + tokens))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 2


def test_sampler_greedy_and_seeded() -> None:
    """Greedy takes the argmax; a seeded sampler repeats itself; top-p keeps the head only."""
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert Sampler(SamplingParams())(logits) == 1
    draws = [Sampler(SamplingParams(temperature=1.0, seed=7))(logits) for _ in range(3)]
    assert len(set(draws)) == 1
    # top_p 0.5: the two largest (≈0.48 and ≈0.44 of the mass) are kept, never index 0 or 2.
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=0))
    assert {sampler(logits) for _ in range(50)} <= {1, 3}
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
