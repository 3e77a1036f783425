"""SLO what-if analysis: max sustainable rate per policy, metrics at chosen rates, sweeps over
any setting, and the fewest GPUs that sustain a rate.

Work is cut into independent units — one (policy, sweep point) search, or one (policy, rate)
run — that run in parallel processes (`jobs`) or as Ray tasks (`ray_address`); every unit is a
plain function of picklable arguments, so both back-ends run the same code.

Failure what-ifs (`FailureSpec`): at-rate runs live through the instance failures and report SLO
attainment by arrival window (before the first failure, during, after recovery) next to the
same windows of the same run on a healthy cluster (`healthy_windows`); max-rate searches and
fewest-GPU searches are always of the healthy cluster.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

from pydantic import BaseModel

from tetris.evaluation.capacity import fewest_instances, find_max_rate
from tetris.evaluation.metrics import compute_metrics, failure_metrics
from tetris.evaluation.policies import POLICIES, run_policy
from tetris.evaluation.sim_config import SimConfig
from tetris.evaluation.workload import Workload
from tetris.simulator.disaggregated import SimOptions, simulate_disaggregated
from tetris.simulator.failures import FailureSpec, down_intervals
from tetris.simulator.records import RequestRecord, SimOutcome, SimRequest
from tetris.solver.policy.registry import make_policy
from tetris.solver.policy.settings import PolicySettings
from tetris.solver.policy.view import SolverClock
from tetris.solver.slo import SloSpec

DEFAULT_TARGET = 0.9
DEFAULT_REL_TOL = 0.03
DEFAULT_MAX_EVALS = 14
AT_RATE_KEYS = ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s",
                "slo_attainment")


@dataclass(frozen=True)
class RunResult:
    rate_rps: float
    metrics: dict[str, Any]
    stats: dict[str, Any]
    records: list[RequestRecord] | None = None
    # Elastic roles: (time, prefilling, decoding, draining) after every change.
    roles: list[tuple[float, int, int, int]] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """The whatif JSON row: the contract's keys first, then every other metric."""
        row: dict[str, Any] = {"rate_rps": self.rate_rps}
        row.update({k: self.metrics.get(k) for k in AT_RATE_KEYS})
        row.update({k: v for k, v in self.metrics.items() if k not in row})
        row["plans_validated"] = self.stats.get("plans_validated")
        return row


def simulate_at_rate(workload: Workload, policy: str, config: SimConfig, rate_rps: float | None,
                     *, keep_records: bool = False,
                     failures: FailureSpec | None = None) -> RunResult:
    """One simulation of `workload` time-scaled to `rate_rps` (None: as recorded), living
    through `failures` if given (its metrics then have `failure_windows` and `failures`)."""
    scaled = workload if rate_rps is None else workload.scaled_to_rate(rate_rps)
    requests = config.sim_requests(scaled.requests)
    failing = failures if failures is not None and failures.active else None
    outcome = (run_policy(policy, requests, config) if failing is None
               else simulate_with_failures(policy, requests, config, failing))
    metrics: dict[str, Any] = compute_metrics(outcome.records,
                                              tbt_criterion=config.tbt_criterion).to_dict()
    if failing is not None:
        metrics.update(failure_metrics(outcome.records, down_intervals(outcome.outages),
                                       tbt_criterion=config.tbt_criterion))
    return RunResult(scaled.mean_rate_rps if rate_rps is None else rate_rps, metrics,
                     dict(outcome.stats), outcome.records if keep_records else None,
                     outcome.roles)


def simulate_with_failures(policy: str, requests: Sequence[SimRequest], config: SimConfig,
                           failures: FailureSpec) -> SimOutcome:
    """A disaggregated policy's run under `failures` (random ones start before the last
    arrival). ValueError for a unified policy: its simulator has no failure model."""
    if POLICIES[policy].architecture != "disaggregated":
        raise ValueError(f"{policy}: instance failures are simulated for the disaggregated "
                         "policies only")
    cost_model = config.cost_model()
    horizon = max((r.arrival_s for r in requests), default=0.0)
    outages = failures.outages(cost_model.cluster, horizon)
    prefill = make_policy(policy, config.policy, cost_model,
                          clock=SolverClock(config.solver_clock))
    return simulate_disaggregated(requests, prefill, SimOptions(
        seed=config.seed, noise_cv=config.noise_cv, outages=outages))


def failure_run(workload: Workload, policy: str, config: SimConfig, rate_rps: float | None,
                failures: FailureSpec, *, keep_records: bool = False) -> RunResult:
    """`simulate_at_rate` under `failures`, its metrics with `healthy_windows`: the same
    arrival windows in the same run without failures (what the failures cost)."""
    result = simulate_at_rate(workload, policy, config, rate_rps, keep_records=True,
                              failures=failures)
    healthy = simulate_at_rate(workload, policy, config, rate_rps, keep_records=True)
    down = [(start, end) for start, end in result.metrics["failures"]["down_intervals"]]
    result.metrics["healthy_windows"] = failure_metrics(
        healthy.records or [], down, tbt_criterion=config.tbt_criterion)["failure_windows"]
    return RunResult(result.rate_rps, result.metrics, result.stats,
                     result.records if keep_records else None)


@dataclass(frozen=True)
class SearchUnit:
    """Max sustainable rate of one policy under one config, plus runs at fixed rates."""

    policy: str
    config: SimConfig
    point: dict[str, Any] = field(default_factory=dict)
    search: bool = True
    rates: tuple[float | None, ...] = ()  # None: the trace's own rate
    target: float = DEFAULT_TARGET
    rel_tol: float = DEFAULT_REL_TOL
    max_evals: int = DEFAULT_MAX_EVALS
    start_rps: float | None = None
    keep_records: bool = False
    failures: FailureSpec | None = None  # lived through by the at-rate runs only


@dataclass
class SearchOutcome:
    unit: SearchUnit
    capacity: dict[str, Any] | None
    at_rates: list[RunResult]
    plans_validated: int


def run_search_unit(workload: Workload, unit: SearchUnit) -> SearchOutcome:
    validated = 0
    capacity = None
    if unit.search:
        def attainment(rate: float) -> float:
            nonlocal validated
            result = simulate_at_rate(workload, unit.policy, unit.config, rate)
            validated += int(result.stats.get("plans_validated", 0))
            value = result.metrics.get("slo_attainment")
            return 0.0 if value is None else float(value)

        found = find_max_rate(attainment, start_rps=unit.start_rps or workload.mean_rate_rps,
                              target=unit.target, rel_tol=unit.rel_tol,
                              max_evals=unit.max_evals)
        capacity = found.to_dict()
    at_rates = []
    for rate in unit.rates:
        result = (failure_run(workload, unit.policy, unit.config, rate, unit.failures,
                              keep_records=unit.keep_records)
                  if unit.failures is not None and unit.failures.active else
                  simulate_at_rate(workload, unit.policy, unit.config, rate,
                                   keep_records=unit.keep_records))
        validated += int(result.stats.get("plans_validated", 0))
        at_rates.append(result)
    return SearchOutcome(unit, capacity, at_rates, validated)


@dataclass(frozen=True)
class GpuUnit:
    """Fewest GPUs (same prefill:decode proportion) with which `policy` sustains `rate_rps`."""

    policy: str
    config: SimConfig
    rate_rps: float
    candidates: tuple[int, ...]
    target: float = DEFAULT_TARGET


def split_gpus(config: SimConfig, total: int) -> SimConfig:
    """`config` resized to `total` GPUs, keeping its prefill share (each pool at least 1)."""
    if total < 2:
        raise ValueError(f"a disaggregated cluster needs at least 2 GPUs, got {total}")
    prefill = round(total * config.prefill_instances / config.total_gpus)
    prefill = min(total - 1, max(1, prefill))
    return with_split(config, prefill, total - prefill)


def with_split(config: SimConfig, prefill: int, decode: int) -> SimConfig:
    """`config` with `prefill` + `decode` instances; the policies' group sizes capped to the
    prefill pool."""
    p = config.policy
    policy = p.model_copy(update={
        "static_sp": min(p.static_sp, prefill), "distserve_group": min(p.distserve_group, prefill),
        "max_sp": None if p.max_sp is None else min(p.max_sp, prefill)})
    return SimConfig.model_validate(config.model_dump() | {
        "prefill_instances": prefill, "decode_instances": decode,
        "policy": policy.model_dump()})


def run_gpu_unit(workload: Workload, unit: GpuUnit) -> dict[str, Any]:
    def attainment(total: int) -> float:
        config = split_gpus(unit.config, total)
        value = simulate_at_rate(workload, unit.policy, config, unit.rate_rps).metrics.get(
            "slo_attainment")
        return 0.0 if value is None else float(value)

    best, evaluations = fewest_instances(attainment, candidates=unit.candidates,
                                         target=unit.target)
    out: dict[str, Any] = {"rate_rps": unit.rate_rps, "gpus": best,
                           "evaluations": [[n, a] for n, a in evaluations]}
    if best is not None:
        sized = split_gpus(unit.config, best)
        out.update(prefill_instances=sized.prefill_instances,
                   decode_instances=sized.decode_instances)
    return out


def sweep_points(sweeps: Sequence[tuple[str, Sequence[Any]]]) -> list[dict[str, Any]]:
    """The cartesian product of `(field, values)` sweeps, as config updates."""
    if not sweeps:
        return [{}]
    names = [name for name, _ in sweeps]
    return [dict(zip(names, values, strict=True))
            for values in itertools.product(*(vals for _, vals in sweeps))]


def apply_point(config: SimConfig, point: dict[str, Any]) -> SimConfig:
    """`config` with each `field` (or `slo.field`, `policy.field`) of `point` set."""
    sections: dict[str, type[BaseModel]] = {"slo": SloSpec, "policy": PolicySettings}
    unknown = []
    for key in point:
        section, _, name = key.partition(".")
        known = (name in sections[section].model_fields if section in sections and name
                 else not name and key in SimConfig.model_fields and key not in sections)
        if not known:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"cannot sweep unknown setting(s) {', '.join(unknown)}: use one of "
            f"{', '.join(k for k in SimConfig.model_fields if k not in sections)}, "
            + ", ".join(f"{s}.<{'|'.join(m.model_fields)}>" for s, m in sections.items()))
    data = config.model_dump()
    for key, value in point.items():
        section, _, name = key.partition(".")
        if not name:
            data[key] = value
            continue
        data[section] = dict(data[section], **{name: value})
        if key == "slo.ttft_scale":
            data["slo"]["ttft_s"] = None  # the two TTFT forms exclude each other
        elif key == "slo.ttft_s":
            data["slo"]["ttft_scale"] = None
    return SimConfig.model_validate(data)


# -- execution back-ends -------------------------------------------------------------------------
Task = tuple[Callable[..., Any], tuple[Any, ...]]


def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    return fn(*args)


def run_parallel(tasks: Sequence[Task], *, jobs: int = 1, ray_address: str | None = None
                 ) -> Iterator[tuple[int, Any]]:
    """(index, result) of each task as it completes: in this process (jobs 1), in `jobs`
    spawned processes, or as Ray tasks on the cluster at `ray_address`."""
    if ray_address is not None:
        yield from _run_ray(tasks, ray_address)
        return
    if jobs <= 1 or len(tasks) <= 1:
        for i, (fn, args) in enumerate(tasks):
            yield i, fn(*args)
        return
    # spawn, not fork: OR-Tools and numpy threads do not survive a fork reliably.
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)),
                             mp_context=get_context("spawn")) as pool:
        futures: dict[Future[Any], int] = {pool.submit(_call, fn, args): i
                                           for i, (fn, args) in enumerate(tasks)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield futures[fut], fut.result()


def _run_ray(tasks: Sequence[Task], address: str) -> Iterator[tuple[int, Any]]:
    from tetris.ray_session import init_ray

    ray = init_ray(address)
    remote = ray.remote(num_cpus=1)(_call)
    refs = {remote.remote(fn, args): i for i, (fn, args) in enumerate(tasks)}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            yield refs[ref], ray.get(ref)
