"""Small, hand-checkable problems shared by solver tests."""

from __future__ import annotations

from tetris.solver.cluster import ClusterSpec
from tetris.solver.cost_model import DEFAULT_MEM_UTIL, CostCoefficients, CostModel
from tetris.solver.hardware import HARDWARE_PRESETS
from tetris.solver.model_spec import MODEL_PRESETS
from tetris.solver.problem import PendingRequest, Problem


def linear_cost_model(
    instances: int, *, lin: float = 1e-3, fixed: float = 0.0, gpus_per_node: int = 8,
    kv_capacity: int | None = None,
) -> CostModel:
    """T(c, p, s) = fixed + lin·c/s: perfect SP scaling, so hand arithmetic stays exact.

    `kv_capacity` sizes the memory so that exactly that many KV tokens fit per instance."""
    coefficients = CostCoefficients(
        fixed_s=fixed, step_intra_s=0.0, step_inter_s=0.0, lin_s_per_token=lin,
        attn_s_per_pair=0.0, comm_intra_s_per_token=0.0, comm_inter_s_per_token=0.0,
        decode_fixed_s=0.0, decode_kv_s_per_token=0.0,
    )
    cluster = ClusterSpec(prefill_instances=instances, gpus_per_node=gpus_per_node)
    model, hardware = MODEL_PRESETS["llama3-8b"], HARDWARE_PRESETS["h100"]
    if kv_capacity is not None:
        room = model.weight_bytes + (kv_capacity + 0.5) * model.kv_bytes_per_token
        hardware = hardware.model_copy(update={"hbm_bytes": room / DEFAULT_MEM_UTIL})
    cm = CostModel(model, hardware, cluster, coefficients)
    assert kv_capacity is None or cm.kv_capacity_tokens == kv_capacity
    return cm


def preset_cost_model(
    instances: int, model: str = "llama3-8b", gpus_per_node: int = 8
) -> CostModel:
    cluster = ClusterSpec(prefill_instances=instances, gpus_per_node=gpus_per_node)
    return CostModel(MODEL_PRESETS[model], HARDWARE_PRESETS["h100"], cluster)


def request(rid: str, tokens: int, arrival: float = 0.0, slo: float = 10.0) -> PendingRequest:
    return PendingRequest(request_id=rid, arrival_s=arrival, prompt_tokens=tokens, ttft_slo_s=slo)


def problem(cm: CostModel, availability: tuple[float, ...], *requests: PendingRequest,
            **kw: float | int | None) -> Problem:
    return Problem(cm, availability, tuple(requests), **kw)  # type: ignore[arg-type]
