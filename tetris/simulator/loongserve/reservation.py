"""LoongServe's memory admission test, re-implemented for the simulator (no code copied).

Their `router/req_queue.py` `_can_add_new_req`: the peak KV of the admitted requests if every
one runs to its full output, sorted by tokens left (lightllm's estimate, which LoongServe keeps).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

_NEG = -(1 << 62)  # "no entry" in the reservation's max arrays (every real term is >= 0)


class Reservation:
    """Peak KV tokens of a set of requests that all decode to their last token.

    Each entry is (tokens held now, tokens still to come). Sorted by tokens to come, descending,
    the k-th entry's finish is the worst moment: left_k·k + Σ_{j≤k} held_j; the peak is the max
    over k. Prefix/suffix maxima make the test for one more entry O(log n) — the admission loop
    runs it for every waiting request."""

    __slots__ = ("_cum", "_entries", "_keys", "_prefix", "_suffix")

    def __init__(self, entries: Iterable[tuple[int, int]] = ()) -> None:
        self.reset(entries)

    def reset(self, entries: Iterable[tuple[int, int]]) -> None:
        self._entries = sorted(entries, key=lambda e: -e[1])
        self._rebuild()

    def _rebuild(self) -> None:
        entries = self._entries
        n = len(entries)
        self._keys = [-left for _, left in entries]
        cum = [0] * (n + 1)
        prefix = [_NEG] * (n + 1)
        terms = [0] * n
        for j, (held, left) in enumerate(entries):
            cum[j + 1] = cum[j] + held
            terms[j] = left * (j + 1) + cum[j + 1]
            prefix[j + 1] = max(prefix[j], terms[j])
        suffix = [_NEG] * (n + 1)
        for j in range(n - 1, -1, -1):
            suffix[j] = max(suffix[j + 1], terms[j] + entries[j][1])
        self._cum, self._prefix, self._suffix = cum, prefix, suffix

    def __len__(self) -> int:
        return len(self._entries)

    def peak_with(self, held: int, left: int) -> int:
        """The peak if (held, left) joined: entries before it keep their term, entries after it
        move one place down (one more `left` each) and all of those gain its `held`."""
        p = bisect.bisect_right(self._keys, -left)  # after equal lefts, as their stable sort
        own = left * (p + 1) + self._cum[p] + held
        return max(self._prefix[p], own, self._suffix[p] + held, 0)

    def add(self, held: int, left: int) -> None:
        p = bisect.bisect_right(self._keys, -left)
        self._entries.insert(p, (held, left))
        self._rebuild()
