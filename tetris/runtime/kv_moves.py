"""Which KV tokens go where when a prefilled request moves to its decode instance(s).

The prompt's KV sits on the ranks of its last prefill chunk (`held`: rank → tokens, in the
rank's append order). The decode dispatcher picks the decode instances; the tokens generated
during decode are appended on the lead (`dests[0]`), so the prompt's KV fills the other
instances first (up to their free room) and the lead takes the rest plus room for
`generation_tokens` of its own.

Moves are returned sorted by (source, destination): every sender and receiver walks them in
that one order, which keeps blocking point-to-point transfers free of deadlock; a source sends
consecutive runs of its KV in that order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KVMove:
    source: int
    dest: int
    tokens: int


def plan_kv_moves(held: Mapping[int, int], dests: Sequence[int], rooms: Sequence[int],
                  generation_tokens: int) -> tuple[list[KVMove], list[int]]:
    """`held`: source rank → prompt tokens held; `rooms[i]`: free KV tokens on `dests[i]`.
    Returns the moves and the tokens to reserve on each destination. Raises ValueError if the
    rooms cannot hold the prompt plus the lead's generation room."""
    if len(dests) != len(rooms) or not dests:
        raise ValueError("dests and rooms must be non-empty and of equal length")
    prompt = sum(held.values())
    room = [*rooms]
    room[0] -= generation_tokens
    if room[0] < 0 or sum(max(r, 0) for r in room) < prompt:
        raise ValueError(f"decode rooms {list(rooms)} cannot hold {prompt} prompt tokens "
                         f"plus {generation_tokens} generated on the lead")
    reserve = [0] * len(dests)
    reserve[0] = generation_tokens
    order = [*range(1, len(dests)), 0]
    moves: list[KVMove] = []
    slot = 0
    for source in sorted(held):
        left = held[source]
        while left:
            while room[order[slot]] <= 0:
                slot += 1
            d = order[slot]
            n = min(left, room[d])
            moves.append(KVMove(source, dests[d], n))
            room[d] -= n
            reserve[d] += n
            left -= n
    return sorted(moves, key=lambda m: (m.source, m.dest)), reserve
