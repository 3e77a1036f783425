"""MILP solver back-ends behind one call: HiGHS in-process (highspy), CBC as a child process.

Each honours an absolute deadline on the `time.perf_counter` clock, set after the model is
handed over (pulp copies it before any solver clock starts). CBC past its deadline is killed by
a watchdog; HiGHS takes a MIP start pulp would ignore. Statuses come from pulp's `sol_status`.
"""

from __future__ import annotations

import glob
import math
import os
import signal
import threading
import time
from typing import Any

import highspy
import pulp

from tetris.solver.plan import SolveStatus

BACKENDS = ("cbc", "highs")
MIP_REL_GAP = 1e-6  # HiGHS's default 1e-4 would call a 0.01 %-suboptimal plan "optimal"


class Highs(pulp.HiGHS):  # type: ignore[misc]
    """pulp's HiGHS interface ignores initial values (handed over here as a MIP start) and starts
    the clock before copying the model into HiGHS (the limit is re-set here, after the copy)."""

    def __init__(self, warm_start: bool, deadline: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.warm_start = warm_start
        self.deadline = deadline

    def callSolver(self, lp: Any) -> None:
        model = lp.solverModel
        if self.warm_start:
            values = [0.0] * model.getNumCol()
            for var in lp.variables():
                values[var.index] = float(var.varValue or 0.0)
            start = highspy.HighsSolution()
            start.col_value = values
            start.value_valid = True
            model.setSolution(start)
        model.setOptionValue("time_limit", max(1e-3, self.deadline - time.perf_counter()))
        super().callSolver(lp)


class Cbc(pulp.COIN_CMD):  # type: ignore[misc]
    """CBC's time limit, read when pulp builds the command line — after it has written the model
    file, which for large models takes a good share of a short budget.

    CBC checks its clock only between steps (cut passes, nodes, heuristics), and one step can
    run long: 0.8 s past a 2.6 s limit at 4,000 pairs was seen (strong branching at the first
    node). So a watchdog kills the CBC process still running at `kill_at`; pulp then raises
    PulpSolverError, and `killed` says why (on Linux; elsewhere there is no watchdog)."""

    def __init__(self, deadline: float, kill_at: float = math.inf, **kwargs: Any) -> None:
        self.deadline = deadline
        self.kill_at = kill_at
        self.killed = False
        self._files: tuple[str, ...] = ()
        self._done = threading.Event()
        super().__init__(**kwargs)

    @property
    def timeLimit(self) -> float:
        return max(1e-3, self.deadline - time.perf_counter())

    @timeLimit.setter
    def timeLimit(self, value: float | None) -> None:
        del value  # pulp's constructor sets it; the deadline rules

    def create_tmp_files(self, name: str, *args: str) -> tuple[str, ...]:
        self._files = tuple(super().create_tmp_files(name, *args))
        return self._files

    def actualSolve(self, lp: Any, **kwargs: Any) -> Any:
        watchdog = None
        if math.isfinite(self.kill_at) and os.path.isdir("/proc/self/task"):
            watchdog = threading.Thread(target=self._watch, daemon=True)
            watchdog.start()
        try:
            return super().actualSolve(lp, **kwargs)
        finally:
            self._done.set()
            if watchdog is not None:
                watchdog.join()
            self.delete_tmp_files(*self._files)  # pulp leaves them when CBC fails

    def _watch(self) -> None:
        if self._done.wait(max(0.0, self.kill_at - time.perf_counter())):
            return
        while not self._kill():  # CBC may not have started yet
            if self._done.wait(0.005):
                return

    def _kill(self) -> bool:
        """SIGKILL our child process that is CBC reading this model's file, if there is one."""
        model = [f for f in self._files if f.endswith(".mps")]
        if not model:
            return False
        for children in glob.glob("/proc/self/task/*/children"):
            try:
                with open(children) as f:
                    pids = f.read().split()
            except OSError:
                continue
            for pid in pids:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                        args = cmdline.read().split(b"\0")
                except OSError:
                    continue
                if os.fsencode(model[0]) in args:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        return False  # it ended just now: pulp reads its solution
                    self.killed = True
                    return True
        return False


def make_solver(backend: str, *, threads: int, msg: bool, warm_start: bool, deadline: float,
                kill_at: float = math.inf) -> Any:
    """`deadline` (the solver's own limit) and `kill_at` (CBC: the process is killed if still
    running) are on the `time.perf_counter` clock."""
    if backend == "highs":
        return Highs(warm_start, deadline, msg=msg,
                     timeLimit=max(1e-3, deadline - time.perf_counter()),
                     threads=threads, gapRel=MIP_REL_GAP)
    # COIN_CMD on PuLP's bundled binary: PULP_CBC_CMD is the same solver but deprecated.
    kwargs = dict(msg=msg, threads=threads, gapRel=MIP_REL_GAP,
                  warmStart=warm_start, timeMode="elapsed")
    cbc = Cbc(deadline, kill_at, **kwargs)
    bundled = getattr(getattr(pulp, "PULP_CBC_CMD", None), "pulp_cbc_path", None)
    if not cbc.available() and bundled is not None:
        cbc = Cbc(deadline, kill_at, path=bundled, **kwargs)
    return cbc


def milp_status(sol_status: int) -> SolveStatus:
    """The MILP's own outcome from pulp's `sol_status`. LpStatus says "Optimal" for a CBC run
    stopped on time with an incumbent; only `sol_status` tells proved from merely found."""
    if sol_status == pulp.LpSolutionOptimal:
        return SolveStatus.OPTIMAL
    if sol_status == pulp.LpSolutionIntegerFeasible:
        return SolveStatus.FEASIBLE
    if sol_status == pulp.LpSolutionInfeasible:
        return SolveStatus.INFEASIBLE
    return SolveStatus.NO_SOLUTION  # nothing found, or "unbounded" (impossible: all bounded)


def dual_bound(prob: Any, backend: str) -> float | None:
    """HiGHS's MIP dual bound (pulp passes HiGHS no objective constant: add it back)."""
    if backend != "highs" or getattr(prob, "solverModel", None) is None:
        return None
    bound = float(prob.solverModel.getInfo().mip_dual_bound)
    return bound + float(prob.objective.constant) if math.isfinite(bound) else None


def run_solver(prob: Any, solver: Any, kill_at: float, solver_deadline: float,
           stats: dict[str, float | int | str]) -> SolveStatus | None:
    """Run the solver; its status, or None when it raised (the reason in stats)."""
    try:
        prob.solve(solver)
    except pulp.PulpSolverError as error:
        if getattr(solver, "killed", False):
            stats["milp_status"] = (f"killed: CBC ran {(kill_at - solver_deadline) * 1e3:.0f} ms "
                                    "past its time limit, to the deadline")
        else:
            # Seen with the bundled CBC 2.10.3: a MIP start and ~10-40 ms of limit, and it
            # segfaults.
            stats["milp_status"] = f"solver error: {error}"
        return None
    stats["milp_status"] = pulp.LpSolution.get(prob.sol_status, str(prob.sol_status))
    return milp_status(prob.sol_status)
