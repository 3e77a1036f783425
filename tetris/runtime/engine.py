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
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tetris.evaluation.prefill_policies import (
    CdspPolicy,
    Decision,
    Launch,
    PrefillView,
    SolverClock,
)
from tetris.models.tokenizer import Tokenizer
from tetris.runtime.actors import WorkerPool
from tetris.runtime.chunking import ChunkSpec
from tetris.runtime.decode_runner import DecodeRunner
from tetris.runtime.detokenize import Detokenizer
from tetris.runtime.engine_api import (
    GenerationRequest,
    QueueFull,
    RequestRejected,
    RequestSummary,
)
from tetris.runtime.engine_request import EngineRequest, Phase, Stream
from tetris.runtime.server.metrics import ServingMetrics
from tetris.solver.api import solve
from tetris.solver.cost_model import CostModel
from tetris.solver.plan_json import report_from_result
from tetris.solver.problem import PendingRequest, Problem
from tetris.solver.request import SloSpec

log = logging.getLogger(__name__)
OVERRUN_S = 1e-3  # a chunk past its planned end is assumed to end this much later
LOAD_TAU_S = 10.0


@dataclass(frozen=True)
class EngineOptions:
    max_queue: int = 64
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
                 context_tokens: int, cost_model: CostModel, options: EngineOptions,
                 metrics: ServingMetrics) -> None:
        self.pool, self.tokenizer, self.metrics = pool, tokenizer, metrics
        self.model_name, self.context_tokens = model_name, context_tokens
        self.cost_model, self.options = cost_model, options
        n = pool.num_prefill
        self.policy = CdspPolicy("tetris" if options.solver == "cp" else f"tetris-{options.solver}",
                                 solver=options.solver, time_limit_ms=options.time_limit_ms,
                                 clock=SolverClock.MEASURED, quantum_s=options.quantum_s)
        self.base_problem = Problem(cost_model, (0.0,) * n, (), block_tokens=options.block_tokens,
                                    max_chunks=options.max_chunks, max_sp=options.max_sp)
        self.requests: dict[str, EngineRequest] = {}  # in prefill (arrival order)
        self.busy = [False] * n
        self.planned_end = [0.0] * n
        self.busy_s = [0.0] * n
        self.decode = DecodeRunner(pool, options.decode_max_batch, options.decode_max_sp, metrics)
        self.last_decision: Decision | None = None
        self.load, self.load_t = 0.0, 0.0
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
        prompt, max_tokens = len(request.prompt_ids), request.sampling.max_tokens
        if prompt == 0:
            raise RequestRejected("the prompt is empty", "prompt")
        if prompt + max_tokens > self.context_tokens:
            raise RequestRejected(
                f"this model's context is {self.context_tokens} tokens; the prompt has {prompt} "
                f"and max_tokens is {max_tokens} ({prompt + max_tokens} in all)", "max_tokens")
        self.decode.check_fits(prompt, max_tokens)
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
        self._spawn(self._prefill_loop())
        self._spawn(self.decode.run())

    async def stop(self) -> None:
        self._running = False
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.decode.stop()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- prefill ----------------------------------------------------------------------------
    async def _prefill_loop(self) -> None:
        while self._running:
            await self._wake.wait()
            self._wake.clear()
            try:
                self._decide()
            except Exception as err:
                # A planner error is a bug; fail loudly rather than leave requests hanging.
                log.exception("prefill planning failed")
                self.failure = f"prefill planning failed: {err}"
                for state in list(self.requests.values()):
                    self._drop(state)
                    state.fail(self.failure)

    def _availability(self, now: float) -> tuple[float, ...]:
        return tuple(max(self.planned_end[g], now + OVERRUN_S) if self.busy[g] else now
                     for g in range(self.pool.num_prefill))

    def _decide(self) -> None:
        now = self.now()
        self._update_load(now)
        pending = [PendingRequest(
            s.request_id, s.arrival_s, s.prompt_tokens, s.ttft_slo_s,
            prefilled_tokens=s.prefilled, kv_instances=s.kv_instances,
            ready_s=max(s.planned_ready_s, now + OVERRUN_S) if s.chunk_running else None)
            for s in self.requests.values() if s.prefilled < s.prompt_tokens]
        if not pending or all(self.busy):
            return
        view = PrefillView(now, self._availability(now), tuple(not b for b in self.busy),
                           tuple(pending), self.load)
        decision = self.policy.decide(view, self.base_problem)
        if decision.result is not None:
            self.last_decision = decision
            self.metrics.observe_solver(decision.solver_s)
        for launch in decision.launches:
            self._spawn(self._run_chunk(self.requests[launch.request_id], launch))

    def _update_load(self, now: float) -> None:
        dt = now - self.load_t
        if dt > 0:
            share = sum(self.busy) / len(self.busy)
            self.load += -math.expm1(-dt / LOAD_TAU_S) * (share - self.load)
            self.load_t = now

    async def _run_chunk(self, state: EngineRequest, launch: Launch) -> None:
        start, end, group = launch.start_token, launch.end_token, launch.instances
        now = self.now()
        self._update_load(now)
        planned = self.cost_model.chunk_seconds_on(end - start, start, group)
        for g in group:
            self.busy[g], self.planned_end[g] = True, now + planned
        if state.phase is Phase.WAITING:
            state.phase = Phase.PREFILL
            self.metrics.observe_queue_time(time.monotonic() - state.arrival_wall)
            self._update_gauges()
        state.chunk_running, state.planned_ready_s = True, now + planned
        state.prefilled, state.kv_instances = end, group
        last = end == state.prompt_tokens
        spec = ChunkSpec(start, end, group)
        ids = list(state.request.prompt_ids[start:end])
        sampling = state.request.sampling if last else None
        self.pool.ensure_group(group)
        started = time.monotonic()
        try:
            results = await asyncio.gather(*(
                self.pool.prefill[g].prefill.remote(state.request_id, spec, ids, sampling)
                for g in group))
        except Exception as err:
            log.exception("prefill chunk failed")
            self._release_prefill(state)
            state.fail(f"prefill of {state.request_id!r} failed: {err}")
            return
        finally:
            self._update_load(self.now())
            seconds = time.monotonic() - started
            for g in group:
                self.busy[g] = False
                self.busy_s[g] += seconds
                self.metrics.set_instance_busy(f"prefill-{g}", "prefill",
                                               self.busy_s[g] / max(self.now(), 1e-9))
            self._wake.set()
        state.chunk_running = False
        state.record_chunk(start, end, group, seconds)
        self.metrics.count_chunk(len(group))
        if state.cancelled:
            self._release_prefill(state)
            return
        if not last:
            return
        first = next(r for r in results if r.first_token is not None)
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

    def _release_prefill(self, state: EngineRequest) -> None:
        """Free the request's prefill KV (every instance that may hold some of it)."""
        self.requests.pop(state.request_id, None)
        for g in state.kv_instances:
            self.pool.prefill[g].free.remote(state.request_id)
        self._update_gauges()

    def _drop(self, state: EngineRequest) -> None:
        if not state.chunk_running:
            self._release_prefill(state)

    async def cancel(self, state: EngineRequest) -> None:
        """A client went away: free its KV and its place in the plan, end its stream."""
        if state.phase is Phase.DONE or state.cancelled:
            return
        state.cancelled = True
        if state.phase in (Phase.WAITING, Phase.PREFILL):
            # A running chunk frees the KV when it completes (see _run_chunk).
            self._drop(state)
            self.requests.pop(state.request_id, None)
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
