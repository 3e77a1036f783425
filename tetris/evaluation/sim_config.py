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
#: Most instances of one kind: the simulator allocates per instance (10^11 is a MemoryError).
MAX_INSTANCES = 4096
#: Log-normal duration noise beyond this CV overflows (cv² = inf gives NaN durations).
MAX_NOISE_CV = 100.0
#: Range of SLO seconds and of the TTFT scale: the planners' tick arithmetic needs normal
#: floats (a 1e-320 s SLO turns into NaN in the MILP) and finite sums of them.
SLO_RANGE = (1e-6, 1e9)


class SimConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(default="lwm-7b-1m", description="model preset or HF config.json/dir")
    hardware: str = Field(default="h100", description="hardware preset or HardwareSpec .json")
    calibration: str | None = Field(
        default=None, description="calibration JSON from `tetris profile` (replaces the "
        "datasheet coefficients)")
    prefill_instances: int = Field(default=8, gt=0, le=MAX_INSTANCES)
    decode_instances: int = Field(default=8, gt=0, le=MAX_INSTANCES)
    gpus_per_node: int = Field(default=8, gt=0, le=MAX_INSTANCES)
    slo: SloSpec = DEFAULT_SLO
    slo_reference_gpus: int | None = Field(default=None, gt=0, le=2 * MAX_INSTANCES)
    tbt_criterion: Literal["mean", "p90", "p99", "max"] = "mean"
    seed: int = Field(default=0, ge=0)
    noise_cv: float = Field(default=0.0, ge=0, le=MAX_NOISE_CV)
    solver_clock: Literal["modeled", "measured", "free"] = "modeled"
    policy: PolicySettings = Field(default_factory=PolicySettings, description="the "
                                   "policies' settings, shared with `tetris serve`")
    loongserve_dp: Literal["released", "full"] = Field(
        default="released", description="LoongServe's batching DP as its code runs it (its "
        "pruning never splits a batch) or the full DP of its paper; docs/baselines-loongserve.md")

    @model_validator(mode="after")
    def _sizes(self) -> SimConfig:
        # Only what every policy shares: a setting of one policy (static_sp, say) is checked
        # by `check_policy` for the policies actually run.
        self.policy.check_cluster(self.prefill_instances)
        low, high = SLO_RANGE
        for name in ("ttft_s", "ttft_scale", "tbt_s"):
            value = getattr(self.slo, name)
            if value is not None and not low <= value <= high:
                raise ValueError(f"slo.{name} must be in [{low:g}, {high:g}], got {value}")
        return self

    def check_policy(self, name: str, architecture: str = "disaggregated") -> None:
        """ValueError naming a setting of policy `name` that this cluster cannot honour; a
        unified policy runs on every GPU."""
        pool = self.total_gpus if architecture == "unified" else self.prefill_instances
        self.policy.check_cluster(pool, name)

    @property
    def total_gpus(self) -> int:
        return self.prefill_instances + self.decode_instances

    @property
    def elastic(self) -> bool:
        """Every GPU serves either role (the configured split is where roles start)."""
        return self.policy.roles != "fixed"

    def cost_model(self, prefill: int | None = None, decode: int | None = None) -> CostModel:
        """Cost model of a cluster with these instance counts (default: the configured split,
        or with elastic roles every GPU as both; a unified architecture passes all GPUs as
        `prefill` and `decode=0`)."""
        if prefill is None and decode is None and self.elastic:
            n = self.total_gpus
            cluster = ClusterSpec(prefill_instances=n, decode_instances=n,
                                  gpus_per_node=self.gpus_per_node, elastic=True)
        else:
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
