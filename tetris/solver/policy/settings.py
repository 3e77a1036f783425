"""The policy's settings: one object with documented defaults, read by both executors.

The simulator (`SimConfig.policy_settings`) and the serving daemon (`ServeConfig.policy_settings`)
each build one `PolicySettings`; every policy, the ledger and the decode dispatcher read it, and
`problem` is the one place a planning `Problem` is built from it, so no setting is dropped when a
problem is rebuilt (time slicing, refinement, the baselines' validation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tetris.solver.cost_model import CostModel
from tetris.solver.objective import gpu_cost_weight_for_load
from tetris.solver.problem import (
    DEFAULT_BLOCK_TOKENS,
    DEFAULT_MISS_PENALTY,
    PendingRequest,
    Problem,
)


class PolicySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # -- planning ---------------------------------------------------------------------------
    block_tokens: int = Field(default=DEFAULT_BLOCK_TOKENS, gt=0, description="chunk "
                              "boundaries are multiples of this (the last chunk ends the prompt)")
    max_chunks: int | None = Field(default=None, gt=0, description="chunks per planned request "
                                   "(1 = one SP size per request); None = no cap")
    max_sp: int | None = Field(default=None, gt=0, description="largest SP group of a chunk; "
                               "None = every prefill instance")
    miss_penalty: float = Field(default=DEFAULT_MISS_PENALTY, ge=0, description="objective "
                                "price of one missed TTFT SLO (objective.py)")
    max_planned: int = Field(default=32, gt=0, description="requests planned per decision: "
                             "those holding KV plus the earliest deadlines")
    quantum_s: float | Literal["auto"] | None = Field(
        default="auto", description="longest launched chunk in seconds; 'auto' = "
        "AUTO_QUANTUM_OVERHEADS × a chunk's fixed cost; None = no time slicing")
    # -- solvers ----------------------------------------------------------------------------
    time_limit_ms: float = Field(default=20.0, gt=0, description="CP-SAT's budget per "
                                 "refinement (the `tetris` policy)")
    milp_time_limit_ms: float = Field(default=2000.0, gt=0, description="MILP budget per "
                                      "decision (`tetris-milp`)")
    refine: Literal["background", "before_launch"] = Field(
        default="background", description="CP-SAT off the decision path (refined plans used at "
        "a later decision), or before each launch (an ablation: its time delays launches)")
    refine_min_waiting: int = Field(default=2, gt=0, description="refine only when at least "
                                    "this many requests wait to start")
    # -- the planner's view of executing work -------------------------------------------------
    overrun_s: float = Field(default=1e-6, gt=0, description="a chunk past its planned end is "
                             "shown to the planner as ending this long after now")
    load_tau_s: float = Field(default=30.0, gt=0, description="memory of the prefill-load "
                              "average behind λ, the load-aware GPU cost (objective.py)")
    # -- baselines --------------------------------------------------------------------------
    static_sp: int = Field(default=4, gt=0, description="SP size of the static-sp policy")
    distserve_group: int = Field(default=2, gt=0, description="distserve's prefill group size")
    # -- decode dispatch --------------------------------------------------------------------
    decode_max_batch: int = Field(default=256, gt=0, description="sequences per decode "
                                  "instance")
    decode_max_sp: int | None = Field(default=None, gt=0, description="decode instances one "
                                      "request's KV may span; None = all")
    stream_kv: bool = Field(default=True, description="finished chunks' KV goes to decode "
                            "while later chunks compute; False: the whole prompt's KV after "
                            "the last chunk")

    # -- elastic roles ------------------------------------------------------------------------
    roles: Literal["fixed", "threshold", "optimizer"] = Field(
        default="fixed", description="instance roles: the fixed prefill/decode split, or every "
        "GPU serving either role as the load moves, decided by a threshold rule or by the "
        "CP-SAT role optimizer (roles.py)")
    role_interval_s: float = Field(default=2.0, gt=0, description="how often roles are "
                                   "re-decided")
    role_horizon_s: float = Field(default=20.0, gt=0, description="the role optimizer's "
                                  "look-ahead")
    role_dwell_s: float = Field(default=10.0, ge=0, description="a GPU keeps a new role at "
                                "least this long (hysteresis)")
    role_tau_s: float = Field(default=10.0, gt=0, description="memory of the recent rates the "
                              "role planners read")

    def check_cluster(self, prefill_instances: int, policy: str | None = None) -> None:
        """ValueError naming a setting that the cluster's prefill pool cannot honour: the
        shared ones (max_sp) and those of `policy` (a registry name; None: no policy chosen
        yet, so no policy's own setting is checked — a sweep or the CLI checks each policy
        it runs)."""
        if self.max_sp is not None and self.max_sp > prefill_instances:
            raise ValueError(f"max_sp ({self.max_sp}) exceeds the {prefill_instances} prefill "
                             "instances")
        baseline = {"static-sp": "static_sp", "distserve": "distserve_group"}
        for name in (v for k, v in baseline.items() if policy == k):
            value = getattr(self, name)
            if value > prefill_instances:
                raise ValueError(f"{name} ({value}) exceeds the {prefill_instances} prefill "
                                 "instances")
            if self.max_sp is not None and value > self.max_sp:
                raise ValueError(f"{name} ({value}) exceeds max_sp ({self.max_sp})")

    def problem(self, cost_model: CostModel, availability_s: Sequence[float],
                requests: Sequence[PendingRequest], now_s: float, load: float = 0.0) -> Problem:
        """The planning problem of one decision under these settings (λ from `load`)."""
        return Problem(cost_model, tuple(availability_s), tuple(requests), now_s=now_s,
                       block_tokens=self.block_tokens, max_chunks=self.max_chunks,
                       max_sp=self.max_sp, gpu_cost_weight=gpu_cost_weight_for_load(load),
                       miss_penalty=self.miss_penalty)
