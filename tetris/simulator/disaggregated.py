"""Discrete-event simulator of a disaggregated prefill/decode cluster (Tetris, DistServe,
static SP).

Prefill instances execute the chunks a `PrefillPolicy` launches (durations from the cost model,
times optional seeded noise); after a request's last chunk its first token is out and its KV
goes to the decode pool (`decode_pool.DecodePool`: dispatcher, transfer, continuous batching).

Decisions happen at arrivals and chunk completions — all events of one instant first, then one
decision (`events` priorities). The scheduler is one sequential resource: a decision that took
w seconds launches its chunks at now + w, and events during those w seconds wait for the next
decision at now + w. A decision is skipped (costs nothing) when nothing could start: no idle
prefill instance, or no request between chunks.

The planner sees planned durations; the simulator runs the noisy ones. An instance whose chunk
overran its plan is shown to the planner as busy until just after now, so nothing is ever
launched on a running instance (checked at every launch, with the other invariants).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tetris.evaluation.prefill_policies import (
    Launch,
    LoadTracker,
    PrefillPolicy,
    PrefillView,
    planner_availability,
    ready_after,
)
from tetris.simulator.decode_pool import DecodePool
from tetris.simulator.events import (
    PRIORITY_ARRIVAL,
    PRIORITY_COMPLETE,
    PRIORITY_DECIDE,
    EventQueue,
)
from tetris.simulator.noise import DurationNoise
from tetris.simulator.records import ChunkRecord, RequestRecord, SimOutcome, SimRequest
from tetris.solver.cost_model import CostModel
from tetris.solver.problem import (
    DEFAULT_BLOCK_TOKENS,
    DEFAULT_MISS_PENALTY,
    PendingRequest,
    Problem,
)

ARRIVAL = "arrival"
CHUNK_END = "chunk_end"
DECIDE = "decide"
OVERRUN_S = 1e-6
DEFAULT_LOAD_TAU_S = 30.0


@dataclass(slots=True)
class _Progress:
    record: RequestRecord
    prefilled: int = 0  # tokens of launched chunks
    kv_instances: tuple[int, ...] = ()
    planned_ready_s: float = 0.0
    running: bool = False


@dataclass(frozen=True)
class SimOptions:
    seed: int = 0
    noise_cv: float = 0.0
    decode_max_batch: int = 256
    decode_max_sp: int | None = None
    block_tokens: int = DEFAULT_BLOCK_TOKENS
    max_chunks: int | None = None
    max_sp: int | None = None
    miss_penalty: float = DEFAULT_MISS_PENALTY
    load_tau_s: float = DEFAULT_LOAD_TAU_S  # memory of the prefill load estimate behind λ


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
    def __init__(self, requests: Sequence[SimRequest], cost_model: CostModel,
                 policy: PrefillPolicy, options: SimOptions | None = None) -> None:
        self.options = opts = options or SimOptions()
        self.cost_model = cost_model
        self.policy = policy
        cluster = cost_model.cluster
        self.num_prefill = cluster.prefill_instances
        self.events = EventQueue()
        self.noise = DurationNoise(opts.noise_cv, opts.seed)
        self.decode = DecodePool(
            cost_model, cluster.decode_instances, self.events,
            DurationNoise(opts.noise_cv, opts.seed + 1),
            max_batch=opts.decode_max_batch, max_sp=opts.decode_max_sp,
        )
        check_fits(requests, cost_model, opts.max_sp or self.num_prefill, self.decode)
        self.progress = [_Progress(RequestRecord(r)) for r in requests]
        self.by_id = {r.request_id: i for i, r in enumerate(requests)}
        if len(self.by_id) != len(requests):
            raise ValueError("request ids must be unique")
        self.base_problem = Problem(
            cost_model, (0.0,) * self.num_prefill, (), block_tokens=opts.block_tokens,
            max_chunks=opts.max_chunks, max_sp=opts.max_sp, miss_penalty=opts.miss_penalty,
        )
        self.pending: dict[int, _Progress] = {}
        self.running = [False] * self.num_prefill
        self.planned_end = [0.0] * self.num_prefill
        self.busy_s = [0.0] * self.num_prefill
        self.scheduler_free_s = 0.0
        self.decide_queued = False
        self.load = LoadTracker(opts.load_tau_s)
        self.stats: dict[str, int | float | str] = {
            "events": 0, "decisions": 0, "decisions_skipped": 0, "plans_validated": 0,
            "chunks": 0, "solver_s": 0.0,
        }

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> SimOutcome:
        started = time.perf_counter()
        for i, p in enumerate(self.progress):
            self.events.push(p.record.request.arrival_s, PRIORITY_ARRIVAL, ARRIVAL, i)
        events = 0
        now = 0.0
        while self.events:
            now, _, _, kind, payload = self.events.pop()
            events += 1
            if kind == ARRIVAL:
                self.pending[payload] = self.progress[payload]
                self._want_decision(now)
            elif kind == CHUNK_END:
                self._chunk_end(payload, now)
            elif kind == DECIDE:
                self.decide_queued = False
                self._decide(now)
            else:
                self.decode.handle(kind, payload, now)
        unfinished = [p.record.request_id for p in self.progress if not p.record.finished]
        if unfinished:
            raise RuntimeError(f"simulation ended with {len(unfinished)} unfinished requests "
                               f"(first: {unfinished[0]!r})")
        wall = time.perf_counter() - started
        self.stats["events"] = events
        self.stats["wall_s"] = wall
        self.stats["events_per_s"] = events / wall if wall > 0 else math.inf
        self.stats["simulated_s"] = now
        self.stats["decode_steps"] = self.decode.steps
        self.stats["decode_max_waiting"] = self.decode.max_waiting
        if now > 0:
            self.stats["prefill_busy_fraction"] = sum(self.busy_s) / (self.num_prefill * now)
            self.stats["decode_busy_fraction"] = sum(
                i.busy_s for i in self.decode.instances) / (len(self.decode.instances) * now)
        return SimOutcome(self.policy.name, [p.record for p in self.progress], self.stats)

    def _want_decision(self, now: float) -> None:
        if not self.decide_queued:
            self.decide_queued = True
            self.events.push(max(now, self.scheduler_free_s), PRIORITY_DECIDE, DECIDE)

    def _chunk_end(self, payload: tuple[int, ChunkRecord], now: float) -> None:
        i, chunk = payload
        p = self.progress[i]
        for g in chunk.instances:
            self.running[g] = False
        p.running = False
        request = p.record.request
        if chunk.end_token == request.prompt_tokens:
            p.record.token_times.append(now)  # the last chunk samples the first token
            del self.pending[i]
            self.decode.submit(p.record, now)
        self._want_decision(now)

    # -- decisions ---------------------------------------------------------------------------
    def _decide(self, now: float) -> None:
        busy = sum(self.running)
        self.load.update(now, busy / self.num_prefill)
        if busy == self.num_prefill or all(p.running for p in self.pending.values()):
            self.stats["decisions_skipped"] = int(self.stats["decisions_skipped"]) + 1
            return
        view = self._view(now)
        decision = self.policy.decide(view, self.base_problem)
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
        if not decision.launches and not any(self.running) and self.pending:
            raise RuntimeError(f"{self.policy.name} launched nothing at t={now:.6f}s with every "
                               f"prefill instance idle and {len(self.pending)} requests pending")

    def _view(self, now: float) -> PrefillView:
        availability = planner_availability(self.running, self.planned_end, now, OVERRUN_S)
        pending = []
        for p in self.pending.values():
            r = p.record.request
            if p.prefilled == r.prompt_tokens:
                continue  # its last chunk is running: nothing left to plan
            pending.append(PendingRequest(
                r.request_id, r.arrival_s, r.prompt_tokens, r.ttft_slo_s,
                prefilled_tokens=p.prefilled, kv_instances=p.kv_instances,
                ready_s=ready_after(p.running, p.planned_ready_s, now, OVERRUN_S),
            ))
        return PrefillView(now, availability, tuple(not b for b in self.running),
                           tuple(pending), self.load.load)

    def _launch(self, launch: Launch, start_s: float) -> None:
        i = self.by_id.get(launch.request_id)
        p = self.pending.get(i) if i is not None else None
        where = f"{self.policy.name}: launch of {launch.request_id!r}"
        if p is None or i is None:
            raise RuntimeError(f"{where}: not a pending request")
        if p.running or launch.start_token != p.prefilled or \
                not p.prefilled < launch.end_token <= p.record.request.prompt_tokens:
            raise RuntimeError(f"{where}: tokens [{launch.start_token}, {launch.end_token}) do "
                               f"not continue its prefill at {p.prefilled}")
        if any(self.running[g] for g in launch.instances) or \
                not set(p.kv_instances) <= set(launch.instances):
            raise RuntimeError(f"{where}: instances {launch.instances} busy or not nested")
        tokens = launch.end_token - launch.start_token
        planned = self.cost_model.chunk_seconds_on(tokens, launch.start_token, launch.instances)
        actual = self.noise.apply(planned)
        chunk = ChunkRecord(launch.start_token, launch.end_token, launch.instances,
                            start_s, start_s + actual)
        p.record.chunks.append(chunk)
        p.prefilled = launch.end_token
        p.kv_instances = launch.instances
        p.planned_ready_s = start_s + planned
        p.running = True
        for g in launch.instances:
            self.running[g] = True
            self.planned_end[g] = start_s + planned
            self.busy_s[g] += actual
        key = f"chunks_sp{len(launch.instances)}"
        self.stats[key] = int(self.stats.get(key, 0)) + 1
        self.stats["chunks"] = int(self.stats["chunks"]) + 1
        self.events.push(start_s + actual, PRIORITY_COMPLETE, CHUNK_END, (i, chunk))


def simulate_disaggregated(requests: Sequence[SimRequest], cost_model: CostModel,
                           policy: PrefillPolicy, options: SimOptions | None = None) -> SimOutcome:
    return DisaggregatedSimulator(requests, cost_model, policy, options).run()
