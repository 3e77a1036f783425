"""The serving engine: the simulator's scheduler objects driven by a wall clock on live workers.

Two asyncio loops share one event-loop thread (so every call to the actors is issued in one
global order, see `worker.py`):
- prefill: on each arrival or chunk completion, the prefill policy (`CdspPolicy`, the one the
  simulator runs) plans every waiting request over the prefill instances' availability; its
  plans are validated inside the policy, and the chunks that start now are launched, each on all
  the actors of its group together. After a request's last chunk its first token is out.
- decode: the decode dispatcher (`solver.dispatch`) places prefilled requests on decode
  instances with room (the KV may be split over several); their KV moves point to point; then
  continuous batching runs one step at a time over every decoding request, streaming tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tetris.evaluation.prefill_policies import (
    CdspPolicy,
    Decision,
    Launch,
    LoadTracker,
    PrefillView,
    SolverClock,
    planner_availability,
    ready_after,
)
from tetris.models.tokenizer import Tokenizer
from tetris.runtime.actors import WorkerPool
from tetris.runtime.admission import Limits, check_request
from tetris.runtime.decode_runner import DecodeRunner
from tetris.runtime.detokenize import Detokenizer
from tetris.runtime.engine_api import (
    GenerationRequest,
    QueueFull,
    RequestRejected,
    RequestSummary,
)
from tetris.runtime.engine_request import EngineError, EngineRequest, Phase, Stream
from tetris.runtime.metrics import ServingMetrics
from tetris.runtime.sampling import SamplingParams
from tetris.runtime.worker import PrefillResult
from tetris.solver.api import solve
from tetris.solver.cost_model import CostModel
from tetris.solver.plan import ChunkSpec
from tetris.solver.plan_json import report_from_result
from tetris.solver.problem import PendingRequest, Problem
from tetris.solver.request import SloSpec

log = logging.getLogger(__name__)
OVERRUN_S = 1e-3  # a chunk past its planned end is assumed to end this much later
LOAD_TAU_S = 10.0


@dataclass(frozen=True)
class EngineOptions:
    max_queue: int = 64
    default_max_tokens: int = 1024
    decode_max_batch: int = 32
    decode_max_sp: int = 2
    solver: str = "greedy"
    time_limit_ms: float = 20.0
    quantum_s: float | str | None = "auto"
    block_tokens: int = 64
    max_chunks: int | None = None
    max_sp: int | None = None
    slo: SloSpec = field(default_factory=lambda: SloSpec(ttft_scale=5.0))


class Engine:
    """Implements `engine_api.EngineAPI`. `start()` inside the serving event loop."""

    def __init__(self, pool: WorkerPool, tokenizer: Tokenizer, model_name: str,
                 context_tokens: int, vocab_size: int, cost_model: CostModel,
                 options: EngineOptions, metrics: ServingMetrics) -> None:
        self.pool, self.tokenizer, self.metrics = pool, tokenizer, metrics
        self.model_name, self.context_tokens = model_name, context_tokens
        self.default_max_tokens = options.default_max_tokens
        self.cost_model, self.options = cost_model, options
        n = pool.num_prefill
        self.limits = Limits(context_tokens, vocab_size, pool.prefill_kv_tokens,
                             min(n, options.max_sp or n), pool.decode_kv_tokens,
                             min(options.decode_max_sp, len(pool.decode)))
        self.kv_used = [0] * n  # prefill KV tokens held per instance
        self.policy = CdspPolicy("tetris" if options.solver == "cp" else f"tetris-{options.solver}",
                                 solver=options.solver, time_limit_ms=options.time_limit_ms,
                                 clock=SolverClock.MEASURED, quantum_s=options.quantum_s)
        self.base_problem = Problem(cost_model, (0.0,) * n, (), block_tokens=options.block_tokens,
                                    max_chunks=options.max_chunks, max_sp=options.max_sp)
        self.requests: dict[str, EngineRequest] = {}  # in prefill (arrival order)
        self.busy = [False] * n
        self.planned_end = [0.0] * n
        self.busy_s = [0.0] * n
        self.decode = DecodeRunner(pool, options.decode_max_batch, options.decode_max_sp, metrics,
                                   self)
        self.last_decision: Decision | None = None
        self.load = LoadTracker(LOAD_TAU_S)
        self.t0 = time.monotonic()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._running = False
        self.failure: str | None = None

    # -- EngineAPI --------------------------------------------------------------------------
    @property
    def serving(self) -> bool:
        return self._running and self.failure is None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.tokenizer.encode_chat(messages)

    async def submit(self, request: GenerationRequest) -> Stream:
        check_request(self.limits, request.prompt_ids, request.sampling.max_tokens)
        prompt = len(request.prompt_ids)
        queued = len(self.requests) + self.decode.num_requests
        if queued >= self.options.max_queue:
            raise QueueFull(f"{queued} requests are in the queue (waiting, prefilling or "
                            f"decoding), its configured bound (max_queue) is "
                            f"{self.options.max_queue}: retry later")
        if request.request_id in self.requests or self.decode.has(request.request_id):
            raise RequestRejected(f"request id {request.request_id!r} is in use", "request_id")
        state = EngineRequest(
            request=request, arrival_s=self.now(), arrival_wall=time.monotonic(),
            ttft_slo_s=self.options.slo.ttft_for(self.cost_model.best_isolated_ttft(prompt)),
            detok=Detokenizer(self.tokenizer.decode, request.sampling.stop),
            eos_ids=self.tokenizer.eos_ids, summary=RequestSummary(prompt))
        self.requests[request.request_id] = state
        self._update_gauges()
        self._wake.set()
        return Stream(state, self.cancel)

    def live_plan(self) -> dict[str, Any]:
        """The plan of the latest decision, times relative to it; `decided_s_ago` says when."""
        decision = self.last_decision
        if decision is None or decision.problem is None or decision.result is None:
            empty = Problem(self.cost_model, self._availability(self.now()), (),
                            now_s=self.now(), block_tokens=self.options.block_tokens)
            report = report_from_result(empty, solve(empty, "greedy"))
            return {**report.model_dump(mode="json"), "decided_s_ago": None}
        report = report_from_result(decision.problem, decision.result)
        return {**report.model_dump(mode="json"),
                "decided_s_ago": self.now() - decision.problem.now_s}

    # -- lifecycle --------------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    async def start(self) -> None:
        self._running = True
        self._spawn(self._prefill_loop(), essential=True)
        self._spawn(self.decode.run(), essential=True)

    async def stop(self) -> None:
        self._running = False
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.decode.stop()

    def _spawn(self, coro: Any, essential: bool = False) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(t, essential))

    def _task_done(self, task: asyncio.Task[Any], essential: bool) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        err = task.exception()
        if err is not None:
            log.error("engine task failed", exc_info=err)
        if essential and self._running:
            # A scheduling loop ended: nothing would move any more, so stop claiming to serve.
            self.failure = f"engine loop stopped: {err!r}"

    # -- prefill ----------------------------------------------------------------------------
    async def _prefill_loop(self) -> None:
        while self._running:
            await self._wake.wait()
            self._wake.clear()
            try:
                self._decide()
            except Exception as err:
                # A planner error: fail the requests it could not plan (with an error their
                # clients see) and go on serving the others.
                log.exception("prefill planning failed")
                for state in list(self.requests.values()):
                    if not state.chunk_running:
                        self._release_prefill(state)
                        state.fail(f"planning failed: {err}")

    def _availability(self, now: float) -> tuple[float, ...]:
        return planner_availability(self.busy, self.planned_end, now, OVERRUN_S)

    def _decide(self) -> None:
        now = self.now()
        self._update_load(now)
        pending = [PendingRequest(
            s.request_id, s.arrival_s, s.prompt_tokens, s.ttft_slo_s,
            prefilled_tokens=s.prefilled, kv_instances=s.kv_instances,
            ready_s=ready_after(s.chunk_running, s.planned_ready_s, now, OVERRUN_S))
            for s in self.requests.values() if s.prefilled < s.prompt_tokens]
        if not pending or all(self.busy):
            return
        view = PrefillView(now, self._availability(now), tuple(not b for b in self.busy),
                           tuple(pending), self.load.load)
        decision = self.policy.decide(view, self.base_problem)
        if decision.result is not None:
            self.last_decision = decision
            self.metrics.observe_solver(decision.solver_s)
        for launch in decision.launches:
            state = self.requests[launch.request_id]
            if self._launchable(state, launch):
                self._begin_chunk(state, launch)

    def _update_load(self, now: float) -> None:
        self.load.update(now, sum(self.busy) / len(self.busy))

    def _kv_shares(self, spec: ChunkSpec) -> dict[int, int]:
        return {g: spec.tokens_on(g) for g in spec.instances}

    def _launchable(self, state: EngineRequest, launch: Launch) -> bool:
        """Check before acting: the request is still live and each instance of the group has
        KV room for its share (planners bound one request's KV, not the sum over requests)."""
        if state.cancelled or state.request_id not in self.requests:
            return False
        spec = ChunkSpec(launch.start_token, launch.end_token, launch.instances)
        room = self.pool.prefill_kv_tokens
        return all(self.kv_used[g] + n <= room for g, n in self._kv_shares(spec).items())

    def _begin_chunk(self, state: EngineRequest, launch: Launch) -> None:
        """The launch's bookkeeping, synchronously (the next decision must see its instances
        busy and its KV taken), then the chunk itself as a task."""
        start, end, group = launch.start_token, launch.end_token, launch.instances
        spec = ChunkSpec(start, end, group)
        now = self.now()
        self._update_load(now)
        planned = self.cost_model.chunk_seconds_on(end - start, start, group)
        for g, n in self._kv_shares(spec).items():
            self.kv_used[g] += n
            state.prefill_held[g] = state.prefill_held.get(g, 0) + n
        for g in group:
            self.busy[g], self.planned_end[g] = True, now + planned
        if state.phase is Phase.WAITING:
            state.phase = Phase.PREFILL
            self.metrics.observe_queue_time(time.monotonic() - state.arrival_wall)
            self._update_gauges()
        state.chunk_running, state.planned_ready_s = True, now + planned
        state.prefilled, state.kv_instances = end, group
        ids = list(state.request.prompt_ids[start:end])
        sampling = state.request.sampling if end == state.prompt_tokens else None
        self.pool.ensure_group(group)
        self._spawn(self._run_chunk(state, spec, ids, sampling))

    async def _run_chunk(self, state: EngineRequest, spec: ChunkSpec, ids: list[int],
                         sampling: SamplingParams | None) -> None:
        group = spec.instances
        started = time.monotonic()
        # Every rank's call must return before its instance is free again: a failing rank's
        # peers may still be inside the chunk.
        results = await asyncio.gather(*(
            self.pool.prefill[g].prefill.remote(state.request_id, spec, ids, sampling)
            for g in group), return_exceptions=True)
        seconds = time.monotonic() - started
        self._update_load(self.now())
        for g in group:
            self.busy[g] = False
            self.busy_s[g] += seconds
            self.metrics.set_instance_busy(f"prefill-{g}", "prefill",
                                           self.busy_s[g] / max(self.now(), 1e-9))
        state.chunk_running = False
        self._wake.set()
        self.decode.wake()  # a KV transfer may have waited for these instances
        try:
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise EngineError(f"prefill of {state.request_id!r} failed: {errors[0]}")
            self._chunk_done(state, spec, seconds, [r for r in results
                                                    if not isinstance(r, BaseException)])
        except Exception as err:
            log.exception("prefill chunk failed")
            self._release_prefill(state)
            state.fail(str(err))
            self._update_gauges()

    def _chunk_done(self, state: EngineRequest, spec: ChunkSpec, seconds: float,
                    results: list[PrefillResult]) -> None:
        state.record_chunk(spec.start_token, spec.end_token, spec.instances, seconds)
        self.metrics.count_chunk(spec.sp)
        if state.cancelled:
            self._release_prefill(state)
            return
        if spec.end_token < state.prompt_tokens:
            return
        first = next(r for r in results if r.first_token is not None)
        assert first.first_token is not None
        state.sampler_state = first.sampler_state
        self.metrics.observe_ttft(time.monotonic() - state.arrival_wall)
        finish = state.add_tokens([first.first_token])
        del self.requests[state.request_id]
        if finish is not None:
            self._release_prefill(state)
            state.phase = Phase.DONE
            self.decode.finished(state, finish)
        else:
            state.phase = Phase.TO_DECODE
            self.decode.submit(state)
        self._update_gauges()

    # -- prefill KV and instances, as the decode side hands KV over ---------------------------
    def prefill_kv_moved(self, state: EngineRequest, free_remote: bool) -> None:
        """The request's prefill KV is gone (sent to decode) or to be freed (`free_remote`)."""
        for g, n in state.prefill_held.items():
            self.kv_used[g] -= n
            if free_remote:
                self.pool.prefill[g].free.remote(state.request_id)
        state.prefill_held.clear()
        self._wake.set()

    def try_hold(self, instances: Sequence[int]) -> bool:
        """Take idle prefill instances for a KV transfer (they send, so they cannot compute)."""
        if any(self.busy[g] for g in instances):
            return False
        for g in instances:
            self.busy[g], self.planned_end[g] = True, self.now() + OVERRUN_S
        return True

    def release(self, instances: Sequence[int]) -> None:
        for g in instances:
            self.busy[g] = False
        self._wake.set()

    def _release_prefill(self, state: EngineRequest) -> None:
        """Forget the request's prefill and free its KV on every instance holding some."""
        self.requests.pop(state.request_id, None)
        self.prefill_kv_moved(state, free_remote=True)
        self._update_gauges()

    async def cancel(self, state: EngineRequest) -> None:
        """A client went away: free its KV and its place in the plan, end its stream."""
        if state.phase is Phase.DONE or state.cancelled:
            return
        state.cancelled = True
        if state.phase in (Phase.WAITING, Phase.PREFILL):
            # A running chunk frees the KV when it completes (see _chunk_done).
            if state.chunk_running:
                self.requests.pop(state.request_id, None)
            else:
                self._release_prefill(state)
        else:
            self.decode.cancel(state)
        state.finish("abort")
        self.metrics.request_finished("abort")
        self._update_gauges()
        self._wake.set()

    def _update_gauges(self) -> None:
        waiting = sum(1 for r in self.requests.values() if r.phase is Phase.WAITING)
        running = len(self.requests) - waiting + self.decode.num_requests
        self.metrics.set_requests(running, waiting)
