"""The simulator's event queue: a heap keyed by `(time, priority, seq)`.

Events at the same time are taken in priority order — work finishing first, then arrivals, then
scheduling decisions — so a decision sees every completion and arrival of its instant; `seq`
(insertion order) breaks the remaining ties, which keeps runs deterministic.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any

# Same-time order: completions free resources before arrivals join the queue, and a decision
# runs only after both (one decision per instant, not one per event).
PRIORITY_COMPLETE = 0
PRIORITY_ARRIVAL = 1
PRIORITY_DECIDE = 2


class EventQueue:
    """Min-heap of `(time_s, priority, seq, kind, payload)` tuples (plain tuples: hot loop)."""

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, str, Any]] = []
        self._seq = itertools.count()

    def push(self, time_s: float, priority: int, kind: str, payload: Any = None) -> None:
        if time_s != time_s:  # NaN would corrupt the heap order silently
            raise ValueError(f"event {kind!r} has time NaN")
        heapq.heappush(self._heap, (time_s, priority, next(self._seq), kind, payload))

    def pop(self) -> tuple[float, int, int, str, Any]:
        return heapq.heappop(self._heap)

    def peek_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)
