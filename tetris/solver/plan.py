"""What planners return: per-request chunk plans, and the solve result around them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ChunkSpec:
    """Tokens [start_token, end_token) of one prompt on `instances`, without times: what a
    policy launches and what every rank of the group executes.

    The group splits the chunk so that causal attention work balances: 2·sp equal pieces, the
    member at index i taking pieces i and 2·sp−1−i (ring attention's "zigzag" split). Each
    member keeps the KV of the tokens it computed, so this split is also where the KV lies."""

    start_token: int
    end_token: int
    instances: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return self.end_token - self.start_token

    @property
    def sp(self) -> int:
        return len(self.instances)

    def piece_bounds(self, index: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The two token ranges the member at `index` of `instances` computes."""
        pieces = 2 * len(self.instances)
        start, n = self.start_token, self.end_token - self.start_token
        back = pieces - 1 - index
        return ((start + n * index // pieces, start + n * (index + 1) // pieces),
                (start + n * back // pieces, start + n * (back + 1) // pieces))

    def tokens_on(self, instance: int) -> int:
        """How many of the chunk's tokens `instance` computes and keeps the KV of."""
        if instance not in self.instances:
            return 0
        (a, b), (c, d) = self.piece_bounds(self.instances.index(instance))
        return b - a + d - c

    def kv_shares(self) -> dict[int, int]:
        return {g: self.tokens_on(g) for g in self.instances}


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

    @property
    def spec(self) -> ChunkSpec:
        return ChunkSpec(self.start_token, self.end_token, self.instances)


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
