"""What a prefill policy sees and returns at a decision instant.

A policy gets a `PrefillView` (built by the `Ledger` from executor events: instance availability,
pending requests with their progress, recent load) and returns a `Decision`: the chunks to
launch now and how long deciding took. Executors launch them only after that time has passed, so
a slow planner pays for its thinking.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tetris.solver.cost_model import CostModel
from tetris.solver.plan import ChunkSpec, RequestPlan, SolveResult
from tetris.solver.policy.settings import PolicySettings
from tetris.solver.problem import PendingRequest, Problem

START_TOL_S = 1e-9


class SolverClock(enum.Enum):
    """How a decision's own time is charged to the executor's clock."""

    MEASURED = "measured"  # the measured wall time (the runtime; honest, not reproducible)
    MODELED = "modeled"  # a deterministic model of it (reproducible; see cdsp.GREEDY_*)
    FREE = "free"  # zero: an idealised, infinitely fast planner (ablation only)


@dataclass(frozen=True, slots=True)
class PrefillView:
    now_s: float
    # An instance still running a chunk is available from its planned end (never at or before
    # now, even if the chunk overran its plan).
    availability_s: tuple[float, ...]
    idle: tuple[bool, ...]
    # Requests with prompt left to prefill, in arrival order; one whose chunk is running has
    # `ready_s` after now.
    pending: tuple[PendingRequest, ...]
    load: float  # recent share of prefill instances busy, in [0, 1]


@dataclass(frozen=True, slots=True)
class Launch:
    """Start `chunk` of request `request_id` now."""

    request_id: str
    chunk: ChunkSpec


@dataclass
class Decision:
    launches: list[Launch] = field(default_factory=list)
    solver_s: float = 0.0
    plans_validated: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    # The plan behind the launches (receding horizon: the rest is re-planned later); what the
    # runtime shows at /v1/tetris/plan.
    problem: Problem | None = None
    result: SolveResult | None = None


class PrefillPolicy(Protocol):
    name: str
    cost_model: CostModel
    settings: PolicySettings

    def decide(self, view: PrefillView) -> Decision: ...


def startable(view: PrefillView) -> bool:
    """Anything at all can start now: an idle instance and a request not mid-chunk."""
    return any(view.idle) and any(
        r.ready_s is None or r.ready_s <= view.now_s for r in view.pending
    )


def launches_now(view: PrefillView, plans: Sequence[RequestPlan]) -> list[Launch]:
    """The chunks of `plans` that start at the decision instant (receding horizon)."""
    out = []
    for plan in plans:
        first = plan.chunks[0]
        if first.start_s <= view.now_s + START_TOL_S and all(view.idle[g] for g in first.instances):
            out.append(Launch(plan.request_id, first.spec))
    return out


@dataclass
class LoadTracker:
    """The recent share of prefill instances busy (`PrefillView.load`, behind λ): an
    exponential average over time with memory `tau_s`."""

    tau_s: float
    load: float = 0.0
    t: float = 0.0

    def update(self, now: float, busy_share: float) -> float:
        dt = now - self.t
        if dt > 0:
            self.load += -math.expm1(-dt / self.tau_s) * (busy_share - self.load)
            self.t = now
        return self.load
