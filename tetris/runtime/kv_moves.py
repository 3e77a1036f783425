"""Which KV tokens go where when a prefilled request moves to its decode instance(s).

The prompt's KV sits on the ranks of its last prefill chunk (`held`: rank → tokens, in the
rank's append order). The decode dispatcher picks the decode instances; the tokens generated
during decode are appended on the lead (`dests[0]`), so the prompt's KV fills the other
instances first (up to their free room) and the lead takes the rest plus room for
`generation_tokens` of its own.

Moves are returned sorted by (source, destination): every sender and receiver walks them in
that one order, which keeps blocking point-to-point transfers free of deadlock; a source sends
consecutive runs of its KV in that order.

Elastic roles (one actor per GPU, its prefill rank and its decode rank on one KV cache): a
source whose own GPU is a destination (`home`) keeps what fits of its KV there (a local copy,
no transfer) before the rest is filled as above. So a GPU either sends to others (its own room
is full) or receives from others (it kept all of its own), never both in one hand-off: no two
GPUs wait on each other's send.

Streamed (a request placed on decode while it prefills): the shares are fixed at placement for
the whole prompt (`stream_shares`, the same fill as above), and each finished chunk's KV is
routed into what is left of them (`KVRoute`), each source sending the run of its KV that
follows what it sent before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class KVMove:
    source: int
    dest: int
    tokens: int


def plan_kv_moves(held: Mapping[int, int], dests: Sequence[int], rooms: Sequence[int],
                  generation_tokens: int, home: Mapping[int, int] | None = None
                  ) -> tuple[list[KVMove], list[int]]:
    """`held`: source rank → prompt tokens held; `rooms[i]`: free KV tokens on `dests[i]`;
    `home`: source rank → the destination rank on its own GPU (elastic roles). Returns the
    moves and the tokens to reserve on each destination. Raises ValueError if the rooms cannot
    hold the prompt plus the lead's generation room."""
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
    left_of = dict(held)
    index = {d: i for i, d in enumerate(dests)}
    for source, own in (home or {}).items():
        i = index.get(own)
        if i is None or source not in left_of:
            continue
        n = min(left_of[source], max(room[i], 0))
        if n:
            moves.append(KVMove(source, own, n))
            room[i] -= n
            reserve[i] += n
            left_of[source] -= n
    slot = 0
    for source in sorted(left_of):
        left = left_of[source]
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


def stream_shares(prompt_tokens: int, rooms: Sequence[int], generation_tokens: int) -> list[int]:
    """Prompt tokens each destination takes (`rooms[i]`: its free KV tokens, the lead first)
    when the KV is streamed in: the fill of `plan_kv_moves`, non-leads first. Add
    `generation_tokens` to the lead's share for its reservation. ValueError if they do not fit."""
    _, reserve = plan_kv_moves({0: prompt_tokens}, range(len(rooms)), rooms, generation_tokens)
    reserve[0] -= generation_tokens
    return reserve


@dataclass(frozen=True, slots=True)
class KVBatch:
    """One streamed transfer: `moves` (sorted by (source, destination)); source s sends its KV
    tokens from index `starts[s]` of its append order on; destination d first takes `reserve[d]`
    tokens of room (its whole reservation, on the first batch it is in)."""

    moves: tuple[KVMove, ...]
    starts: Mapping[int, int]
    reserve: Mapping[int, int]

    @property
    def receivers(self) -> list[int]:
        return sorted({m.dest for m in self.moves} | set(self.reserve))


@dataclass
class KVRoute:
    """Where a streamed request's KV goes, batch by batch. `dests`: ranks, the lead first;
    `shares[i]`: prompt tokens `dests[i]` takes; `reserve[i]`: its room (the lead's includes
    the tokens it will generate)."""

    dests: tuple[int, ...]
    shares: list[int]
    reserve: list[int]
    sent: dict[int, int] = field(default_factory=dict)  # source -> its KV tokens sent so far
    _left: list[int] = field(default_factory=list)
    _reserved: bool = False

    def __post_init__(self) -> None:
        self._left = list(self.shares)

    @property
    def done(self) -> bool:
        """Every prompt token has been routed."""
        return not any(self._left)

    def next_batch(self, finished: Mapping[int, int]) -> KVBatch | None:
        """The batch sending what sources hold beyond what they sent (`finished[s]`: KV tokens
        of source s's finished chunks); None when there is nothing new."""
        starts = {s: self.sent.get(s, 0) for s in sorted(finished)
                  if finished[s] > self.sent.get(s, 0)}
        if not starts:
            return None
        order = [*range(1, len(self.dests)), 0]  # the lead last: it keeps room to generate
        moves: list[KVMove] = []
        for s, start in starts.items():
            left = finished[s] - start
            for i in order:
                n = min(left, self._left[i])
                if n:
                    moves.append(KVMove(s, self.dests[i], n))
                    self._left[i] -= n
                    left -= n
            if left:
                raise ValueError(f"source {s} holds {left} more KV tokens than the shares take")
            self.sent[s] = finished[s]
        reserve = {} if self._reserved else dict(zip(self.dests, self.reserve, strict=True))
        self._reserved = True
        return KVBatch(tuple(sorted(moves, key=lambda m: (m.source, m.dest))), starts, reserve)
