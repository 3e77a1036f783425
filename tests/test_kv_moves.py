"""KV moves from prefill ranks to decode instances, and per-rank token counts of a chunk."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tetris.runtime.chunking import zigzag_positions
from tetris.runtime.kv_moves import KVMove, plan_kv_moves
from tetris.solver.plan import ChunkSpec


def test_one_source_one_destination_takes_everything() -> None:
    """100 prompt tokens on rank 0 to decode rank 2, 20 to generate: one move, 120 reserved."""
    moves, reserve = plan_kv_moves({0: 100}, (2,), (500,), 20)
    assert moves == [KVMove(0, 2, 100)]
    assert reserve == [120]


def test_split_fills_the_non_lead_first() -> None:
    """Ranks 0,1 hold 60+40; lead 4 (room 80, 30 for generation) and 5 (room 50): 5 takes 50
    of rank 0's, the lead rank 0's other 10 and rank 1's 40; reserves 80 and 50."""
    moves, reserve = plan_kv_moves({0: 60, 1: 40}, (4, 5), (80, 50), 30)
    assert moves == [KVMove(0, 4, 10), KVMove(0, 5, 50), KVMove(1, 4, 40)]
    assert reserve == [80, 50]


def test_rooms_too_small_is_an_error() -> None:
    """The lead must hold the generated tokens, and all rooms the prompt."""
    with pytest.raises(ValueError, match="cannot hold"):
        plan_kv_moves({0: 10}, (3,), (15,), 6)
    with pytest.raises(ValueError, match="cannot hold"):
        plan_kv_moves({0: 50, 1: 50}, (3, 4), (40, 40), 0)


@given(st.dictionaries(st.integers(0, 7), st.integers(1, 300), min_size=1, max_size=4),
       st.lists(st.integers(0, 400), min_size=1, max_size=3), st.integers(0, 50))
def test_moves_conserve_tokens_and_respect_rooms(held: dict[int, int], rooms: list[int],
                                                 gen: int) -> None:
    """Every held token moves exactly once; no destination gets more than its room."""
    dests = tuple(10 + i for i in range(len(rooms)))
    try:
        moves, reserve = plan_kv_moves(held, dests, rooms, gen)
    except ValueError:
        assert rooms[0] < gen or sum(rooms) - gen < sum(held.values())
        return
    for src, n in held.items():
        assert sum(m.tokens for m in moves if m.source == src) == n
    assert all(r <= room for r, room in zip(reserve, rooms, strict=True))
    assert sum(reserve) == sum(held.values()) + gen
    assert moves == sorted(moves, key=lambda m: (m.source, m.dest))


@given(st.integers(0, 100), st.integers(1, 80), st.lists(st.integers(0, 7), min_size=1,
                                                         max_size=5, unique=True))
def test_tokens_on_rank_counts_the_zigzag_split(start: int, n: int, ranks: list[int]) -> None:
    """tokens_on_rank equals the size of zigzag_positions for members, 0 for others."""
    chunk = ChunkSpec(start, start + n, tuple(ranks))
    for r in range(8):
        want = zigzag_positions(chunk, r).numel() if r in ranks else 0
        assert chunk.tokens_on(r) == want
