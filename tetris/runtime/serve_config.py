"""`tetris serve` settings (CLI flags or a JSON `--config` file) and the cost model they imply.

On GPUs the cost model starts from the hardware preset's datasheet figures; on a CPU host there
is no datasheet, so the coefficients are measured: a calibration written by `tetris profile`,
the one shipped for the embedded model (measured with `tetris profile` on a 2-core machine;
re-run it on yours for better plans), or else a quick one the deployment measures at start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tetris.solver.calibration import Calibration
from tetris.solver.cluster import ClusterSpec
from tetris.solver.cost_model import DEFAULT_MEM_UTIL, CostCoefficients, CostModel
from tetris.solver.hardware import HardwareSpec, load_hardware
from tetris.solver.model_spec import ModelSpec
from tetris.solver.policy.registry import policy_for_solver
from tetris.solver.policy.settings import PolicySettings
from tetris.solver.slo import SloSpec

SHIPPED_CALIBRATIONS = Path(__file__).parent / "calibrations"
# The serving defaults differ from the simulator's where the embedded CPU model differs from a
# GPU cluster: prompts of a few thousand tokens (finer chunk boundaries), one or two decode
# instances of a few thousand KV tokens (smaller batches, KV over at most two).
SERVE_POLICY = PolicySettings(block_tokens=64, decode_max_batch=32, decode_max_sp=2)


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="smollm2", description="embedded model name or an HF "
                       "Llama-family checkpoint directory")
    served_model_name: str | None = Field(default=None, description="the `model` clients "
                                          "send (default: the model's directory name)")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    ray_address: str | None = Field(default=None, description="join this Ray cluster "
                                    "(default: start a private one on 127.0.0.1)")
    prefill_instances: int = Field(default=2, ge=1)
    decode_instances: int = Field(default=1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="weights and KV: auto = bfloat16 on GPUs, float32 on CPU")
    threads_per_instance: int = Field(default=1, ge=1)
    gpus_per_instance: float = Field(default=1.0, gt=0, le=1, description="below 1 packs "
                                     "several instances on one GPU")
    placement: Literal["pack", "spread"] = Field(default="pack", description="with "
                                                 "--ray-address: Ray's default placement "
                                                 "(pack) or rank r on the r-th node in turn "
                                                 "(spread)")
    collective_timeout_s: float = Field(default=10.0, gt=0, le=3600, description="how long "
                                        "a rank waits in a collective for a peer before the "
                                        "call fails (bounds how long a faulty instance holds "
                                        "its peers; a dead one is seen at once)")
    kv_tokens_per_instance: int = Field(default=16384, ge=16)
    decode_kv_tokens_per_instance: int | None = Field(default=None, ge=16)
    max_queue: int = Field(default=64, ge=1, description="bound on the requests admitted and "
                           "not finished (waiting, prefilling or decoding); beyond it 429")
    request_timeout_s: float | None = Field(default=None, gt=0, description="a request not "
                                            "done this long after it arrived is stopped with "
                                            "an error (504; tokens streamed stand)")
    default_max_tokens: int = Field(default=1024, ge=1, description="a chat request naming "
                                    "no max_tokens gets at most this many (its final KV is "
                                    "reserved when it reaches decode)")
    solver: Literal["greedy", "cp", "milp"] = Field(default="greedy", description="the CDSP "
                                                    "planner: greedy, cp (greedy refined by "
                                                    "CP-SAT in the background) or milp")
    policy: PolicySettings = Field(default_factory=lambda: SERVE_POLICY, description="the "
                                   "policy's settings, shared with the simulator")
    slo: SloSpec = Field(default_factory=lambda: SloSpec(ttft_scale=5.0))
    hardware: str = Field(default="h100", description="GPU preset or HardwareSpec JSON "
                          "(GPU only; a CPU host is described by its calibration)")
    calibration: str | None = Field(default=None, description="calibration JSON from "
                                    "`tetris profile`")

    @model_validator(mode="after")
    def _fits_groups(self) -> ServeConfig:
        self.policy.check_cluster(self.prefill_instances, self.policy_name)
        if self.elastic and self.prefill_instances != self.decode_instances:
            raise ValueError(f"roles {self.policy.roles!r}: every GPU serves either role, so "
                             "prefill_instances and decode_instances both give the GPU count "
                             f"and must be equal, got {self.prefill_instances} and "
                             f"{self.decode_instances}")
        if self.elastic and self.decode_kv_tokens != self.kv_tokens_per_instance:
            raise ValueError(f"roles {self.policy.roles!r}: a GPU's one KV cache serves both "
                             "roles, so decode_kv_tokens_per_instance cannot differ from "
                             "kv_tokens_per_instance")
        return self

    @property
    def elastic(self) -> bool:
        """Elastic roles: one actor per GPU serves either role (`policy.roles`)."""
        return self.policy.roles != "fixed"

    @property
    def policy_name(self) -> str:
        return policy_for_solver(self.solver)

    def dtype_on(self, device: str) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float32" if device == "cpu" else "bfloat16"

    @property
    def decode_kv_tokens(self) -> int:
        return self.decode_kv_tokens_per_instance or self.kv_tokens_per_instance


def shipped_calibration(model: ModelSpec) -> Path | None:
    path = SHIPPED_CALIBRATIONS / f"cpu-{model.name}.json"
    return path if path.is_file() else None


def host_hardware(model: ModelSpec, kv_tokens: int) -> HardwareSpec:
    """A CPU host as the cost model needs it: only its memory matters once the coefficients
    are calibrated (the rest feed the datasheet defaults, which a calibration replaces), and
    the memory is what the runtime gives each instance: the weights plus `kv_tokens` of KV."""
    memory = (model.weight_bytes + (kv_tokens + 0.5) * model.kv_bytes_per_token) / DEFAULT_MEM_UTIL
    return HardwareSpec(name="cpu", peak_flops=1.0, hbm_bytes=memory, hbm_bandwidth=1.0,
                        intra_node_bandwidth=1.0, inter_node_bandwidth=1.0)


def configured_coefficients(config: ServeConfig, model: ModelSpec,
                            device: str) -> CostCoefficients | None:
    """The calibration to plan with: --calibration, else (CPU) the shipped one for the model;
    None on CPU means none exists yet (the deployment measures one), on GPU the datasheet
    defaults. ValueError naming the file if it is not a calibration."""
    path: str | Path | None = config.calibration
    if path is None and device == "cpu":
        path = shipped_calibration(model)
    return Calibration.load(path).coefficients if path is not None else None


def serving_cost_model(config: ServeConfig, model: ModelSpec, device: str,
                       coefficients: CostCoefficients | None,
                       nodes: tuple[int, ...] | None = None) -> CostModel:
    """The planners' cost model for this deployment: each instance on its node (`nodes`, as
    the actors were placed; None: one node holding every instance)."""
    cluster = ClusterSpec(prefill_instances=config.prefill_instances,
                          decode_instances=config.decode_instances,
                          gpus_per_node=config.prefill_instances + config.decode_instances,
                          nodes=(nodes * 2 if nodes and config.elastic else nodes) or None,
                          elastic=config.elastic)
    if device == "cpu":
        if coefficients is None:
            raise ValueError(f"no calibration for {model.name} on this CPU host")
        hardware = host_hardware(model, config.kv_tokens_per_instance)
    else:
        hardware = load_hardware(config.hardware)
    cost = CostModel(model, hardware, cluster, coefficients)
    # Planners keep each request's KV share within what an instance holds: the runtime's
    # cache, not the whole device.
    cost.kv_capacity_tokens = min(cost.kv_capacity_tokens, config.kv_tokens_per_instance)
    return cost
