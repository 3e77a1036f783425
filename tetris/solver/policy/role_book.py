"""The roles of an elastic cluster's GPUs and the ledger changes that move them: the one core
both executors drive (`tetris.simulator.roles` on simulated time, `tetris.runtime.roles` on
the wall clock), so a role decision means the same in both.

GPU g is prefill instance g and decode instance g of the `Ledger` (an elastic ledger), one of
them parked at any time. Applying a checked `RoleDecision`:

- to decode: the GPU's prefill instance parks (it is idle and holds no KV of a request still
  prefilling: checked again, as the GPU may have been given work since the decision) and its
  decode instance opens to the dispatcher at once;
- to prefill: the decode instance takes no new requests (`TO_PREFILL`, `draining`); once the
  last request on it is gone (finished, or its KV moved away by the runtime) `settle` parks it
  and the prefill instance serves.

`timeline` records (time, prefilling, decoding, draining) at the start and after every change.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Sequence

from tetris.solver.policy.ledger import Ledger
from tetris.solver.policy.roles import (
    DECODE,
    PREFILL,
    TO_PREFILL,
    RoleDecision,
    RoleSignals,
    RoleState,
    check_role_decision,
    initial_roles,
    leaving_node,
    prefill_target,
    role_counts,
)

RECENT = 256  # arrivals whose SLO scale and prefill width the planners read
WIDTH_QUANTILE = 0.9  # the attainment target: the width nine in ten recent requests need


class RoleBook:
    def __init__(self, ledger: Ledger, initial_prefill: int, nodes: Sequence[int],
                 tau_s: float, on_change: Callable[[int, str], None] | None = None) -> None:
        gpus = len(ledger.busy)
        if not ledger.elastic or len(ledger.decode_reserved) != gpus:
            raise ValueError("elastic roles need an elastic ledger with one prefill and one "
                             "decode instance per GPU")
        self.ledger = ledger
        self.gpus = gpus
        self.roles = initial_roles(gpus, initial_prefill)
        self.changed = [-math.inf] * gpus
        self.nodes = tuple(nodes) or (0,) * gpus
        self.signals = RoleSignals(tau_s)
        self.draining: set[int] = set()
        self.on_change = on_change  # (GPU, its new role), after each change
        self.decode_floor = 1
        self.prefill_target = 1.0  # `roles.prefill_target` of the requests' TTFT SLO scale
        self.prefill_width = 1  # prefill GPUs recent requests need to meet their TTFT SLO
        self._scales: deque[float] = deque(maxlen=RECENT)
        self._widths: deque[int] = deque(maxlen=RECENT)
        self.pending_to_decode = 0  # GPUs to take for decode at their chunk ends
        for g, role in enumerate(self.roles):
            if role == PREFILL:
                ledger.close_decode(g)
            else:
                ledger.park(g)
        self.timeline: list[tuple[float, int, int, int]] = [(0.0, *role_counts(self.roles))]
        self.changes = 0

    def set_decode_floor(self, largest_kv: int, kv_capacity: int) -> None:
        """At least enough decode GPUs for the largest request's KV always take requests;
        ValueError if that leaves no GPU to prefill."""
        self.decode_floor = max(1, -(-largest_kv // kv_capacity))
        if self.decode_floor > self.gpus - 1:
            raise ValueError(f"the largest request needs {self.decode_floor} decode GPUs: an "
                             f"elastic cluster of {self.gpus} GPUs cannot also prefill")

    def arrived(self, prompt_tokens: int, decode_kv: int, ttft_slo_s: float,
                seconds_on: Callable[[int, int], float], isolated_s: float) -> None:
        """A request arrived: `seconds_on(tokens, gpus)` its prefill alone on that many GPUs,
        `isolated_s` its SLO's reference TTFT. Updates the rates, the prefill target (the
        median SLO scale of recent arrivals) and width (the GPUs that nine in ten recent
        arrivals need to prefill within their TTFT SLO alone: fewer prefill GPUs than that
        misses them however idle the pool is)."""
        self.signals.arrived(seconds_on(prompt_tokens, 1), decode_kv)
        self._scales.append(ttft_slo_s / isolated_s if isolated_s > 0 else math.inf)
        self.prefill_target = prefill_target(statistics.median(self._scales))
        width = next((k for k in range(1, self.gpus) if seconds_on(prompt_tokens, k)
                      <= ttft_slo_s), self.gpus - 1)
        self._widths.append(width)
        ranked = sorted(self._widths)
        self.prefill_width = ranked[min(len(ranked) - 1, int(WIDTH_QUANTILE * len(ranked)))]

    def state(self, now: float, *, chunk_seconds: Callable[[int, int], float],
              kv_capacity: int, waiting_kv: int, decode_kv_of: Callable[[str], int]
              ) -> RoleState:
        """The planner's view: `chunk_seconds(tokens, prefix)` one GPU's prefill time,
        `waiting_kv` the decode KV of prefilled requests waiting for room, `decode_kv_of(id)`
        the decode KV a request will reserve."""
        ledger = self.ledger
        backlog = 0.0
        coming = 0
        streaming = [False] * self.gpus
        for e in ledger.prefill.values():
            if e.decode is not None:
                for j in e.decode[0]:
                    streaming[j] = True
            left = e.prompt_tokens - e.prefilled
            if left > 0:
                backlog += chunk_seconds(left, e.prefilled)
            if e.decode is None:
                coming += decode_kv_of(e.request_id)
        roles = tuple(self.roles)
        busy = sum(ledger.busy_s)
        done = self.signals.arrived_work - backlog
        efficiency = min(1.0, max(0.05, done / busy)) if busy > 0 and done > 0 else 1.0
        free = tuple(r == PREFILL and ledger.may_park(g) for g, r in enumerate(roles))
        s = self.signals
        return RoleState(
            now, roles, tuple(self.changed), free, tuple(ledger.decode_reserved), kv_capacity,
            backlog, waiting_kv, coming, s.prefill_rate, s.kv_in_rate, s.kv_out_rate,
            self.decode_floor, efficiency, tuple(streaming), self.nodes, self.prefill_target,
            self.prefill_width)

    def apply(self, decision: RoleDecision, state: RoleState, now: float) -> RoleDecision:
        """The decision as far as it still holds in `state` (now; work may have come since it
        was made), checked again before anything changes; returns what was applied."""
        now_free = tuple(g for g in decision.to_decode if state.prefill_free[g])
        serving_decode = state.count(DECODE) + len(now_free)
        to_prefill = []
        for g in decision.to_prefill:
            if state.roles[g] == DECODE and serving_decode > state.decode_floor:
                to_prefill.append(g)
                serving_decode -= 1
        # A GPU given work since the decision counts towards those taken as they free.
        still = RoleDecision(now_free, tuple(to_prefill), more_to_decode=min(
            decision.more_to_decode + len(decision.to_decode) - len(now_free),
            max(0, state.count(PREFILL) - len(now_free) - 1)))
        check_role_decision(still, state)
        self.pending_to_decode = still.more_to_decode
        ledger = self.ledger
        for g in still.to_decode:
            ledger.park(g)
            ledger.open_decode(g)
            self._set(g, DECODE, now)
        for g in still.to_prefill:
            ledger.close_decode(g)
            self._set(g, TO_PREFILL, now)
            self.draining.add(g)
        return still

    def take_freed(self, instances: Sequence[int], now: float) -> int:
        """Take GPUs still wanted for decode as their chunk ends, before the next decision
        gives them work again; how many were taken."""
        ledger = self.ledger
        taken = 0
        for g in sorted(instances, reverse=True):
            if self.pending_to_decode <= 0:
                break
            if self.roles[g] == PREFILL and ledger.may_park(g) and \
                    self.nodes[g] == leaving_node(self.roles, self.nodes) and \
                    sum(r == PREFILL for r in self.roles) > 1:
                ledger.park(g)
                ledger.open_decode(g)
                self._set(g, DECODE, now)
                self.pending_to_decode -= 1
                taken += 1
        return taken

    def settle(self, now: float) -> list[int]:
        """Draining GPUs whose last request is gone turn to prefill; which did."""
        ledger = self.ledger
        done = sorted(g for g in self.draining if ledger.decode_empty(g))
        for g in done:
            self.draining.discard(g)
            ledger.unpark(g)
            self._set(g, PREFILL, now)
        return done

    def _set(self, gpu: int, role: str, now: float) -> None:
        self.roles[gpu] = role
        self.changed[gpu] = now
        self.changes += 1
        self.timeline.append((now, *role_counts(self.roles)))
        if self.on_change is not None:
            self.on_change(gpu, role)
