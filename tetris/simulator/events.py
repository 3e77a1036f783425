"""The simulator's event queue: a heap keyed by `(time, priority, seq)`.

Events at the same time are taken in priority order — work finishing first, then instance
failures and recoveries, then arrivals, then scheduling decisions — so a decision sees every
completion, failure and arrival of its instant; `seq` (insertion order) breaks the remaining ties,
which keeps runs deterministic.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

# Same-time order: completions free resources before arrivals join the queue, and a decision
# runs only after both (one decision per instant, not one per event). A chunk that ends at the
# very instant its instance fails counts as done: failures come after completions.
PRIORITY_COMPLETE = 0
PRIORITY_FAILURE = 1
PRIORITY_ARRIVAL = 2
PRIORITY_DECIDE = 3

Event = tuple[float, int, int, str, Any]

# The disaggregated simulator's own kinds (the decode pool's are in `decode_pool`).
ARRIVAL = "arrival"
CHUNK_END = "chunk_end"
DECIDE = "decide"


class EventQueue:
    """Min-heap of `(time_s, priority, seq, kind, payload)` tuples (plain tuples: hot loop)."""

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[Event] = []
        self._seq = itertools.count()

    def push(self, time_s: float, priority: int, kind: str, payload: Any = None) -> None:
        if time_s != time_s:  # NaN would corrupt the heap order silently
            raise ValueError(f"event {kind!r} has time NaN")
        heapq.heappush(self._heap, (time_s, priority, next(self._seq), kind, payload))

    def pop(self) -> Event:
        return heapq.heappop(self._heap)

    def cancel(self, matches: Callable[[Event], bool]) -> list[Event]:
        """Remove every pending event `matches` selects and return them (in heap order).

        O(events): for rare interruptions (an instance failure), so that the hot loop never
        checks whether an event still stands."""
        gone: list[Event] = []
        kept: list[Event] = []
        for e in self._heap:
            (gone if matches(e) else kept).append(e)
        if gone:
            heapq.heapify(kept)
            self._heap = kept
        return gone

    def peek_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)
