"""Elastic roles in the disaggregated simulator: every GPU of an elastic cluster
(`ClusterSpec.elastic`) is prefill instance g and decode instance g of the ledger, one of them
parked at any time; what a change does is `tetris.solver.policy.role_book.RoleBook`'s.

Every `role_interval_s` a `ROLE_TICK` builds the planner's `RoleState` from the ledger and the
decode pool and asks the role planner (`tetris.solver.policy.roles`); its decision is checked
and applied at `ROLE_APPLY`, after the planner's own time. A GPU turned to decode takes the
room the prefilled requests' KV still there leaves (that KV leaves by its hand-off; to this
very GPU, a local copy); a GPU turned to prefill drains: `settle` runs after every decode event
while some GPU drains, and its requests finish where they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tetris.simulator.events import PRIORITY_DECIDE
from tetris.solver.policy.role_book import RoleBook
from tetris.solver.policy.roles import (
    RoleDecision,
    RolePlanner,
    RoleState,
    check_role_decision,
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
        self.book = RoleBook(sim.ledger, initial_prefill, cluster.prefill_node_of,
                             settings.role_tau_s)
        self.interval_s = settings.role_interval_s
        self.decisions = 0
        self.solver_s = 0.0  # charged to the clock
        self.wall_s = self.wall_max_s = 0.0  # measured
        self.arrivals_left = 0
        # Decode KV each request will reserve (its prompt and every output token).
        self.decode_kv = {r.request_id: r.prompt_tokens + r.output_tokens
                          for r in (rec.request for rec in sim.records)}

    @property
    def roles(self) -> list[str]:
        return self.book.roles

    @property
    def draining(self) -> set[int]:
        return self.book.draining

    @property
    def timeline(self) -> list[tuple[float, int, int, int]]:
        return self.book.timeline

    @property
    def pending_to_decode(self) -> int:
        return self.book.pending_to_decode

    def schedule(self, requests: Sequence[SimRequest]) -> None:
        """The first tick; the decode floor from the largest request's decode KV."""
        self.arrivals_left = len(requests)
        cm = self.sim.cost_model
        self.book.set_decode_floor(max((r.prompt_tokens + r.output_tokens for r in requests),
                                       default=1), cm.kv_capacity_tokens)
        self.sim.events.push(0.0, PRIORITY_DECIDE, ROLE_TICK)

    def arrived(self, request: SimRequest) -> None:
        self.arrivals_left -= 1
        cm = self.sim.cost_model
        self.book.arrived(request.prompt_tokens, request.prompt_tokens + request.output_tokens,
                          request.ttft_slo_s, lambda n, k: cm.chunk_seconds(n, 0, k),
                          cm.best_isolated_ttft(request.prompt_tokens))

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
        self.book.signals.update(now, sim.ledger.decode_freed_total)
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
        self.book.pending_to_decode = 0  # a new decision replaces what the last still wanted
        if not decision.empty:
            sim.events.push(now + charged, PRIORITY_DECIDE, ROLE_APPLY, decision)
        sim.events.push(now + self.interval_s, PRIORITY_DECIDE, ROLE_TICK)

    def state(self, now: float) -> RoleState:
        cm = self.sim.cost_model
        return self.book.state(now, chunk_seconds=lambda n, prefix: cm.chunk_seconds(n, prefix, 1),
                               kv_capacity=cm.kv_capacity_tokens,
                               waiting_kv=self.sim.decode.queue.waiting_tokens,
                               decode_kv_of=self.decode_kv.__getitem__)

    def _apply(self, decision: RoleDecision, now: float) -> None:
        still = self.book.apply(decision, self.state(now), now)
        if still.to_decode:
            self.sim.decode.dispatch(now)  # room for requests waiting
        self.settle(now)

    def chunk_ended(self, instances: tuple[int, ...], now: float) -> None:
        """Take GPUs still wanted for decode as their chunk ends."""
        if self.book.take_freed(instances, now):
            self.sim.decode.dispatch(now)

    def settle(self, now: float) -> None:
        """Draining GPUs whose last request is gone turn to prefill."""
        if self.book.settle(now):
            self.sim.want_decision(now)

    def stats(self) -> dict[str, float | int | str]:
        return {"role_changes": self.book.changes, "role_decisions": self.decisions,
                "role_solver_s": self.solver_s, "role_planner": self.planner.name,
                "role_planner_wall_s": self.wall_s, "role_planner_wall_max_s": self.wall_max_s}
