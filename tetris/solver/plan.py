"""What planners return: per-request chunk plans, and the solve result around them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """Tokens [start_token, end_token) prefilled on `instances` during [start_s, end_s)."""

    start_token: int
    end_token: int
    instances: tuple[int, ...]
    start_s: float
    end_s: float

    @property
    def tokens(self) -> int:
        return self.end_token - self.start_token

    @property
    def sp(self) -> int:
        return len(self.instances)

    @property
    def gpu_seconds(self) -> float:
        return (self.end_s - self.start_s) * len(self.instances)


@dataclass(frozen=True, slots=True)
class RequestPlan:
    request_id: str
    chunks: tuple[ChunkPlan, ...]

    @property
    def prefill_end_s(self) -> float:
        return self.chunks[-1].end_s

    @property
    def gpu_seconds(self) -> float:
        return sum(c.gpu_seconds for c in self.chunks)


class SolveStatus(enum.Enum):
    OPTIMAL = "optimal"  # proved best within the planner's search space
    FEASIBLE = "feasible"  # a valid plan, optimality not proved
    INFEASIBLE = "infeasible"  # proved that no plan exists (e.g. KV cannot fit anywhere)
    NO_SOLUTION = "no_solution"  # nothing found within the time limit

    @property
    def has_plans(self) -> bool:
        return self in (SolveStatus.OPTIMAL, SolveStatus.FEASIBLE)


@dataclass(frozen=True)
class SolveResult:
    """`bound` is a lower bound on the objective over the planner's search space, when known."""

    solver: str
    status: SolveStatus
    objective: float | None
    bound: float | None
    wall_ms: float
    plans: tuple[RequestPlan, ...] = ()
    stats: dict[str, float | int | str] = field(default_factory=dict)
