"""Where a background CP-SAT refinement runs, and when its result becomes usable.

- `InlineRun` (the simulator): solves at once, on the caller's thread, and holds the result back
  until the simulated clock has passed what the run is charged (its time limit, or its measured
  wall time under `SolverClock.MEASURED`): CP-SAT is charged to the refiner, not to the decision.
- `ThreadRun` (the runtime): solves on a worker thread of its own (OR-Tools releases the GIL while
  it searches), so neither the serving loop nor the decision thread waits for it; the result is
  usable at the first decision after the run has finished.

Both keep at most one run in flight; `BackgroundRefiner` uses their results the same way.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Protocol

from tetris.solver.api import solve
from tetris.solver.cp_sat import CpOptions
from tetris.solver.plan import SolveResult
from tetris.solver.problem import Problem

log = logging.getLogger(__name__)

Done = tuple[Problem, SolveResult]  # the problem refined and CP-SAT's (validated) result


class RefinementRun(Protocol):
    time_limit_ms: float

    def busy(self, now_s: float) -> bool:
        """A run is in flight (a stale run keeps the refiner busy until it ends too)."""

    def start(self, problem: Problem) -> bool:
        """Begin refining `problem`; False when it is known at once that nothing came of it."""

    def take(self, now_s: float) -> Done | None:
        """The finished run's problem and result, if usable at `now_s`; each result once."""


def _refine(problem: Problem, time_limit_ms: float,
            cp_options: CpOptions | None) -> tuple[SolveResult, float]:
    started = time.perf_counter()
    result = solve(problem, "cp", time_limit_ms, cp_options=cp_options)
    return result, time.perf_counter() - started


@dataclass
class InlineRun:
    time_limit_ms: float
    charge_measured: bool = False
    cp_options: CpOptions | None = None
    last_wall_s: float = 0.0
    _ready: tuple[float, Done] | None = field(default=None, repr=False)
    _busy_until_s: float = -1.0

    def busy(self, now_s: float) -> bool:
        return self._busy_until_s > now_s

    def start(self, problem: Problem) -> bool:
        result, wall_s = _refine(problem, self.time_limit_ms, self.cp_options)
        self.last_wall_s = wall_s
        if not result.status.has_plans:
            self._ready = None
            return False
        took = wall_s if self.charge_measured else self.time_limit_ms / 1e3
        self._busy_until_s = problem.now_s + took
        self._ready = (problem.now_s + took, (problem, result))
        return True

    def take(self, now_s: float) -> Done | None:
        if self._ready is None or self._ready[0] > now_s:
            return None
        done = self._ready[1]
        self._ready = None
        return done


@dataclass
class ThreadRun:
    executor: Executor
    time_limit_ms: float
    cp_options: CpOptions | None = None
    last_wall_s: float = 0.0  # of the latest run to finish
    _running: tuple[Problem, Future[SolveResult]] | None = field(default=None, repr=False)

    def busy(self, now_s: float) -> bool:
        return self._running is not None and not self._running[1].done()

    def start(self, problem: Problem) -> bool:
        def work() -> SolveResult:
            result, self.last_wall_s = _refine(problem, self.time_limit_ms, self.cp_options)
            return result

        self._running = (problem, self.executor.submit(work))
        return True

    def take(self, now_s: float) -> Done | None:
        if self._running is None or not self._running[1].done():
            return None
        problem, future = self._running
        self._running = None
        try:
            result = future.result()
        except Exception:  # a failed refinement loses only its improvement
            log.exception("background refinement failed")
            return None
        return (problem, result) if result.status.has_plans else None
