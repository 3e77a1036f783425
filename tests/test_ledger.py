"""The ledger both executors feed: the planner's view, launch checks, KV per instance and per
request, deferred releases, decode reservations and lost instances, on hand-worked events."""

from __future__ import annotations

import math

import pytest

from tetris.solver.plan import ChunkSpec
from tetris.solver.policy.dispatch import DecodeLoad, DecodeQueue, Placement
from tetris.solver.policy.ledger import LOST_AVAILABILITY_S, Ledger, LedgerError
from tetris.solver.policy.settings import PolicySettings
from tetris.solver.policy.view import Launch

OVERRUN = 1e-6


def ledger(prefill: int = 2, decode: int = 2, kv: int | None = None) -> Ledger:
    return Ledger(prefill, decode, PolicySettings(overrun_s=OVERRUN), prefill_kv_tokens=kv)


def launch(rid: str, start: int, end: int, *instances: int) -> Launch:
    return Launch(rid, ChunkSpec(start, end, instances))


def test_view_shows_running_chunks_at_their_planned_end_and_overruns_just_after_now() -> None:
    """A chunk on instance 0 planned for [1.0, 1.5): at 1.2 the planner sees instance 0 free at
    1.5 and the request ready then; at 1.7 (overrun) both move to just after now."""
    book = ledger()
    book.arrive("a", 0.0, 1000, 5.0)
    book.launch(launch("a", 0, 512, 0), 1.0, 0.5)
    view = book.view(1.2)
    assert view.availability_s == (1.5, 1.2) and view.idle == (False, True)
    (a,) = view.pending
    assert (a.prefilled_tokens, a.kv_instances, a.ready_s) == (512, (0,), 1.5)
    late = book.view(1.7)
    assert late.availability_s[0] == 1.7 + OVERRUN and late.pending[0].ready_s == 1.7 + OVERRUN


def test_last_chunk_running_leaves_the_view_then_the_request_waits_for_decode() -> None:
    """While its last chunk runs a request has nothing to plan; after it, it is handed off."""
    book = ledger()
    book.arrive("a", 0.0, 512, 5.0)
    book.launch(launch("a", 0, 512, 0, 1), 0.0, 0.1)
    assert book.view(0.05).pending == ()
    assert book.nothing_to_decide(0.05)  # every request in prefill is mid-chunk
    _, released = book.chunk_ended("a", 0.1)
    assert released is None and "a" in book.handoff and not book.prefill
    assert book.busy == [False, False] and book.busy_s == [0.1, 0.1]


def test_launch_refusals_name_what_is_wrong() -> None:
    """Unknown request, a gap in the prompt, a busy or non-nested group, no KV room."""
    book = ledger(kv=300)
    book.arrive("a", 0.0, 1000, 5.0)
    book.arrive("b", 0.0, 1000, 5.0)
    assert book.refusal(launch("x", 0, 64, 0)) == "not a pending request"
    assert "continue its prefill at 0" in str(book.refusal(launch("a", 64, 128, 0)))
    assert book.refusal(launch("a", 0, 1000, 0, 1)) == "no KV room on instances (0, 1)"
    book.launch(launch("a", 0, 256, 0), 0.0, 1.0)
    assert "busy" in str(book.refusal(launch("b", 0, 64, 0)))
    book.chunk_ended("a", 1.0)
    assert "not nested" in str(book.refusal(launch("a", 256, 320, 1)))
    with pytest.raises(LedgerError, match="launch of 'a'"):
        book.launch(launch("a", 256, 320, 1), 1.0, 0.1)


def test_kv_per_instance_follows_the_zigzag_split() -> None:
    """[0, 512) on {0, 1}: pieces of 128, each member keeps 256; then [512, 1000) on {0, 1, 2}:
    six pieces of 81, 81, 82, 81, 81, 82 tokens, member i taking pieces i and 5 − i."""
    book = ledger(prefill=3)
    book.arrive("a", 0.0, 1000, 5.0)
    book.launch(launch("a", 0, 512, 0, 1), 0.0, 0.1)
    assert book.kv_used == [256, 256, 0]
    book.chunk_ended("a", 0.1)
    book.launch(launch("a", 512, 1000, 0, 1, 2), 0.1, 0.1)
    assert book.kv_used == [256 + 163, 256 + 162, 163]
    assert book.entry("a").kv_held == {0: 419, 1: 418, 2: 163}  # type: ignore[union-attr]


def test_release_while_a_chunk_runs_is_done_when_it_ends() -> None:
    """A cancel mid-chunk frees nothing under the running chunk; the chunk's end frees its
    KV (returned, for the workers) and the request is gone."""
    book = ledger()
    book.arrive("a", 0.0, 1000, 5.0)
    book.launch(launch("a", 0, 512, 0, 1), 0.0, 0.1)
    assert book.release("a") is None
    assert book.view(0.01).pending == () and book.kv_used == [256, 256]
    _, released = book.chunk_ended("a", 0.1)
    assert released is not None and released.prefill_kv == {0: 256, 1: 256}
    assert "a" not in book and book.is_empty()


def test_decode_reservation_and_a_release_during_the_kv_transfer() -> None:
    """Decode KV is reserved at placement; a release while the KV moves waits for the move,
    which then reports both sides to free."""
    book = ledger()
    book.arrive("a", 0.0, 512, 5.0)
    book.launch(launch("a", 0, 512, 0), 0.0, 0.1)
    book.chunk_ended("a", 0.1)
    queue = DecodeQueue(capacity_tokens=1000, max_batch=4, max_sp=2)
    queue.submit("a", 600)
    placed = queue.place_head(book.decode_loads())
    assert placed is not None and placed[1].instances == (0,)
    queue.pop()
    book.hold((0,), 0.2)
    book.decode_begin("a", (0,), (600,))
    assert book.decode_loads() == [DecodeLoad(600, 1), DecodeLoad(0, 0)]
    assert book.release("a") is None  # its KV is moving
    book.unhold((0,))
    _, released = book.kv_moved("a")
    assert released.prefill_kv == {0: 512} and released.decode_instances == (0,)
    assert book.is_empty()


def test_lost_instances_are_never_offered_and_their_requests_reported() -> None:
    """Instance 1 lost: shown busy far in the future, refused for launches; the request whose
    KV was on it is returned; a lost decode instance gets no more placements."""
    book = ledger()
    book.arrive("a", 0.0, 1000, 5.0)
    book.arrive("b", 0.0, 1000, 5.0)
    book.launch(launch("a", 0, 512, 0, 1), 0.0, 0.1)
    book.chunk_ended("a", 0.1)
    assert book.instance_lost(1) == ["a"]
    view = book.view(2.0)
    assert view.availability_s == (2.0, 2.0 + LOST_AVAILABILITY_S) and view.idle == (True, False)
    assert "busy" in str(book.refusal(launch("b", 0, 64, 1)))
    assert book.decode_instance_lost(0) == []
    queue = DecodeQueue(capacity_tokens=1000, max_batch=4, max_sp=1)
    queue.submit("a", 10)
    assert queue.place_head(book.decode_loads()) == ("a", Placement((1,), (10,)))


def test_redo_frees_everything_and_requeues_in_arrival_order() -> None:
    """'a' holds 512 KV on {0, 1} and is redone after 1 is lost: its 512 tokens come back to
    free, it waits from token 0 with its new length ahead of the later 'b'; instance 1 may
    rejoin only once nothing is left on it."""
    book = ledger()
    book.arrive("a", 0.0, 1000, 5.0)
    book.arrive("b", 1.0, 1000, 5.0)
    book.launch(launch("a", 0, 512, 0, 1), 0.0, 0.1)
    assert book.instance_lost(1) == ["a"]
    with pytest.raises(LedgerError, match="in flight"):
        book.redo("a", 1000)
    with pytest.raises(LedgerError, match="rejoins holding 256"):
        book.instance_back(1)
    book.chunk_ended("a", 0.1)
    released = book.redo("a", 1010, ttft_slo_s=7.0)
    assert released.prefill_kv == {0: 256, 1: 256} and released.decode_instances == ()
    assert list(book.prefill) == ["a", "b"]
    entry = book.prefill["a"]
    assert (entry.prefilled, entry.prompt_tokens, entry.kv_held, entry.ttft_slo_s) == \
        (0, 1010, {}, 7.0)
    book.instance_back(1)
    assert book.view(2.0).idle == (True, True)


def test_redo_of_a_decoding_request_frees_its_decode_room() -> None:
    """A request decoding on decode instance 0 when it is lost: redo returns its decode
    instance to free and takes its reservation back; then the instance may rejoin."""
    book = ledger()
    book.arrive("a", 0.0, 512, 5.0)
    book.launch(launch("a", 0, 512, 0), 0.0, 0.1)
    book.chunk_ended("a", 0.1)
    book.decode_begin("a", (0,), (600,), moving=False)
    assert book.decode_instance_lost(0) == ["a"]
    released = book.redo("a", 520, arrival_s=3.0)
    assert released.decode_instances == (0,) and book.decode_reserved == [0, 0]
    assert book.prefill["a"].arrival_s == 3.0
    book.decode_instance_back(0)
    assert book.decode_loads()[0].reserved_tokens == 0


def test_load_average_follows_the_busy_share_with_its_memory() -> None:
    """Both instances busy for one time constant: load = 1 − e^−1."""
    book = ledger()
    book.arrive("a", 0.0, 10_000, 5.0)
    book.launch(launch("a", 0, 512, 0, 1), 0.0, 100.0)
    book.nothing_to_decide(0.0)
    book.nothing_to_decide(30.0)  # the settings' default memory: 30 s
    assert book.load.load == pytest.approx(1 - math.exp(-1))


def test_streaming_request_is_placed_on_decode_while_it_prefills() -> None:
    """Placed after its first chunk, a request stays plannable in prefill, goes straight to the
    decode book when its last chunk ends, and frees its prefill KV only at `kv_moved`."""
    book = ledger()
    book.arrive("a", 0.0, 1000, 5.0)
    book.launch(launch("a", 0, 512, 0), 0.0, 0.1)
    book.chunk_ended("a", 0.1)
    book.decode_begin("a", (1,), (1100,))
    assert "a" in book.prefill and book.decode_reserved == [0, 1100]
    assert book.view(0.1).pending[0].prefilled_tokens == 512
    with pytest.raises(LedgerError, match="prefill is not done"):
        book.kv_moved("a")
    book.launch(launch("a", 512, 1000, 0, 1), 0.1, 0.1)
    book.chunk_ended("a", 0.1)
    assert "a" in book.decode and not book.handoff and book.kv_used == [756, 244]
    _, released = book.kv_moved("a")
    assert released.prefill_kv == {0: 756, 1: 244} and book.kv_used == [0, 0]
    assert book.release("a") is not None and book.is_empty()


def test_streaming_request_released_mid_prefill_is_freed_after_its_chunk_and_stream() -> None:
    """Cancelled while its second chunk runs and its first chunk's KV streams: nothing is freed
    until the chunk ends and the stream is cut (in either order)."""
    for stream_first in (True, False):
        book = ledger()
        book.arrive("a", 0.0, 1000, 5.0)
        book.launch(launch("a", 0, 512, 0), 0.0, 0.1)
        book.chunk_ended("a", 0.1)
        book.decode_begin("a", (0,), (1100,))
        book.launch(launch("a", 512, 1000, 0), 0.1, 0.1)
        assert book.release("a") is None
        if stream_first:
            _, released = book.kv_moved("a")
            assert released.prefill_kv == {} and book.kv_used == [1000, 0]
            _, dropped = book.chunk_ended("a", 0.1)
        else:
            _, none = book.chunk_ended("a", 0.1)
            assert none is None and book.kv_used == [1000, 0]
            _, dropped = book.kv_moved("a")
        assert dropped is not None and dropped.decode_instances == (0,)
        assert book.is_empty()


def test_decode_loss_names_a_streaming_request_still_in_prefill() -> None:
    """A request placed on decode instance 1 while it prefills is among that instance's
    requests when it is lost."""
    book = ledger()
    book.arrive("a", 0.0, 1000, 5.0)
    book.launch(launch("a", 0, 512, 0), 0.0, 0.1)
    book.chunk_ended("a", 0.1)
    book.decode_begin("a", (1,), (1100,))
    assert book.decode_instance_lost(1) == ["a"]


def test_a_decoding_requests_kv_moves_to_another_decode_instance() -> None:
    """'a' decodes on instance 0 with 600 tokens reserved; moving it to 1 reserves there at
    once and frees 0 only when the move ends; a release meanwhile waits for the move's end,
    which then reports instance 1 to free."""
    book = ledger()
    book.arrive("a", 0.0, 512, 5.0)
    book.launch(launch("a", 0, 512, 0), 0.0, 0.1)
    book.chunk_ended("a", 0.1)
    book.decode_begin("a", (0,), (600,))
    book.kv_moved("a")
    with pytest.raises(LedgerError, match="must be open and new"):
        book.decode_move("a", 0, 0)
    assert book.decode_move("a", 0, 1) == (0, 600)
    assert book.decode_loads() == [DecodeLoad(600, 1), DecodeLoad(600, 1)]
    with pytest.raises(LedgerError, match="already moving"):
        book.decode_move("a", 1, 0)
    assert book.decode_moved("a", 0, 600) is None
    assert book.decode_loads() == [DecodeLoad(0, 0), DecodeLoad(600, 1)]
    book.decode_move("a", 1, 0)
    assert book.release("a") is None
    released = book.decode_moved("a", 1, 600)
    assert released is not None and released.decode_instances == (0,)
    assert book.is_empty()


def test_elastic_decode_room_counts_the_gpus_prefill_kv() -> None:
    """Elastic: GPU 0 holds 300 prefill KV tokens and 200 decode ones of 1000: 500 free."""
    book = Ledger(2, 2, PolicySettings(overrun_s=OVERRUN), elastic=True)
    book.arrive("a", 0.0, 300, 5.0)
    book.launch(launch("a", 0, 300, 0), 0.0, 0.1)
    book.arrive("b", 0.0, 100, 5.0)
    book.launch(launch("b", 0, 100, 1), 0.0, 0.1)
    book.chunk_ended("b", 0.1)
    book.decode_begin("b", (0,), (200,))
    assert book.decode_room(0, 1000) == 500
    assert book.decode_room(1, 1000) == 1000 - 100  # b's prefill KV until it has moved
