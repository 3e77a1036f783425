"""The policy registry: every serving policy the simulator can replay a trace under.

Every policy gets the same total GPUs (`SimConfig.total_gpus`): the disaggregated ones split them
into the configured prefill and decode pools, LoongServe uses them all as unified instances.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tetris.evaluation.prefill_policies import (
    CdspPolicy,
    DistServePolicy,
    PrefillPolicy,
    SolverClock,
    StaticSpPolicy,
)
from tetris.evaluation.sim_config import SimConfig
from tetris.simulator.disaggregated import SimOptions, simulate_disaggregated
from tetris.simulator.loongserve import LoongServeOptions, simulate_loongserve
from tetris.simulator.records import SimOutcome, SimRequest


@dataclass(frozen=True)
class PolicyInfo:
    name: str
    summary: str
    architecture: str  # "disaggregated" or "unified"
    run: Callable[[Sequence[SimRequest], SimConfig], SimOutcome]


def _options(config: SimConfig) -> SimOptions:
    return SimOptions(seed=config.seed, noise_cv=config.noise_cv,
                      decode_max_batch=config.decode_max_batch)


def _disaggregated(make: Callable[[SimConfig], PrefillPolicy]) -> Callable[
        [Sequence[SimRequest], SimConfig], SimOutcome]:
    def run(requests: Sequence[SimRequest], config: SimConfig) -> SimOutcome:
        return simulate_disaggregated(requests, config.cost_model(), make(config),
                                      _options(config))
    return run


def _cdsp(name: str, solver: str) -> Callable[[SimConfig], PrefillPolicy]:
    def make(config: SimConfig) -> PrefillPolicy:
        limit = config.milp_time_limit_ms if solver == "milp" else config.cp_time_limit_ms
        return CdspPolicy(name, solver=solver, time_limit_ms=limit,
                          clock=SolverClock(config.solver_clock), max_planned=config.max_planned)
    return make


def _loongserve(requests: Sequence[SimRequest], config: SimConfig) -> SimOutcome:
    unified = config.cost_model(prefill=config.total_gpus, decode=0)
    options = LoongServeOptions(dp_pruning=config.loongserve_dp == "released")
    return simulate_loongserve(requests, unified, seed=config.seed, noise_cv=config.noise_cv,
                               options=options)


POLICIES: dict[str, PolicyInfo] = {
    p.name: p for p in (
        PolicyInfo("tetris", "CDSP: greedy decisions refined by CP-SAT when requests queue",
                   "disaggregated", _disaggregated(_cdsp("tetris", "cp"))),
        PolicyInfo("tetris-greedy", "CDSP with the greedy planner only", "disaggregated",
                   _disaggregated(_cdsp("tetris-greedy", "greedy"))),
        PolicyInfo("tetris-milp", "CDSP planned by the MILP (small runs only)", "disaggregated",
                   _disaggregated(_cdsp("tetris-milp", "milp"))),
        PolicyInfo("loongserve", "LoongServe-style elastic SP on unified instances", "unified",
                   _loongserve),
        PolicyInfo("distserve", "DistServe-style disaggregation, fixed prefill groups, FCFS",
                   "disaggregated", _disaggregated(
                       lambda c: DistServePolicy("distserve", c.distserve_group))),
        PolicyInfo("static-sp", "disaggregated, one chunk per request at a fixed SP size",
                   "disaggregated", _disaggregated(
                       lambda c: StaticSpPolicy("static-sp", c.static_sp))),
    )
}


def run_policy(name: str, requests: Sequence[SimRequest], config: SimConfig) -> SimOutcome:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}: use one of {', '.join(POLICIES)}")
    return POLICIES[name].run(requests, config)
