"""The role optimizer: a CP-SAT model of the next few role intervals (receding horizon: only
the first interval's changes are applied, the rest is re-planned at the next decision).

The decision is now's: how many free prefill GPUs turn to decode (`down`, at once; `later`
more as they come free, counted from step 1) and which
decode GPUs turn to prefill (one binary each, prefilling after its drain lag: its reserved KV over
the recent per-GPU rate at which decode KV is freed); the roles then hold over steps k = 0..K-1
of one interval Δ each (K = horizon / Δ). Planning later changes too would let the model
"rotate" GPUs it cannot know will be free then. With n_p[k] the GPUs prefilling at step k (each
doing η one-GPU seconds of prompt work per second: the efficiency measured so far, SP groups
being less than linear), and as decode memory the N - n_p[k] others less the room draining GPUs
cannot give (a draining GPU takes no requests: only the KV it holds counts), in milli-GPUs:

    b[k] >= b[k-1] + 1000·prefill_rate - 1000·η·n_p[k],  b[-1] = 1000·backlog / Δ,  b >= 0
    u[k] >= 1000·D_k / capacity - (1000·(N - n_p[k]) - Σ_draining 1000·free_g / capacity)
    D_k = KV in use + KV waiting + f_k·KV of the requests in prefill
          + (k+1)·Δ·(kv_in_rate - kv_out_rate), at least 0

with f_k the share of today's prefill backlog done by the end of step k at today's prefill
GPUs (min(1, (k+1)·Δ / (backlog / (η·n_p)))).

    h[k] >= 1000·prefill_rate / ρ* - 1000·η·n_p[k],  h >= 0
    w[k] >= 1000·width - 1000·n_p[k],  w >= 0

b is prefill work that the prefill GPUs cannot do within the step (GPU-steps of backlog), u the
decode KV that does not fit (GPUs short), h the prefill GPUs short of the utilisation target
ρ* the TTFT SLO leaves room for (`roles.prefill_target`: a pool at full utilisation has no
backlog left over but queues requests past their SLO), and w the prefill GPUs short of the
SP width nine in ten recent requests need to meet their TTFT SLO alone (`RoleBook.arrived`:
measured on Mooncake, prefill GPUs were 25% busy while long prompts missed TTFT for want of
GPUs to spread over). The objective is Σ_k (b[k] + u[k] + h[k] + w[k]) plus SWITCH_COST per
change (hysteresis): every shortfall in the same unit, one GPU for one step, so no weight is
tuned to a workload; the small switching cost breaks ties towards keeping roles.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ortools.sat.python import cp_model

from tetris.solver.policy.roles import (
    DECODE,
    PREFILL,
    TO_PREFILL,
    RoleDecision,
    RoleState,
    pick_to_decode,
    pick_to_prefill,
)

MILLI = 1000
SWITCH_COST = 100  # milli-GPU-steps: a tenth of a GPU for one interval
DETERMINISTIC_LIMIT = 0.05  # CP-SAT's deterministic time units (about seconds)
TIME_LIMIT_S = 1.0
MOVE_SHARE = 8


@dataclass
class OptimizedRoles:
    interval_s: float
    horizon_s: float
    dwell_s: float
    name: str = "optimizer"
    solves: int = 0
    solver_wall_s: float = 0.0

    def decide(self, state: RoleState) -> RoleDecision:
        started = time.perf_counter()
        decision = self._solve(state)
        wall = time.perf_counter() - started
        self.solves += 1
        self.solver_wall_s += wall
        return RoleDecision(decision.to_decode, decision.to_prefill, wall,
                            decision.more_to_decode)

    def _lag(self, kv: int, out_per_gpu: float, steps: int) -> int:
        """Steps until a decode GPU holding `kv` tokens has drained (beyond the horizon: K)."""
        if kv <= 0:
            return 1
        if out_per_gpu <= 0:
            return steps
        return max(1, min(steps, math.ceil(kv / out_per_gpu / self.interval_s)))

    def _solve(self, state: RoleState) -> RoleDecision:
        dt = self.interval_s
        steps = max(1, round(self.horizon_s / dt))
        n = len(state.roles)
        cap = state.kv_capacity
        holders = state.count(DECODE) + state.count(TO_PREFILL)
        out_per_gpu = state.kv_out_rate / max(holders, 1)
        free = pick_to_decode(state, n, self.dwell_s)
        candidates = pick_to_prefill(state, n, self.dwell_s)

        def drain(g: int) -> tuple[int, int]:
            """(lag in steps, the room in milli-GPUs that GPU g gives nobody while it drains)."""
            return (self._lag(state.decode_kv[g], out_per_gpu, steps),
                    round(MILLI * max(0, cap - state.decode_kv[g]) / cap))

        plans = [drain(g) for g in candidates]
        draining = [drain(g) for g, r in enumerate(state.roles) if r == TO_PREFILL]

        m = cp_model.CpModel()
        z = [m.new_bool_var(f"z{i}") for i in range(len(candidates))]
        down = m.new_int_var(0, len(free), "down")
        later = m.new_int_var(0, n, "later")  # prefill GPUs to decode from step 1, as they free
        # At most one GPU in MOVE_SHARE changes per decision: a drain takes seconds, and the
        # rates behind the model are averages, so big jumps on one estimate overshoot.
        m.add(down + later + sum(z) <= max(1, n // MOVE_SHARE))
        in_use = sum(state.decode_kv)
        growth = state.kv_in_rate - state.kv_out_rate
        backlog = round(MILLI * state.prefill_backlog_s / dt)
        arriving = round(MILLI * state.prefill_rate)
        per_gpu = round(MILLI * state.prefill_efficiency)
        headroom = round(MILLI * state.prefill_rate / state.prefill_target)
        prev: cp_model.IntVar | None = None
        cost: list[cp_model.LinearExprT] = []
        n_p0 = state.count(PREFILL)
        clears_s = state.prefill_backlog_s / max(n_p0 * state.prefill_efficiency, 1e-9)
        total = cp_model.LinearExpr.sum
        for k in range(steps):
            back = total([zi for zi, (lag, _) in zip(z, plans, strict=True) if lag <= k])
            n_p = n_p0 + sum(1 for lag, _ in draining if lag <= k) - down + back
            if k:
                n_p -= later
            late = [(zi, room) for zi, (lag, room) in zip(z, plans, strict=True) if lag > k]
            drained = sum(1 for lag, _ in draining if lag > k) + total([zi for zi, _ in late])
            unusable = sum(room for lag, room in draining if lag > k) + \
                cp_model.LinearExpr.weighted_sum([zi for zi, _ in late], [r for _, r in late])
            m.add(n_p >= 1)
            m.add(n - n_p - drained >= state.decode_floor)
            b = m.new_int_var(0, max(backlog, 0) + steps * max(arriving, 0), f"b{k}")
            if prev is None:
                m.add(b >= backlog + arriving - per_gpu * n_p)
            else:
                m.add(b - prev >= arriving - per_gpu * n_p)
            # Requests in prefill reach decode as fast as today's prefill GPUs finish them:
            # counting them at once would make a prefill backlog look like decode demand
            # and pull more GPUs off prefill (a feedback loop measured on Mooncake).
            done = 1.0 if clears_s <= 0 else min(1.0, (k + 1) * dt / clears_s)
            demand = max(0.0, in_use + state.decode_waiting_kv + done * state.prefill_kv +
                         (k + 1) * dt * growth)
            need = round(MILLI * demand / cap)
            u = m.new_int_var(0, max(need, 0), f"u{k}")
            m.add(u >= need - MILLI * (n - n_p) + unusable)
            # Prefill GPUs short of the headroom the TTFT SLO needs: at full utilisation
            # nothing is left over (b = 0) but requests queue past their SLO.
            h = m.new_int_var(0, max(headroom, 0), f"h{k}")
            m.add(h >= headroom - per_gpu * n_p)
            w = m.new_int_var(0, MILLI * n, f"w{k}")
            m.add(w >= MILLI * state.prefill_width - MILLI * n_p)
            cost += [b, u, h, w]
            prev = b
        m.minimize(total(cost) + SWITCH_COST * (down + later + total(z)))
        solver = cp_model.CpSolver()
        # A deterministic budget: a wall-clock limit made runs differ with the host's load
        # (measured: 0.88 and 0.56 SLO attainment for one trace and rate, the second run
        # alone on the host); the wall limit stays as a backstop.
        solver.parameters.max_deterministic_time = DETERMINISTIC_LIMIT
        solver.parameters.max_time_in_seconds = TIME_LIMIT_S
        solver.parameters.num_workers = 1
        status = solver.solve(m)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return RoleDecision()  # nothing to change that the model could justify
        chosen = tuple(g for g, zi in zip(candidates, z, strict=True) if solver.value(zi))
        return RoleDecision(to_decode=free[: solver.value(down)], to_prefill=chosen,
                            more_to_decode=solver.value(later))
