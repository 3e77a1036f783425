"""Every serving policy a simulation can replay a trace under, by name.

Every policy gets the same total GPUs (`SimConfig.total_gpus`): the disaggregated ones split them
into the configured prefill and decode pools and run the prefill policy that
`tetris.solver.policy.make_policy` builds (the one `tetris serve` runs too); LoongServe uses them
all as unified instances.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tetris.evaluation.sim_config import SimConfig
from tetris.simulator.disaggregated import SimOptions, simulate_disaggregated
from tetris.simulator.loongserve import LoongServeOptions, simulate_loongserve
from tetris.simulator.records import SimOutcome, SimRequest
from tetris.solver.policy.registry import POLICIES as PREFILL_POLICIES
from tetris.solver.policy.registry import make_policy
from tetris.solver.policy.view import SolverClock


@dataclass(frozen=True)
class PolicyInfo:
    name: str
    summary: str
    architecture: str  # "disaggregated" or "unified"
    run: Callable[[Sequence[SimRequest], SimConfig], SimOutcome]


def _disaggregated(name: str) -> Callable[[Sequence[SimRequest], SimConfig], SimOutcome]:
    def run(requests: Sequence[SimRequest], config: SimConfig) -> SimOutcome:
        policy = make_policy(name, config.policy, config.cost_model(),
                             clock=SolverClock(config.solver_clock))
        clock = SolverClock(config.solver_clock)
        return simulate_disaggregated(requests, policy, SimOptions(
            seed=config.seed, noise_cv=config.noise_cv,
            initial_prefill=config.prefill_instances if config.elastic else None, clock=clock))
    return run


def _loongserve(requests: Sequence[SimRequest], config: SimConfig) -> SimOutcome:
    unified = config.cost_model(prefill=config.total_gpus, decode=0)
    options = LoongServeOptions(dp_pruning=config.loongserve_dp == "released")
    return simulate_loongserve(requests, unified, seed=config.seed, noise_cv=config.noise_cv,
                               options=options)


POLICIES: dict[str, PolicyInfo] = {
    **{name: PolicyInfo(name, summary, "disaggregated", _disaggregated(name))
       for name, (summary, _) in PREFILL_POLICIES.items() if name.startswith("tetris")},
    "loongserve": PolicyInfo("loongserve", "LoongServe-style elastic SP on unified instances",
                             "unified", _loongserve),
    **{name: PolicyInfo(name, summary, "disaggregated", _disaggregated(name))
       for name, (summary, _) in PREFILL_POLICIES.items() if not name.startswith("tetris")},
}


def run_policy(name: str, requests: Sequence[SimRequest], config: SimConfig) -> SimOutcome:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}: use one of {', '.join(POLICIES)}")
    return POLICIES[name].run(requests, config)
