"""Elastic roles on live workers: every actor holds a full replica, so a GPU changing role is a
scheduling decision (`tetris.solver.policy.role_book.RoleBook`, the simulator's) plus, for a
decode GPU turning to prefill, moving the KV of the requests decoding on it to other decode
GPUs (`DecodeRunner.drain`) instead of waiting for them to finish.

Every `role_interval_s` the role planner (`settings.roles`) decides on the planner thread,
never on the serving loop; its decision is checked (`check_role_decision`) against the state it
saw, then applied against the state by the time it answers (`RoleBook.apply` checks again). A
GPU turned to decode is open to the dispatcher at once; one turned to prefill serves once its
last request is gone (`settle`, after every decode step and KV move).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from tetris.solver.cost_model import CostModel
from tetris.solver.policy.role_book import RoleBook
from tetris.solver.policy.roles import (
    RoleDecision,
    RolePlanner,
    RoleState,
    check_role_decision,
    role_counts,
)

if TYPE_CHECKING:  # the engine imports this module
    from tetris.runtime.decode_runner import DecodeRunner
    from tetris.runtime.live_requests import LiveRequests
    from tetris.runtime.metrics import ServingMetrics
    from tetris.solver.policy.ledger import Ledger

log = logging.getLogger(__name__)


class RoleRunner:
    def __init__(self, planner: RolePlanner, ledger: Ledger, decode: DecodeRunner,
                 requests: LiveRequests, cost_model: CostModel, metrics: ServingMetrics,
                 *, kv_tokens: int, initial_prefill: int, interval_s: float, tau_s: float,
                 max_request_kv: int, now: Callable[[], float], planner_thread: Executor,
                 wake: Callable[[], None]) -> None:
        self.planner, self.ledger, self.decode = planner, ledger, decode
        self.requests, self.cost_model, self.metrics = requests, cost_model, metrics
        self.kv_tokens, self.interval_s = kv_tokens, interval_s
        self.now, self.planner_thread, self.wake = now, planner_thread, wake
        self.book = RoleBook(ledger, initial_prefill, (), tau_s, self._changed)
        self.book.set_decode_floor(max_request_kv, kv_tokens)
        self.decisions = 0
        self.last_decision: RoleDecision | None = None
        decode.after_change = self.settle
        metrics.set_roles(*role_counts(self.book.roles))

    def _changed(self, gpu: int, role: str) -> None:
        self.metrics.role_changed(role)
        self.metrics.set_roles(*role_counts(self.book.roles))
        log.info("GPU %d: %s", gpu, role)

    def arrived(self, prompt_tokens: int, decode_kv: int, ttft_slo_s: float) -> None:
        cm = self.cost_model
        self.book.arrived(prompt_tokens, decode_kv, ttft_slo_s,
                          lambda n, k: cm.chunk_seconds(n, 0, k),
                          cm.best_isolated_ttft(prompt_tokens))

    def state(self) -> RoleState:
        cm = self.cost_model

        def decode_kv(request_id: str) -> int:
            state = self.requests.get(request_id)
            if state is None:
                return 0
            return state.prompt_tokens + state.request.sampling.max_tokens - 1

        return self.book.state(self.now(), chunk_seconds=lambda n, p: cm.chunk_seconds(n, p, 1),
                               kv_capacity=self.kv_tokens,
                               waiting_kv=self.requests.queue.waiting_tokens,
                               decode_kv_of=decode_kv)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.tick()
            except Exception:
                # A refused or failed decision changes nothing: serving goes on in the roles
                # it has, and the next tick decides again.
                log.exception("role decision failed")

    async def tick(self) -> None:
        """One decision: planned on the planner thread, then applied as far as it holds."""
        self.book.signals.update(self.now(), self.ledger.decode_freed_total)
        state = self.state()
        decision = await asyncio.get_running_loop().run_in_executor(
            self.planner_thread, self.planner.decide, state)
        check_role_decision(decision, state)
        self.decisions += 1
        self.book.pending_to_decode = 0  # a new decision replaces what the last still wanted
        if not decision.empty:
            self.apply(decision)

    def apply(self, decision: RoleDecision) -> None:
        still = self.book.apply(decision, self.state(), self.now())
        self.last_decision = still
        for g in still.to_prefill:
            self.decode.drain(g)
        if still.to_decode:
            self.wake()  # room for requests waiting for decode
        self.settle()

    def chunk_ended(self, instances: tuple[int, ...]) -> None:
        """Take GPUs still wanted for decode as their chunk ends."""
        if self.book.pending_to_decode and self.book.take_freed(instances, self.now()):
            self.wake()

    def settle(self) -> None:
        """Draining GPUs whose last request is gone turn to prefill."""
        if not self.book.draining:
            return
        done = self.book.settle(self.now())
        for g in done:
            self.decode.draining.discard(g)
        if done:
            self.wake()
