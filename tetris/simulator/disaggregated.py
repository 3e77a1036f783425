"""Discrete-event simulator of a disaggregated prefill/decode cluster (Tetris, DistServe,
static SP).

Prefill instances execute the chunks a prefill policy (`tetris.solver.policy`) launches
(durations from the cost model, times optional seeded noise); after a request's last chunk its
first token is out and its KV goes to the decode pool (`decode_pool.DecodePool`: dispatcher,
transfer, continuous batching). What runs where is kept by the policy package's `Ledger`, fed
the same events the Ray runtime feeds it.

Decisions happen at arrivals and chunk completions — all events of one instant first, then one
decision (`events` priorities). The scheduler is one sequential resource: a decision that took
w seconds launches its chunks at now + w, and events during those w seconds wait for the next
decision at now + w. A decision is skipped (costs nothing) when nothing could start: no idle
prefill instance, or no request between chunks.

The planner sees planned durations; the simulator runs the noisy ones. An instance whose chunk
overran its plan is shown to the planner as busy until just after now, so nothing is ever
launched on a running instance (the ledger checks every launch).

Instance failures (`SimOptions.outages`) are events of their own, handled by `failures`; a run
without any schedules none, so its loop does no failure work. So are role changes on an elastic
cluster (`roles`: the policy settings' `roles` planner, from `SimOptions.initial_prefill` GPUs
prefilling).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tetris.simulator.decode_pool import DecodePool
from tetris.simulator.events import (
    ARRIVAL,
    CHUNK_END,
    DECIDE,
    PRIORITY_ARRIVAL,
    PRIORITY_COMPLETE,
    PRIORITY_DECIDE,
    EventQueue,
)
from tetris.simulator.failures import FAILURE, FailureInjector
from tetris.simulator.noise import DurationNoise
from tetris.simulator.records import ChunkRecord, Outage, RequestRecord, SimOutcome, SimRequest
from tetris.simulator.roles import ROLE_APPLY, ROLE_TICK, RoleExecutor
from tetris.solver.cost_model import CostModel
from tetris.solver.policy.ledger import Ledger
from tetris.solver.policy.registry import make_role_planner, widest_group
from tetris.solver.policy.roles import role_counts
from tetris.solver.policy.view import Launch, PrefillPolicy, SolverClock


@dataclass(frozen=True)
class SimOptions:
    """How the simulated cluster behaves (the policy's own settings are `policy.settings`);
    `outages`: instance failures to live through (`failures.FailureSpec.outages`)."""

    seed: int = 0
    noise_cv: float = 0.0
    outages: tuple[Outage, ...] = ()
    initial_prefill: int | None = None  # elastic roles: GPUs prefilling at the start
    clock: SolverClock = SolverClock.MODELED  # how the role planner's time is charged


def check_fits(requests: Sequence[SimRequest], cost_model: CostModel, prefill_sp: int,
               decode_pool: DecodePool | None = None) -> None:
    """Refuse, before anything runs, a request no plan could ever serve (so no request is
    dropped halfway through a run)."""
    cap = cost_model.kv_capacity_tokens
    for r in requests:
        if -(-r.prompt_tokens // prefill_sp) > cap:
            raise ValueError(
                f"request {r.request_id!r}: its prompt of {r.prompt_tokens} tokens needs more KV "
                f"memory than {prefill_sp} prefill instance(s) have ({cap} tokens each)"
            )
        if decode_pool is not None:
            decode_pool.require_fits(r)


class DisaggregatedSimulator:
    def __init__(self, requests: Sequence[SimRequest], policy: PrefillPolicy,
                 options: SimOptions | None = None) -> None:
        opts = options or SimOptions()
        self.policy = policy
        self.cost_model = cost_model = policy.cost_model
        settings = policy.settings
        cluster = cost_model.cluster
        self.num_prefill = cluster.prefill_instances
        self.events = EventQueue()
        self.noise = DurationNoise(opts.noise_cv, opts.seed)
        self.ledger = Ledger(self.num_prefill, cluster.decode_instances, settings,
                             elastic=cluster.elastic)
        self.decode = DecodePool(cost_model, self.ledger, self.events,
                                 DurationNoise(opts.noise_cv, opts.seed + 1),
                                 max_batch=settings.decode_max_batch,
                                 max_sp=settings.decode_max_sp, stream=settings.stream_kv)
        check_fits(requests, cost_model, widest_group(policy.name, settings, self.num_prefill),
                   self.decode)
        self.outages = opts.outages
        self.records = [RequestRecord(r) for r in requests]
        self.by_id = {r.request_id: rec for r, rec in zip(requests, self.records, strict=True)}
        if len(self.by_id) != len(requests):
            raise ValueError("request ids must be unique")
        self.scheduler_free_s = 0.0
        self.decide_queued = False
        self.stats: dict[str, int | float | str] = {
            "events": 0, "decisions": 0, "decisions_skipped": 0, "plans_validated": 0,
            "chunks": 0, "solver_s": 0.0,
        }
        self.failures = FailureInjector(self, requests, opts.outages) if opts.outages else None
        planner = make_role_planner(settings)
        self.roles: RoleExecutor | None = None
        if planner is not None:
            if opts.outages:
                raise ValueError("instance failures on an elastic cluster are not simulated "
                                 "yet: use fixed roles with --fail")
            self.roles = RoleExecutor(self, planner, opts.initial_prefill or
                                      self.num_prefill // 2, opts.clock)
        elif cluster.elastic:
            raise ValueError("an elastic cluster needs a role planner (settings.roles)")

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> SimOutcome:
        started = time.perf_counter()
        for rec in self.records:
            self.events.push(rec.request.arrival_s, PRIORITY_ARRIVAL, ARRIVAL, rec)
        failures = self.failures
        if failures is not None:
            failures.schedule()
        roles = self.roles
        if roles is not None:
            roles.schedule([rec.request for rec in self.records])
        events = 0
        now = 0.0
        while self.events:
            now, _, _, kind, payload = self.events.pop()
            events += 1
            if kind == ARRIVAL:
                r = payload.request
                self.ledger.arrive(r.request_id, r.arrival_s, r.prompt_tokens, r.ttft_slo_s)
                if roles is not None:
                    roles.arrived(r)
                self.want_decision(now)
            elif kind == CHUNK_END:
                self._chunk_end(payload, now)
            elif kind == DECIDE:
                self.decide_queued = False
                self._decide(now)
            elif kind == FAILURE:
                assert failures is not None
                failures.handle(payload, now)
            elif kind in (ROLE_TICK, ROLE_APPLY):
                assert roles is not None
                roles.handle(kind, payload, now)
            else:
                self.decode.handle(kind, payload, now)
                if roles is not None and roles.draining:
                    roles.settle(now)
        unfinished = [rec.request_id for rec in self.records if not rec.finished]
        if unfinished:
            lost = "" if not self.outages else (
                f"; instances lost at the end: prefill {_indices(self.ledger.lost)}, decode "
                f"{_indices(self.ledger.decode_lost)}")
            raise RuntimeError(f"simulation ended with {len(unfinished)} unfinished requests "
                               f"(first: {unfinished[0]!r}){lost}")
        if not self.ledger.is_empty():
            raise RuntimeError("simulation ended with work or KV left in the ledger")
        wall = time.perf_counter() - started
        self.stats["events"] = events
        self.stats["wall_s"] = wall
        self.stats["events_per_s"] = events / wall if wall > 0 else math.inf
        self.stats["simulated_s"] = now
        self.stats["decode_steps"] = self.decode.steps
        self.stats["decode_max_waiting"] = self.decode.queue.max_waiting
        self.stats["kv_transfers"] = self.decode.network.transfers
        self.stats["kv_bytes"] = self.decode.network.bytes
        if now > 0:
            self.stats["prefill_busy_fraction"] = sum(self.ledger.busy_s) / (
                self.num_prefill * now)
            self.stats["decode_busy_fraction"] = sum(
                i.busy_s for i in self.decode.instances) / (len(self.decode.instances) * now)
        timeline: list[tuple[float, int, int, int]] = []
        if roles is not None:
            self.stats.update(roles.stats())
            timeline = [*roles.timeline, (now, *role_counts(roles.roles))]  # to the run's end
        return SimOutcome(self.policy.name, self.records, self.stats, self.outages, timeline)

    def want_decision(self, now: float) -> None:
        if not self.decide_queued:
            self.decide_queued = True
            self.events.push(max(now, self.scheduler_free_s), PRIORITY_DECIDE, DECIDE)

    def _chunk_end(self, ended: tuple[ChunkRecord, RequestRecord, float], now: float) -> None:
        chunk, record, seconds = ended
        entry, _ = self.ledger.chunk_ended(record.request_id, seconds)
        # The ledger's prompt: a redone request re-prefills the tokens it produced too.
        last = chunk.end_token == entry.prompt_tokens
        if last:
            record.token_times.append(now)  # the last chunk samples the next token
        self.decode.chunk_ended(record, chunk, last, now)
        if self.roles is not None and self.roles.pending_to_decode:
            self.roles.chunk_ended(chunk.instances, now)
        self.want_decision(now)

    # -- decisions ---------------------------------------------------------------------------
    def _decide(self, now: float) -> None:
        if self.ledger.nothing_to_decide(now):
            self.stats["decisions_skipped"] = int(self.stats["decisions_skipped"]) + 1
            return
        decision = self.policy.decide(self.ledger.view(now))
        self.stats["decisions"] = int(self.stats["decisions"]) + 1
        self.stats["plans_validated"] = int(self.stats["plans_validated"]) + \
            decision.plans_validated
        self.stats["solver_s"] = float(self.stats["solver_s"]) + decision.solver_s
        for key, n in decision.stats.items():
            self.stats[key] = int(self.stats.get(key, 0)) + n
        launch_s = now + decision.solver_s
        self.scheduler_free_s = launch_s
        for launch in decision.launches:
            self._launch(launch, launch_s)
        # With an instance lost, launching nothing may be right (what is left cannot serve
        # what waits until it is back).
        if not decision.launches and not any(self.ledger.busy) and self.ledger.prefill \
                and not any(self.ledger.lost):
            raise RuntimeError(f"{self.policy.name} launched nothing at t={now:.6f}s with every "
                               f"prefill instance idle and {len(self.ledger.prefill)} requests "
                               "pending")

    def _launch(self, launch: Launch, start_s: float) -> None:
        c = launch.chunk
        planned = self.cost_model.chunk_seconds_on(c.tokens, c.start_token, c.instances)
        self.ledger.launch(launch, start_s, planned)
        actual = self.noise.apply(planned)
        chunk = ChunkRecord(c.start_token, c.end_token, c.instances, start_s, start_s + actual)
        record = self.by_id[launch.request_id]
        record.chunks.append(chunk)
        key = f"chunks_sp{c.sp}"
        self.stats[key] = int(self.stats.get(key, 0)) + 1
        self.stats["chunks"] = int(self.stats["chunks"]) + 1
        self.events.push(start_s + actual, PRIORITY_COMPLETE, CHUNK_END, (chunk, record, actual))


def _indices(flags: Sequence[bool]) -> list[int]:
    return [i for i, flag in enumerate(flags) if flag]


def simulate_disaggregated(requests: Sequence[SimRequest], policy: PrefillPolicy,
                           options: SimOptions | None = None) -> SimOutcome:
    return DisaggregatedSimulator(requests, policy, options).run()
