"""KV moves from prefill ranks to decode instances (after prefill, or streamed chunk by chunk),
and per-rank token counts of a chunk."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tetris.runtime.chunking import zigzag_positions
from tetris.runtime.kv_moves import KVMove, KVRoute, plan_kv_moves, stream_shares
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


def test_stream_shares_fill_as_the_moves_after_prefill_do() -> None:
    """100 prompt tokens, lead room 80 (30 to generate) and 50: the non-lead takes 50, the
    lead 50 (its reservation 80), as `plan_kv_moves` fills them; too little room is an error."""
    assert stream_shares(100, (80, 50), 30) == [50, 50]
    with pytest.raises(ValueError, match="cannot hold"):
        stream_shares(100, (60, 50), 30)


def test_route_streams_three_chunks_in_append_order() -> None:
    """Chunks held as {0: 64}, then {0: 96, 1: 32}, then {0: 120, 1: 60} (prefill ranks 0, 1)
    onto lead 5 (share 100) and 6 (share 80): each batch sends only the new tokens from where
    the source stopped, the non-lead fills first, and the reservation comes once."""
    route = KVRoute((5, 6), [100, 80], [110, 80])
    first = route.next_batch({0: 64})
    assert first is not None
    assert first.moves == (KVMove(0, 6, 64),) and first.starts == {0: 0}
    assert first.reserve == {5: 110, 6: 80}
    second = route.next_batch({0: 96, 1: 32})
    assert second is not None
    assert second.moves == (KVMove(0, 5, 16), KVMove(0, 6, 16), KVMove(1, 5, 32))
    assert second.starts == {0: 64, 1: 0} and second.reserve == {}
    assert route.next_batch({0: 96, 1: 32}) is None and not route.done
    third = route.next_batch({0: 120, 1: 60})
    assert third is not None and third.starts == {0: 96, 1: 32} and route.done
    assert sum(m.tokens for m in third.moves) == 52


@given(st.lists(st.dictionaries(st.integers(0, 3), st.integers(1, 40), min_size=1),
                min_size=1, max_size=5),
       st.lists(st.integers(0, 150), min_size=1, max_size=3), st.integers(0, 20))
def test_route_sends_every_token_once_within_the_shares(chunks: list[dict[int, int]],
                                                        rooms: list[int], gen: int) -> None:
    """Any chunk sequence: every source's tokens leave in contiguous runs from 0, each token
    once, each destination gets exactly its share, and moves are in (source, dest) order."""
    total = sum(n for c in chunks for n in c.values())
    try:
        shares = stream_shares(total, rooms, gen)
    except ValueError:
        return
    dests = tuple(10 + i for i in range(len(rooms)))
    route = KVRoute(dests, shares, [s + (gen if i == 0 else 0) for i, s in enumerate(shares)])
    held: dict[int, int] = {}
    got = dict.fromkeys(dests, 0)
    for chunk in chunks:
        before = dict(held)
        for g, n in chunk.items():
            held[g] = held.get(g, 0) + n
        batch = route.next_batch(held)
        assert batch is not None
        assert batch.starts == {g: before.get(g, 0) for g in sorted(chunk)}
        for g in chunk:
            assert sum(m.tokens for m in batch.moves if m.source == g) == chunk[g]
        assert list(batch.moves) == sorted(batch.moves, key=lambda m: (m.source, m.dest))
        for m in batch.moves:
            got[m.dest] += m.tokens
    assert route.done and [got[d] for d in dests] == shares


def test_elastic_sources_keep_their_own_share_on_their_own_gpu() -> None:
    """Elastic, P = 3: ranks 0,1 hold 100+50 and decode on their own GPUs (ranks 3, 4; lead 3
    with room 120 of which 10 for generation): each keeps all of its KV (local copies), no
    transfer; reserves 110 and 50."""
    moves, reserve = plan_kv_moves({0: 100, 1: 50}, (3, 4), (120, 200), 10, {0: 3, 1: 4})
    assert moves == [KVMove(0, 3, 100), KVMove(1, 4, 50)]
    assert reserve == [110, 50]


def test_elastic_overflow_goes_elsewhere_and_the_overflowing_gpu_receives_nothing() -> None:
    """As above but the lead's room is 60 (50 after generation): rank 0 keeps 50 and sends
    its other 50 to rank 4, which kept rank 1's 50 too; reserves 60 and 100."""
    moves, reserve = plan_kv_moves({0: 100, 1: 50}, (3, 4), (60, 200), 10, {0: 3, 1: 4})
    assert moves == [KVMove(0, 3, 50), KVMove(0, 4, 50), KVMove(1, 4, 50)]
    assert reserve == [60, 100]


@given(st.dictionaries(st.integers(0, 3), st.integers(1, 300), min_size=1, max_size=4),
       st.lists(st.integers(0, 400), min_size=1, max_size=4, unique=False), st.integers(0, 50),
       st.permutations(range(4)))
def test_elastic_moves_never_make_a_gpu_both_send_to_others_and_receive(
        held: dict[int, int], rooms: list[int], gen: int, order: list[int]) -> None:
    """GPU g's roles are ranks g and 4 + g: no GPU both sends KV to another GPU and
    receives KV from one (so blocking transfers cannot wait on each other), every token
    moves once, and rooms hold."""
    dests = tuple(4 + g for g in order[:len(rooms)])
    try:
        moves, reserve = plan_kv_moves(held, dests, rooms, gen, {g: 4 + g for g in held})
    except ValueError:
        return
    for src, n in held.items():
        assert sum(m.tokens for m in moves if m.source == src) == n
    assert all(r <= room for r, room in zip(reserve, rooms, strict=True))
    sends = {m.source for m in moves if m.dest != 4 + m.source}
    receives = {m.dest - 4 for m in moves if m.dest != 4 + m.source}
    assert not sends & receives, moves
