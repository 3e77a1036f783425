"""The serving engine: the policy the simulator measures, driven by a wall clock on live workers.

One asyncio loop runs everything that touches the workers, so every call to an instance is
issued in one global order (see `worker.py`):
- the scheduling loop, woken by every event (arrival, chunk end, KV moved, request ended):
  the prefill policy (`tetris.solver.policy.make_policy`, the simulator's) plans the ledger's
  view on the planner thread — never on this loop — its launches are checked against the ledger
  as it is by then and started, each on all the ranks of its group together; then the decode
  side places prefilled requests on decode instances (`decode_runner.py`; with KV streaming,
  from a request's first chunk's end on, its KV following chunk by chunk: `kv_stream.py`);
- one task per running chunk, and the decode loop.
CP-SAT refinement (the `tetris` policy) runs on a thread of its own and its plans are used at a
later decision, exactly as in the simulator. With elastic roles (`settings.roles`, an elastic
pool) a role task re-decides every few seconds which GPUs prefill and which decode
(`roles.py`). The `Ledger` is the one book of what runs where and what KV each request holds,
for both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from tetris.runtime.admission import Limits, check_request
from tetris.runtime.decode_runner import DecodeRunner
from tetris.runtime.detokenize import Detokenizer
from tetris.runtime.engine_api import (
    EngineHealth,
    GenerationRequest,
    QueueFull,
    RequestRejected,
    RequestSummary,
)
from tetris.runtime.engine_request import EngineRequest, Phase, Stream
from tetris.runtime.instance_pool import InstancePool, PrefillResult
from tetris.runtime.live_requests import LiveRequests
from tetris.runtime.metrics import ServingMetrics
from tetris.runtime.recovery import Recovery
from tetris.runtime.roles import RoleRunner
from tetris.solver.api import solve
from tetris.solver.cost_model import CostModel
from tetris.solver.plan_json import report_from_result
from tetris.solver.policy.dispatch import DecodeQueue
from tetris.solver.policy.ledger import Ledger
from tetris.solver.policy.registry import make_policy, make_role_planner
from tetris.solver.policy.settings import PolicySettings
from tetris.solver.policy.view import Decision, Launch, SolverClock
from tetris.solver.slo import SloSpec

log = logging.getLogger(__name__)
SWITCH_INTERVAL_S = 1e-3


class TextCodec(Protocol):
    """The tokenizer as the engine uses it (`tetris.models.tokenizer.Tokenizer`)."""

    eos_ids: frozenset[int]

    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True)
class EngineOptions:
    max_queue: int = 64
    default_max_tokens: int = 1024
    policy: str = "tetris-greedy"  # a name of `tetris.solver.policy.registry.POLICIES`
    settings: PolicySettings = field(default_factory=PolicySettings)
    slo: SloSpec = field(default_factory=lambda: SloSpec(ttft_scale=5.0))
    request_timeout_s: float | None = None  # from arrival to the last token; None: no limit
    initial_prefill: int | None = None  # elastic roles: GPUs prefilling at the start


class Engine:
    """Implements `engine_api.EngineAPI`. `start()` inside the serving event loop."""

    def __init__(self, pool: InstancePool, tokenizer: TextCodec, model_name: str,
                 context_tokens: int, vocab_size: int, cost_model: CostModel,
                 options: EngineOptions, metrics: ServingMetrics) -> None:
        self.pool, self.tokenizer, self.metrics = pool, tokenizer, metrics
        self.model_name, self.context_tokens = model_name, context_tokens
        self.default_max_tokens = options.default_max_tokens
        self.cost_model, self.options = cost_model, options
        s = options.settings
        n, d = pool.num_prefill, pool.num_decode
        decode_sp = min(s.decode_max_sp or d, d)
        role_planner = make_role_planner(s)
        if (role_planner is not None) != pool.elastic:
            raise ValueError(f"roles {s.roles!r} on a pool whose actors "
                             f"{'serve either role' if pool.elastic else 'have fixed roles'}: "
                             "elastic roles need an elastic pool, and it needs them")
        if pool.elastic:
            # Some GPUs always prefill, so the largest request decodes on fewer than all.
            decode_sp = min(decode_sp, d - 1, -(-context_tokens // pool.decode_kv_tokens))
        self.limits = Limits(context_tokens, vocab_size, pool.prefill_kv_tokens,
                             min(n, s.max_sp or n), pool.decode_kv_tokens, decode_sp)
        self.ledger = Ledger(n, d, s, prefill_kv_tokens=pool.prefill_kv_tokens,
                             elastic=pool.elastic)
        self._planner = ThreadPoolExecutor(1, thread_name_prefix="tetris-planner")
        self._refiner = ThreadPoolExecutor(1, thread_name_prefix="tetris-refiner")
        self.policy = make_policy(options.policy, s, cost_model, clock=SolverClock.MEASURED,
                                  refine_on=self._refiner)
        self._wake = asyncio.Event()
        queue = DecodeQueue(pool.decode_kv_tokens, s.decode_max_batch, decode_sp)
        self.requests = LiveRequests(self.ledger, pool, queue, metrics, self._wake)
        self.recovery = Recovery(self)
        self.decode = DecodeRunner(pool, self.ledger, self.requests, metrics, self.now,
                                   self.recovery.work_failed)
        self.roles: RoleRunner | None = None
        if role_planner is not None:
            self.roles = RoleRunner(
                role_planner, self.ledger, self.decode, self.requests, cost_model, metrics,
                kv_tokens=pool.decode_kv_tokens,
                initial_prefill=options.initial_prefill or max(1, n - max(decode_sp, n // 2)),
                interval_s=s.role_interval_s, tau_s=s.role_tau_s,
                max_request_kv=decode_sp * pool.decode_kv_tokens, now=self.now,
                planner_thread=self._planner, wake=self.wake)
        self.last_decision: Decision | None = None
        self.t0 = time.monotonic()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._running = False
        self.failure: str | None = None
        self.instances_lost = 0
        self.requests_recovered = 0
        self.chunks_in_flight = 0

    # -- EngineAPI --------------------------------------------------------------------------
    @property
    def serving(self) -> bool:
        return self._running and self.failure is None

    def health(self) -> EngineHealth:
        p_live = sum(not lost for lost in self.ledger.lost)
        d_live = sum(not lost for lost in self.ledger.decode_lost)
        status: Literal["ok", "degraded", "unavailable"] = "ok"
        if not self.serving or not p_live or not d_live:
            status = "unavailable"
        elif p_live < self.pool.num_prefill or d_live < self.pool.num_decode:
            status = "degraded"
        return EngineHealth(status, p_live, self.pool.num_prefill, d_live, self.pool.num_decode,
                            self.instances_lost, self.requests_recovered)

    @property
    def queue_room(self) -> int:
        return max(self.options.max_queue - len(self.requests), 0)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.tokenizer.encode_chat(messages)

    async def submit(self, request: GenerationRequest) -> Stream:
        check_request(self.limits, request.prompt_ids, request.sampling.max_tokens)
        prompt = len(request.prompt_ids)
        if len(self.requests) >= self.options.max_queue:
            raise QueueFull(f"{len(self.requests)} requests are in the queue (waiting, "
                            "prefilling or decoding), its configured bound (max_queue) is "
                            f"{self.options.max_queue}: retry later")
        if request.request_id in self.requests or request.request_id in self.ledger:
            raise RequestRejected(f"request id {request.request_id!r} is in use", "request_id")
        state = EngineRequest(
            request=request, arrival_s=self.now(), arrival_wall=time.monotonic(),
            ttft_slo_s=self.options.slo.ttft_for(self.cost_model.best_isolated_ttft(prompt)),
            detok=Detokenizer(self.tokenizer.decode, request.sampling.stop),
            eos_ids=self.tokenizer.eos_ids, summary=RequestSummary(prompt))
        self.ledger.arrive(state.request_id, state.arrival_s, prompt, state.ttft_slo_s)
        self.requests.add(state)
        if self.roles is not None:
            self.roles.arrived(prompt, prompt + request.sampling.max_tokens - 1,
                               state.ttft_slo_s)
        if self.options.request_timeout_s is not None:
            state.deadline = asyncio.get_running_loop().call_later(
                self.options.request_timeout_s, self._expire, state)
        self._wake.set()
        return Stream(state, self.cancel)

    async def cancel(self, state: EngineRequest) -> None:
        """A client went away: free its KV and its place in the plan, end its stream (a chunk
        or KV transfer in flight frees its part when it ends)."""
        if state.phase is Phase.DONE or state.cancelled:
            return
        self.decode.forget(state)
        self.requests.cancelled(state)

    def _expire(self, state: EngineRequest) -> None:
        if state.phase is Phase.DONE or state.cancelled:
            return
        self.decode.forget(state)
        self.requests.failed(state, f"the request ran past the server's deadline of "
                             f"{self.options.request_timeout_s:g} s (request_timeout_s) and "
                             f"was stopped after {len(state.output)} tokens", timed_out=True)

    def live_plan(self) -> dict[str, Any]:
        """The plan of the latest decision, times relative to it; `decided_s_ago` says when."""
        decision = self.last_decision
        if decision is None or decision.problem is None or decision.result is None:
            now = self.now()
            empty = self.options.settings.problem(self.cost_model,
                                                  self.ledger.view(now).availability_s, (), now)
            report = report_from_result(empty, solve(empty, "greedy"))
            return {**report.model_dump(mode="json"), "decided_s_ago": None}
        report = report_from_result(decision.problem, decision.result)
        return {**report.model_dump(mode="json"),
                "decided_s_ago": self.now() - decision.problem.now_s}

    # -- lifecycle --------------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    @property
    def paused(self) -> bool:
        """While every rank joins a new data plane (`recovery.py`): no new work is sent."""
        return self.decode.paused

    @paused.setter
    def paused(self, value: bool) -> None:
        self.decode.paused = value  # the decode side's own flag is the one flag

    @property
    def running(self) -> bool:
        return self._running

    def wake(self) -> None:
        self._wake.set()
        self.decode.wake()

    async def drained(self) -> None:
        """Wait until no call is in flight on any worker (new work is held by `paused`)."""
        while self.chunks_in_flight or self.decode.in_flight:
            await asyncio.sleep(0.01)

    async def start(self) -> None:
        # The planner and refiner threads run Python beside this loop; at the default 5 ms
        # GIL switch interval the loop waited up to 19 ms for the GIL while CP-SAT's model was
        # built (tests/test_engine.py), at 1 ms about 5 ms. It is process-wide: this process
        # exists to serve.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._running = True
        self._spawn(self._schedule_loop(), essential=True)
        self._spawn(self.decode.run(), essential=True)
        self._spawn(self.recovery.watch(), essential=True)
        if self.roles is not None:
            self._spawn(self.roles.run(), essential=True)
        self.recovery.update_gauges()

    async def stop(self) -> None:
        self._running = False
        self.decode.stop()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._planner.shutdown(wait=False, cancel_futures=True)
        self._refiner.shutdown(wait=False, cancel_futures=True)

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

    # -- scheduling ---------------------------------------------------------------------------
    async def _schedule_loop(self) -> None:
        while self._running:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._decide()
            except Exception as err:
                # A planner error: fail the requests it could not plan (with an error their
                # clients see) and go on serving the others.
                log.exception("prefill planning failed")
                for rid, entry in list(self.ledger.prefill.items()):
                    state = self.requests.get(rid)
                    if state is not None and not entry.running:
                        self.requests.failed(state, f"planning failed: {err}")
            self.decode.admit()

    async def _decide(self) -> None:
        if self.paused or self.ledger.nothing_to_decide(self.now()):
            return
        view = self.ledger.view(self.now())
        decision = await asyncio.get_running_loop().run_in_executor(
            self._planner, self.policy.decide, view)
        if decision.result is not None:
            self.last_decision = decision
            self.metrics.observe_solver(decision.solver_s)
        for launch in decision.launches:
            # The ledger may have moved on while the planner thought (a cancel, a chunk end,
            # an instance lost); after a loss only existing groups may be used until reform.
            if self.ledger.refusal(launch) is None and not self.paused and \
                    self.pool.can_group(launch.chunk.instances):
                self._begin_chunk(launch)

    def _begin_chunk(self, launch: Launch) -> None:
        """The launch's bookkeeping, synchronously (the next decision must see its instances
        busy and its KV taken), then the chunk itself as a task."""
        state = self.requests.by_id[launch.request_id]
        c = launch.chunk
        planned = self.cost_model.chunk_seconds_on(c.tokens, c.start_token, c.instances)
        self.ledger.launch(launch, self.now(), planned)
        if state.phase is Phase.WAITING:
            state.phase = Phase.PREFILL
            if not state.redos:
                self.metrics.observe_queue_time(time.monotonic() - state.arrival_wall)
            self.requests.update_gauges()
        prefill_ids = state.prefill_ids
        ids = list(prefill_ids[c.start_token:c.end_token])
        sampling = state.request.sampling if c.end_token == len(prefill_ids) else None
        self.pool.ensure_group(c.instances)
        # Counted before the task runs: a drain (`drained`) starting meanwhile must wait for it.
        self.chunks_in_flight += 1
        self._spawn(self._run_chunk(state, launch, ids, sampling))

    async def _run_chunk(self, state: EngineRequest, launch: Launch, ids: list[int],
                         sampling: Any) -> None:
        c = launch.chunk
        started = time.monotonic()
        try:
            results = await self.pool.prefill(state.request_id, c, ids, sampling)
        finally:
            self.chunks_in_flight -= 1
        seconds = time.monotonic() - started
        _, released = self.ledger.chunk_ended(state.request_id, seconds)
        self.requests.free(released)  # it was cancelled while the chunk ran
        if self.roles is not None:
            self.roles.chunk_ended(c.instances)
        self._wake.set()
        for g in c.instances:
            self.metrics.set_instance_busy(f"prefill-{g}", "prefill",
                                           self.ledger.busy_s[g] / max(self.now(), 1e-9))
        if released is not None or state.phase is Phase.DONE:
            return
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            log.error("prefill chunk of %r failed: %s", state.request_id, errors[0])
            if not self.recovery.work_failed(state, errors):
                self.requests.failed(state, f"prefill of {state.request_id!r} failed: "
                                     f"{errors[0]}")
            return
        if state.redo_pending:
            self.recovery.redo(state)  # KV of it was on an instance lost meanwhile
            return
        self.metrics.count_chunk(c.sp)
        state.record_chunk(c.start_token, c.end_token, c.instances, seconds)
        last = c.end_token == len(state.prefill_ids)
        if last and not self._prefilled(state, [r for r in results
                                                if isinstance(r, PrefillResult)]):
            return
        # After the first token is taken: the last chunk's batch hands the sampler over.
        self.decode.streams.chunk_done(state, c)
        if not last and self.options.settings.stream_kv:
            self.decode.submit(state)  # decode room sought from its first chunk on

    def _prefilled(self, state: EngineRequest, results: list[PrefillResult]) -> bool:
        """Its first token: False if that ended it."""
        first = next(r for r in results if r.first_token is not None)
        assert first.first_token is not None
        state.sampler_state = first.sampler_state
        now = time.monotonic()
        if state.output:  # redone after a loss: this token continues its stream
            self.metrics.observe_inter_token(now - state.last_token_wall)
        else:
            self.metrics.observe_ttft(now - state.arrival_wall)
        state.summary.prefilled_after_s = now - state.arrival_wall
        finish = state.add_tokens([first.first_token])
        if finish is not None:
            self.requests.finished(state, finish)
            return False
        if state.request_id in self.decode.streams:
            state.phase = Phase.DECODE  # placed while it prefilled: the rest of its KV streams
        else:
            state.phase = Phase.TO_DECODE
            self.decode.submit(state)
        self.requests.update_gauges()
        return True

