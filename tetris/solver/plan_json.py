"""The plan JSON contract: what `tetris plan --format json` prints and `/v1/tetris/plan` returns.

Every time is in seconds relative to the decision time (now = 0), so a report reads the same
whatever clock the executor runs on. Consumers must ignore fields they do not know: every model
accepts extras, so producers can add fields without breaking older readers.

    {"solver": {"name", "status", "wall_ms", "objective", "bound", "stats"},
     "availability_s": [...],
     "plans": [{"request_id", "arrival_s", "prompt_tokens", "prefill_end_s",
                "ttft_s", "ttft_slo_s", "slo_slack_s",
                "chunks": [{"start_token", "end_token", "instances", "start_s", "end_s"}]}]}
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tetris.solver.input_files import describe_validation
from tetris.solver.plan import SolveResult
from tetris.solver.problem import Problem

Status = Literal["optimal", "feasible", "infeasible", "no_solution"]
_CONFIG = ConfigDict(extra="allow", allow_inf_nan=False)


class ChunkOut(BaseModel):
    """Tokens [start_token, end_token) prefilled on `instances` during [start_s, end_s)."""

    model_config = _CONFIG

    start_token: int = Field(ge=0)
    end_token: int = Field(gt=0)
    instances: list[int] = Field(min_length=1)
    start_s: float
    end_s: float

    @property
    def sp(self) -> int:
        return len(self.instances)

    @property
    def tokens(self) -> int:
        return self.end_token - self.start_token


class RequestPlanOut(BaseModel):
    """One request's plan. `slo_slack_s` = SLO − TTFT: negative means the SLO is missed."""

    model_config = _CONFIG

    request_id: str
    arrival_s: float
    prompt_tokens: int = Field(gt=0)
    prefill_end_s: float
    ttft_s: float
    ttft_slo_s: float = Field(gt=0)
    slo_slack_s: float
    chunks: list[ChunkOut] = Field(min_length=1)

    @property
    def meets_slo(self) -> bool:
        return self.slo_slack_s >= 0


class SolverInfo(BaseModel):
    """`bound` is a lower bound on `objective` over the solver's search space, when known."""

    model_config = _CONFIG

    name: str
    status: Status
    wall_ms: float = Field(ge=0)
    objective: float | None
    bound: float | None
    stats: dict[str, float | int | str] = Field(default_factory=dict)


class PlanReport(BaseModel):
    """`availability_s[g]`: when instance g is free of committed work (0 = free now)."""

    model_config = _CONFIG

    solver: SolverInfo
    availability_s: list[float]
    plans: list[RequestPlanOut]

    @property
    def num_instances(self) -> int:
        return len(self.availability_s)

    @model_validator(mode="after")
    def _consistent(self) -> PlanReport:
        # A reader draws and tabulates the chunks: an instance outside the cluster or a chunk
        # ending before it starts would break it far from where the report came in.
        n = self.num_instances
        for plan in self.plans:
            for k, c in enumerate(plan.chunks):
                where = f"plan {plan.request_id!r} chunk {k}"
                if c.end_token <= c.start_token:
                    raise ValueError(f"{where}: end_token ({c.end_token}) must be > "
                                     f"start_token ({c.start_token})")
                if c.end_s < c.start_s:
                    raise ValueError(f"{where}: end_s ({c.end_s}) is before start_s "
                                     f"({c.start_s})")
                bad = [g for g in c.instances if not 0 <= g < n]
                if bad or len(set(c.instances)) != len(c.instances):
                    raise ValueError(f"{where}: instances must be distinct, in [0, {n}), got "
                                     f"{c.instances[:8]}")
        return self


def parse_plan_report(body: str | bytes, source: str) -> PlanReport:
    """A plan report from its JSON text; ValueError "SOURCE: field: what is wrong" on one line
    (invalid JSON and invalid UTF-8 included)."""
    try:
        return PlanReport.model_validate_json(body)
    except ValidationError as err:
        raise ValueError(f"{source}: {describe_validation(err)}") from None


def _finite(x: float | None) -> float | None:
    # JSON has no infinity; an infinite bound or objective carries no information anyway.
    return x if x is not None and math.isfinite(x) else None


def report_from_result(problem: Problem, result: SolveResult) -> PlanReport:
    """The report of one solve, times shifted so that `problem.now_s` is 0."""
    now = problem.now_s
    plans: list[RequestPlanOut] = []
    for plan in result.plans:
        request = problem.requests[problem.index_of[plan.request_id]]
        ttft = plan.prefill_end_s - request.arrival_s
        chunks = [
            ChunkOut(
                start_token=c.start_token,
                end_token=c.end_token,
                instances=list(c.instances),
                start_s=c.start_s - now,
                end_s=c.end_s - now,
            )
            for c in plan.chunks
        ]
        plans.append(
            RequestPlanOut(
                request_id=plan.request_id,
                arrival_s=request.arrival_s - now,
                prompt_tokens=request.prompt_tokens,
                prefill_end_s=plan.prefill_end_s - now,
                ttft_s=ttft,
                ttft_slo_s=request.ttft_slo_s,
                slo_slack_s=request.ttft_slo_s - ttft,
                chunks=chunks,
            )
        )
    solver = SolverInfo(
        name=result.solver,
        status=result.status.value,
        wall_ms=result.wall_ms,
        objective=_finite(result.objective),
        bound=_finite(result.bound),
        stats=dict(result.stats),
    )
    # An instance that freed up before now is simply free now: never report a negative time.
    availability = [problem.free_at(g) - now for g in range(problem.num_instances)]
    return PlanReport(solver=solver, availability_s=availability, plans=plans)
