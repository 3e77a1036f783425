"""Decode dispatcher: which decode instance(s) take a request's KV after prefill.

Fastest hand-off, then least-loaded with room: among the instances with room for the request's
whole KV (prompt + every token it may still generate) and a free batch slot, those whose
hand-off from where the KV sits is quickest (`handoff_s`, e.g. NVLink inside the prefill group's
node before the network; equal for all when not given), and of those the one holding the fewest
reserved KV tokens.
When no single instance has room and decode SP is allowed, the KV is split over the fewest
instances whose free room covers it (most free room first), each share proportional to that
instance's room. `None` means "wait": nothing is dropped, the caller retries when KV is freed.

`DecodeQueue` is the order: prefilled requests are placed first come first served, so a large
request at the head is not overtaken forever by small ones. Shared by the simulator and the
runtime engine, both reading the decode loads from their `Ledger`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DecodeLoad:
    """One decode instance as the dispatcher sees it."""

    reserved_tokens: int
    batch: int


@dataclass(frozen=True, slots=True)
class Placement:
    """`shares[i]` KV tokens go to `instances[i]`; `instances[0]` leads the request's decode."""

    instances: tuple[int, ...]
    shares: tuple[int, ...]


def choose_decode_instances(
    loads: Sequence[DecodeLoad],
    kv_tokens: int,
    capacity_tokens: int,
    max_batch: int,
    max_sp: int = 1,
    handoff_s: Sequence[float] | None = None,
) -> Placement | None:
    """Where the request's KV goes, or None (wait); `handoff_s[i]`: the hand-off time to
    instance i (a faster path wins over a lighter load)."""
    if kv_tokens <= 0:
        raise ValueError(f"kv_tokens must be > 0, got {kv_tokens}")
    if max_sp < 1:
        raise ValueError(f"max_sp must be >= 1, got {max_sp}")
    open_slots = [g for g, load in enumerate(loads) if load.batch < max_batch]
    whole = [g for g in open_slots if capacity_tokens - loads[g].reserved_tokens >= kv_tokens]
    if whole:
        if handoff_s is not None:
            fastest = min(handoff_s[i] for i in whole)
            # Ties within 1% are the same path (equal links, different byte counts).
            whole = [i for i in whole if handoff_s[i] <= fastest * 1.01]
        g = min(whole, key=lambda i: (loads[i].reserved_tokens, loads[i].batch, i))
        return Placement((g,), (kv_tokens,))
    if max_sp == 1:
        return None
    by_room = sorted(open_slots, key=lambda i: (loads[i].reserved_tokens, loads[i].batch, i))
    chosen: list[int] = []
    room_total = 0
    for g in by_room[:max_sp]:
        room = capacity_tokens - loads[g].reserved_tokens
        if room <= 0:
            break
        chosen.append(g)
        room_total += room
        if room_total >= kv_tokens:
            break
    if room_total < kv_tokens:
        return None
    rooms = [capacity_tokens - loads[g].reserved_tokens for g in chosen]
    shares = [kv_tokens * room // room_total for room in rooms]
    # Integer division leaves < len(chosen) tokens: hand them out where room remains.
    left = kv_tokens - sum(shares)
    for i in range(len(shares)):
        extra = min(left, rooms[i] - shares[i])
        shares[i] += extra
        left -= extra
    assert left == 0 and all(s <= r for s, r in zip(shares, rooms, strict=True))
    return Placement(tuple(chosen), tuple(shares))


class DecodeQueue:
    """Prefilled requests waiting for decode room, in arrival order, with the KV tokens each
    needs on the decode side (prompt plus every token it may still generate)."""

    def __init__(self, capacity_tokens: int, max_batch: int, max_sp: int) -> None:
        if max_batch <= 0:
            raise ValueError(f"max_batch must be > 0, got {max_batch}")
        self.capacity_tokens, self.max_batch, self.max_sp = capacity_tokens, max_batch, max_sp
        self._waiting: OrderedDict[str, int] = OrderedDict()
        self.max_waiting = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._waiting

    def submit(self, request_id: str, kv_tokens: int) -> None:
        self._waiting[request_id] = kv_tokens
        self.max_waiting = max(self.max_waiting, len(self._waiting))

    def remove(self, request_id: str) -> bool:
        return self._waiting.pop(request_id, None) is not None

    @property
    def waiting_tokens(self) -> int:
        return sum(self._waiting.values())

    def head(self) -> tuple[str, int] | None:
        return next(iter(self._waiting.items()), None)

    def place_head(self, loads: Sequence[DecodeLoad],
                   handoff_s: Callable[[str], Sequence[float]] | None = None
                   ) -> tuple[str, Placement] | None:
        """The head and where its KV fits now, or None (empty, or it must wait);
        `handoff_s(request_id)`: its hand-off time to each instance."""
        head = self.head()
        if head is None:
            return None
        placement = choose_decode_instances(
            loads, head[1], self.capacity_tokens, self.max_batch, self.max_sp,
            None if handoff_s is None else handoff_s(head[0]))
        return None if placement is None else (head[0], placement)

    def pop(self) -> str:
        return self._waiting.popitem(last=False)[0]
