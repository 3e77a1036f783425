"""The planners' common objective (lower is better).

    J = Σ_r w_r · ( TTFT_r / SLO_r + P · [TTFT_r > SLO_r] + λ · GPUsec_r / SLO_r )

- TTFT_r / SLO_r: SLO-weighted latency, so a 1 s-SLO request and a 60 s-SLO one weigh alike.
- P (`miss_penalty`): a heavy price per missed SLO, so attainment comes first.
- λ (`gpu_cost_weight`): per request, one GPU-second costs as much as λ seconds of its TTFT, so
  a group grows only while the latency it saves exceeds λ × the GPU-seconds it adds (SP
  efficiency < 1 makes wider groups cost more GPU-seconds). λ rises with load:
  `gpu_cost_weight_for_load` gives ρ/(1−ρ), the M/M/1 factor by which extra work delays the queue.
"""

from __future__ import annotations

from collections.abc import Iterable

from tetris.solver.plan import RequestPlan
from tetris.solver.problem import PendingRequest, Problem

MISS_EPS_S = 1e-9
MAX_LOAD_WEIGHT = 20.0


def request_cost(
    problem: Problem, request: PendingRequest, prefill_end_s: float, gpu_seconds: float
) -> float:
    ttft = prefill_end_s - request.arrival_s
    cost = ttft / request.ttft_slo_s + problem.gpu_cost_weight * gpu_seconds / request.ttft_slo_s
    if ttft > request.ttft_slo_s + MISS_EPS_S:
        cost += problem.miss_penalty
    return request.weight * cost


def total_objective(problem: Problem, plans: Iterable[RequestPlan]) -> float:
    total = 0.0
    for plan in plans:
        request = problem.requests[problem.index_of[plan.request_id]]
        total += request_cost(problem, request, plan.prefill_end_s, plan.gpu_seconds)
    return total


def gpu_cost_weight_for_load(load: float) -> float:
    """λ for a prefill utilisation ρ in [0, 1): ρ/(1−ρ), capped for ρ → 1."""
    if load <= 0:
        return 0.0
    if load >= 1:
        return MAX_LOAD_WEIGHT
    return min(MAX_LOAD_WEIGHT, load / (1 - load))
