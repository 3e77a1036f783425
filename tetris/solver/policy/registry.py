"""The one registry of prefill policies: `make_policy(name, settings, cost_model)`.

The simulator and the serving engine both build their policy here, from the same settings, so a
policy measured in simulation is the policy the daemon runs. What differs is only how the
executor runs the planner: the simulator charges its time to a simulated clock (`clock`), and
the runtime measures it and runs CP-SAT refinement on a thread of its own (`refine_on`).
"""

from __future__ import annotations

from concurrent.futures import Executor

from tetris.solver.cost_model import CostModel
from tetris.solver.policy.baselines import DistServePolicy, StaticSpPolicy
from tetris.solver.policy.cdsp import CdspPolicy
from tetris.solver.policy.refinement import BackgroundRefiner
from tetris.solver.policy.refinement_runs import InlineRun, RefinementRun, ThreadRun
from tetris.solver.policy.roles import RolePlanner, ThresholdRoles
from tetris.solver.policy.roles_cp_sat import OptimizedRoles
from tetris.solver.policy.settings import PolicySettings
from tetris.solver.policy.view import PrefillPolicy, SolverClock

# name -> (summary, solver of the CDSP planners or None for a baseline)
POLICIES: dict[str, tuple[str, str | None]] = {
    "tetris": ("CDSP: greedy decisions refined by CP-SAT when requests queue", "cp"),
    "tetris-greedy": ("CDSP with the greedy planner only", "greedy"),
    "tetris-milp": ("CDSP planned by the MILP (small runs only)", "milp"),
    "distserve": ("DistServe-style disaggregation, fixed prefill groups, FCFS", None),
    "static-sp": ("disaggregated, one chunk per request at a fixed SP size", None),
}


def policy_for_solver(solver: str) -> str:
    """The CDSP policy that plans with `solver` (greedy, cp or milp)."""
    for name, (_, planner) in POLICIES.items():
        if planner == solver:
            return name
    raise ValueError(f"unknown solver {solver!r}: use greedy, cp or milp")


def widest_group(name: str, settings: PolicySettings, num_prefill: int) -> int:
    """The most prefill instances policy `name` puts one request's chunk on (its KV is spread
    over at most that many)."""
    if name == "static-sp":
        return min(settings.static_sp, num_prefill)
    if name == "distserve":
        return min(settings.distserve_group, num_prefill)
    return min(settings.max_sp or num_prefill, num_prefill)


def make_policy(name: str, settings: PolicySettings, cost_model: CostModel, *,
                clock: SolverClock = SolverClock.MODELED,
                refine_on: Executor | None = None) -> PrefillPolicy:
    """The prefill policy `name` over `cost_model`'s cluster. `refine_on`: run the `tetris`
    policy's CP-SAT refinement on this executor (the runtime) instead of inline with its time
    charged to `clock` (the simulator)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}: use one of {', '.join(POLICIES)}")
    settings.check_cluster(cost_model.cluster.prefill_instances, name)
    if name == "static-sp":
        return StaticSpPolicy(name, cost_model, settings)
    if name == "distserve":
        return DistServePolicy(name, cost_model, settings)
    solver = POLICIES[name][1]
    assert solver is not None
    refiner = None
    if solver == "cp" and settings.refine == "background":
        run: RefinementRun = (
            InlineRun(settings.time_limit_ms, charge_measured=clock is SolverClock.MEASURED)
            if refine_on is None else ThreadRun(refine_on, settings.time_limit_ms))
        refiner = BackgroundRefiner(run, settings.refine_min_waiting)
    return CdspPolicy(name, cost_model, settings, solver, clock, refiner)


def make_role_planner(settings: PolicySettings) -> RolePlanner | None:
    """The role planner of `settings.roles` (None: fixed roles)."""
    if settings.roles == "fixed":
        return None
    if settings.roles == "threshold":
        return ThresholdRoles(settings.role_interval_s, settings.role_dwell_s)
    return OptimizedRoles(settings.role_interval_s, settings.role_horizon_s,
                          settings.role_dwell_s)
