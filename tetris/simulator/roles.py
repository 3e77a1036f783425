"""Elastic roles in the disaggregated simulator: every GPU of an elastic cluster
(`ClusterSpec.elastic`) is prefill instance g and decode instance g of the ledger, one of them
parked at any time.

Every `role_interval_s` a `ROLE_TICK` builds the planner's `RoleState` from the ledger and the
decode pool and asks the role planner (`tetris.solver.policy.roles`); its decision is checked
and applied at `ROLE_APPLY`, after the planner's own time. Applying it:

- to decode: the GPU's prefill instance parks (it is idle and holds no KV of a request still
  prefilling: checked again, as the GPU may have been given work since) and its decode
  instance opens to the dispatcher at once, with the room the prefilled requests' KV still
  there leaves (that KV leaves by its hand-off; to this very GPU, a local copy);
- to prefill: the decode instance stops taking requests; when the last request on it is gone
  (`settle`, after every decode event while some GPU drains) it parks and the prefill instance
  serves.

`timeline` records (time, prefilling, decoding, draining) at the start and after every change:
the roles-over-time plot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tetris.simulator.events import PRIORITY_DECIDE
from tetris.solver.policy.roles import (
    DECODE,
    PREFILL,
    TO_PREFILL,
    RoleDecision,
    RolePlanner,
    RoleSignals,
    RoleState,
    check_role_decision,
    initial_roles,
    leaving_node,
    role_counts,
)
from tetris.solver.policy.view import SolverClock

if TYPE_CHECKING:  # the simulator imports this module
    from tetris.simulator.disaggregated import DisaggregatedSimulator
    from tetris.simulator.records import SimRequest

ROLE_TICK = "role_tick"
ROLE_APPLY = "role_apply"
#: The optimizer's modelled decision time (a reproducible clock): its measured mean CP-SAT
#: solve at 16 GPUs and a 10-step horizon was 2.8-3.6 ms (benchmarks/elastic_roles.py).
MODELED_ROLE_SOLVE_S = 0.005


class RoleExecutor:
    def __init__(self, sim: DisaggregatedSimulator, planner: RolePlanner, initial_prefill: int,
                 clock: SolverClock) -> None:
        cluster = sim.cost_model.cluster
        if not cluster.elastic:
            raise ValueError("elastic roles need an elastic cluster (ClusterSpec.elastic)")
        settings = sim.policy.settings
        self.sim, self.planner, self.clock = sim, planner, clock
        self.gpus = cluster.prefill_instances
        self.roles = initial_roles(self.gpus, initial_prefill)
        self.changed = [-math.inf] * self.gpus
        self.interval_s = settings.role_interval_s
        self.nodes = cluster.prefill_node_of
        self.signals = RoleSignals(settings.role_tau_s)
        self.draining: set[int] = set()
        ledger = sim.ledger
        for g, role in enumerate(self.roles):
            if role == PREFILL:
                ledger.close_decode(g)
            else:
                ledger.park(g)
        self.timeline: list[tuple[float, int, int, int]] = [(0.0, *role_counts(self.roles))]
        self.changes = 0
        self.decisions = 0
        self.solver_s = 0.0  # charged to the clock
        self.wall_s = self.wall_max_s = 0.0  # measured
        self.arrivals_left = 0
        self.decode_floor = 1
        self.pending_to_decode = 0  # GPUs to take for decode at their chunk ends
        # Decode KV each request will reserve (its prompt and every output token).
        self.decode_kv = {r.request_id: r.prompt_tokens + r.output_tokens
                          for r in (rec.request for rec in sim.records)}

    def schedule(self, requests: Sequence[SimRequest]) -> None:
        """The first tick; `decode_floor` from the largest request's decode KV."""
        self.arrivals_left = len(requests)
        cap = self.sim.cost_model.kv_capacity_tokens
        self.decode_floor = max((-(-(r.prompt_tokens + r.output_tokens) // cap)
                                 for r in requests), default=1)
        if self.decode_floor > self.gpus - 1:
            raise ValueError(f"the largest request needs {self.decode_floor} decode GPUs: an "
                             f"elastic cluster of {self.gpus} GPUs cannot also prefill")
        self.sim.events.push(0.0, PRIORITY_DECIDE, ROLE_TICK)

    def arrived(self, request: SimRequest) -> None:
        self.arrivals_left -= 1
        self.signals.arrived(self.sim.cost_model.chunk_seconds(request.prompt_tokens, 0, 1),
                             request.prompt_tokens + request.output_tokens)

    # -- events ---------------------------------------------------------------------------------
    def handle(self, kind: str, payload: object, now: float) -> None:
        if kind == ROLE_TICK:
            self._tick(now)
        else:
            assert isinstance(payload, RoleDecision)
            self._apply(payload, now)

    def _tick(self, now: float) -> None:
        sim = self.sim
        if not self.arrivals_left and not len(sim.ledger):
            return  # all served: no more ticks, so the run can end
        ledger = sim.ledger
        self.signals.update(now, ledger.decode_freed_total)
        state = self.state(now)
        decision = self.planner.decide(state)
        check_role_decision(decision, state)
        charged = {SolverClock.MEASURED: decision.solver_s, SolverClock.FREE: 0.0,
                   SolverClock.MODELED: MODELED_ROLE_SOLVE_S if decision.solver_s else 0.0
                   }[self.clock]
        self.decisions += 1
        self.solver_s += charged
        self.wall_s += decision.solver_s
        self.wall_max_s = max(self.wall_max_s, decision.solver_s)
        self.pending_to_decode = 0  # a new decision replaces what the last one still wanted
        if not decision.empty:
            sim.events.push(now + charged, PRIORITY_DECIDE, ROLE_APPLY, decision)
        sim.events.push(now + self.interval_s, PRIORITY_DECIDE, ROLE_TICK)

    def state(self, now: float) -> RoleState:
        sim, ledger = self.sim, self.sim.ledger
        cm = sim.cost_model
        backlog = 0.0
        coming = 0
        streaming = [False] * self.gpus
        for e in ledger.prefill.values():
            if e.decode is not None:
                for j in e.decode[0]:
                    streaming[j] = True
            left = e.prompt_tokens - e.prefilled
            if left > 0:
                backlog += cm.chunk_seconds(left, e.prefilled, 1)
            if e.decode is None:
                coming += self.decode_kv[e.request_id]
        roles = tuple(self.roles)
        busy = sum(ledger.busy_s)
        done = self.signals.arrived_work - backlog
        efficiency = min(1.0, max(0.05, done / busy)) if busy > 0 and done > 0 else 1.0
        free = tuple(r == PREFILL and ledger.may_park(g) for g, r in enumerate(roles))
        return RoleState(
            now, roles, tuple(self.changed), free, tuple(ledger.decode_reserved),
            cm.kv_capacity_tokens, backlog, sim.decode.queue.waiting_tokens, coming,
            self.signals.prefill_rate, self.signals.kv_in_rate, self.signals.kv_out_rate,
            self.decode_floor, efficiency, tuple(streaming), self.nodes)

    def _apply(self, decision: RoleDecision, now: float) -> None:
        """The decision as far as it still holds now (work may have come since it was made),
        checked again before anything changes."""
        state = self.state(now)
        serving_decode = state.count(DECODE)
        to_prefill = []
        for g in decision.to_prefill:
            if state.roles[g] == DECODE and serving_decode > 1:
                to_prefill.append(g)
                serving_decode -= 1
        now_free = tuple(g for g in decision.to_decode if state.prefill_free[g])
        # A GPU given work since the decision counts towards those taken as they free.
        still = RoleDecision(now_free, tuple(to_prefill), more_to_decode=min(
            decision.more_to_decode + len(decision.to_decode) - len(now_free),
            max(0, state.count(PREFILL) - len(now_free) - 1)))
        check_role_decision(still, state)
        self.pending_to_decode = still.more_to_decode
        ledger = self.sim.ledger
        for g in still.to_decode:
            ledger.park(g)
            ledger.open_decode(g)
            self._set(g, DECODE, now)
        for g in still.to_prefill:
            ledger.close_decode(g)
            self._set(g, TO_PREFILL, now)
            self.draining.add(g)
        if still.to_decode:
            self.sim.decode.dispatch(now)  # room for requests waiting
        self.settle(now)

    def chunk_ended(self, instances: tuple[int, ...], now: float) -> None:
        """Take GPUs still wanted for decode as their chunk ends, before the next decision
        gives them work again."""
        ledger = self.sim.ledger
        for g in sorted(instances, reverse=True):
            if self.pending_to_decode <= 0:
                return
            if self.roles[g] == PREFILL and ledger.may_park(g) and \
                    self.nodes[g] == leaving_node(self.roles, self.nodes) and \
                    sum(r == PREFILL for r in self.roles) > 1:
                ledger.park(g)
                ledger.open_decode(g)
                self._set(g, DECODE, now)
                self.pending_to_decode -= 1
                self.sim.decode.dispatch(now)

    def settle(self, now: float) -> None:
        """Draining GPUs whose last request is gone turn to prefill."""
        ledger = self.sim.ledger
        done = [g for g in self.draining if ledger.decode_empty(g)]
        for g in sorted(done):
            self.draining.discard(g)
            ledger.unpark(g)
            self._set(g, PREFILL, now)
        if done:
            self.sim.want_decision(now)

    def _set(self, gpu: int, role: str, now: float) -> None:
        self.roles[gpu] = role
        self.changed[gpu] = now
        self.changes += 1
        self.timeline.append((now, *role_counts(self.roles)))

    def stats(self) -> dict[str, float | int | str]:
        return {"role_changes": self.changes, "role_decisions": self.decisions,
                "role_solver_s": self.solver_s, "role_planner": self.planner.name,
                "role_planner_wall_s": self.wall_s, "role_planner_wall_max_s": self.wall_max_s}
