"""A simulation's settings (pydantic: they come from the CLI, config files and sweep workers)
and what follows from them: the cost model of each architecture and every request's SLOs.

SLOs are fixed before any policy runs and are the same for every policy: a request's TTFT SLO is
`slo.ttft_scale` × its best isolated TTFT (one chunk, whole group free, best SP size) on a
reference group of `slo_reference_gpus` instances (default: one node), or `slo.ttft_s` when
absolute; the TBT SLO is `slo.tbt_s`. Tying the reference to a fixed group — not to a policy's
prefill pool — keeps the bar identical when sweeps change the prefill/decode split.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tetris.evaluation.workload import TraceRequest
from tetris.simulator.records import SimRequest
from tetris.solver.calibration import Calibration
from tetris.solver.cluster import ClusterSpec
from tetris.solver.cost_model import CostModel
from tetris.solver.hardware import load_hardware
from tetris.solver.model_spec import load_model_spec
from tetris.solver.policy.settings import PolicySettings
from tetris.solver.slo import SloSpec

DEFAULT_SLO = SloSpec(ttft_scale=5.0, tbt_s=0.1)


class SimConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(default="lwm-7b-1m", description="model preset or HF config.json/dir")
    hardware: str = Field(default="h100", description="hardware preset or HardwareSpec .json")
    calibration: str | None = Field(
        default=None, description="calibration JSON from `tetris profile` (replaces the "
        "datasheet coefficients)")
    prefill_instances: int = Field(default=8, gt=0)
    decode_instances: int = Field(default=8, gt=0)
    gpus_per_node: int = Field(default=8, gt=0)
    slo: SloSpec = DEFAULT_SLO
    slo_reference_gpus: int | None = Field(default=None, gt=0)
    tbt_criterion: Literal["mean", "p90", "p99", "max"] = "mean"
    seed: int = 0
    noise_cv: float = Field(default=0.0, ge=0)
    solver_clock: Literal["modeled", "measured", "free"] = "modeled"
    policy: PolicySettings = Field(default_factory=PolicySettings, description="the "
                                   "policies' settings, shared with `tetris serve`")
    loongserve_dp: Literal["released", "full"] = Field(
        default="released", description="LoongServe's batching DP as its code runs it (its "
        "pruning never splits a batch) or the full DP of its paper; docs/baselines-loongserve.md")

    @model_validator(mode="after")
    def _sizes(self) -> SimConfig:
        self.policy.check_cluster(self.prefill_instances)
        return self

    @property
    def total_gpus(self) -> int:
        return self.prefill_instances + self.decode_instances

    def cost_model(self, prefill: int | None = None, decode: int | None = None) -> CostModel:
        """Cost model of a cluster with these instance counts (default: the configured split;
        a unified architecture passes all GPUs as `prefill` and `decode=0`)."""
        cluster = ClusterSpec(
            prefill_instances=self.prefill_instances if prefill is None else prefill,
            decode_instances=self.decode_instances if decode is None else decode,
            gpus_per_node=self.gpus_per_node,
        )
        model = load_model_spec(self.model)
        hardware = load_hardware(self.hardware)
        coefficients = None
        if self.calibration is not None:
            coefficients = Calibration.load(self.calibration).coefficients
        return CostModel(model, hardware, cluster, coefficients)

    def reference_gpus(self) -> int:
        return self.slo_reference_gpus or min(self.gpus_per_node, self.total_gpus)

    def sim_requests(self, trace: Iterable[TraceRequest]) -> list[SimRequest]:
        """The trace's requests with their SLOs (identical for every policy)."""
        ref = self.cost_model(prefill=self.reference_gpus(), decode=1)
        cache: dict[int, float] = {}
        out = []
        for t in trace:
            best = cache.get(t.prompt_tokens)
            if best is None:
                best = cache[t.prompt_tokens] = ref.best_isolated_ttft(t.prompt_tokens)
            out.append(SimRequest(t.request_id, t.arrival_s, t.prompt_tokens, t.output_tokens,
                                  self.slo.ttft_for(best), self.slo.tbt_s))
        return out
