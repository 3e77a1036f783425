"""Elastic instance roles: how many GPUs prefill and how many decode, re-decided every few
seconds while serving.

On an elastic cluster (`ClusterSpec.elastic`) every GPU holds a full replica and serves one role
at a time. Every `PolicySettings.role_interval_s` the executor builds a `RoleState` (the roles,
which GPUs could change now, the prefill backlog, the decode KV in use and waiting, and recent
rates from `RoleSignals`) and a role planner answers with a `RoleDecision`:

- to decode: an idle prefill GPU holding no KV of a request still prefilling stops prefilling
  and decodes at once (KV of prefilled requests on it leaves by its hand-off as before);
- to prefill: a decode GPU stops taking requests (`TO_PREFILL`) and prefills once the requests on
  it are gone.

Every decision is checked (`check_role_decision`) before the executor applies it, so a role
change can never strand KV or a request, and a role is never left without a GPU. Two planners:
`ThresholdRoles`, the rule an autoscaler would use (move one GPU when one side is over a high
mark and the other would stay under a low one), and `roles_cp_sat.OptimizedRoles`, a CP-SAT
model over a short horizon. A GPU keeps a new role for `role_dwell_s` (hysteresis).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

PREFILL = "prefill"
DECODE = "decode"
TO_PREFILL = "to_prefill"  # decoding what it holds, taking no new requests

#: The threshold rule's marks on both sides' utilisation (demand over capacity).
HIGH_MARK = 0.85
LOW_MARK = 0.5


class RoleError(ValueError):
    """A role decision that would strand KV or a request, or leave a role without a GPU."""


@dataclass(frozen=True, slots=True)
class RoleState:
    """What a role planner sees (per-GPU tuples are indexed by GPU)."""

    now_s: float
    roles: tuple[str, ...]
    changed_s: tuple[float, ...]  # when each GPU last changed role (-inf: never)
    prefill_free: tuple[bool, ...]  # prefill role, idle, no KV of a prefilling request
    decode_kv: tuple[int, ...]  # KV tokens reserved on each GPU's decode role
    kv_capacity: int  # KV tokens one GPU holds
    prefill_backlog_s: float  # one-GPU seconds of prompt left to prefill
    decode_waiting_kv: int  # KV tokens of prefilled requests waiting for decode room
    prefill_kv: int  # decode KV tokens the requests still in prefill will reserve
    prefill_rate: float  # one-GPU prefill seconds arriving per second (recent)
    kv_in_rate: float  # decode KV tokens arriving per second (recent; reserved later)
    kv_out_rate: float  # decode KV tokens freed per second (recent)
    decode_floor: int = 1  # decode GPUs the largest request needs: never fewer take requests
    prefill_efficiency: float = 1.0  # one-GPU prompt seconds done per prefill GPU-second
    # Decode GPUs holding room for a request still prefilling (KV streaming): a drain there
    # waits for that prefill too, so they are not drained.
    decode_streaming: tuple[bool, ...] = ()
    nodes: tuple[int, ...] = ()  # node of each GPU (empty: one node)
    # The prefill utilisation the TTFT SLO leaves room for (`prefill_target`).
    prefill_target: float = 1.0
    # Prefill GPUs most recent requests need to meet their TTFT SLO alone (`RoleBook.arrived`).
    prefill_width: int = 1

    def count(self, role: str) -> int:
        return sum(1 for r in self.roles if r == role)

    def may_change(self, gpu: int, dwell_s: float) -> bool:
        return self.now_s - self.changed_s[gpu] >= dwell_s


@dataclass(frozen=True, slots=True)
class RoleDecision:
    to_decode: tuple[int, ...] = ()
    to_prefill: tuple[int, ...] = ()
    solver_s: float = 0.0  # the planner's own time (the executor applies the change after it)
    # Prefill GPUs to turn to decode as they come free (a busy pool is rarely idle at a tick:
    # the executor takes GPUs at their chunk ends, until the next decision).
    more_to_decode: int = 0

    @property
    def empty(self) -> bool:
        return not (self.to_decode or self.to_prefill or self.more_to_decode)


class RolePlanner(Protocol):
    name: str

    def decide(self, state: RoleState) -> RoleDecision: ...


def check_role_decision(decision: RoleDecision, state: RoleState) -> None:
    """RoleError unless every change is allowed now: to decode only an idle prefill GPU that
    holds no KV of a request still prefilling, to prefill only a decode GPU, no GPU twice,
    and at least one GPU left prefilling and `decode_floor` taking decode requests (so the
    largest request can always be placed once they drain: the roles can never deadlock)."""
    seen: set[int] = set()
    n = len(state.roles)
    for gpu in (*decision.to_decode, *decision.to_prefill):
        if not 0 <= gpu < n:
            raise RoleError(f"GPU {gpu} does not exist (the cluster has {n})")
        if gpu in seen:
            raise RoleError(f"GPU {gpu} is changed twice in one decision")
        seen.add(gpu)
    for gpu in decision.to_decode:
        if not state.prefill_free[gpu]:
            raise RoleError(f"GPU {gpu} cannot decode now: it is not an idle prefill GPU, "
                            "or a request still prefilling holds KV on it")
    for gpu in decision.to_prefill:
        if state.roles[gpu] != DECODE:
            raise RoleError(f"GPU {gpu} cannot turn to prefill: its role is "
                            f"{state.roles[gpu]}, not decode")
    if decision.more_to_decode < 0:
        raise RoleError(f"more_to_decode must be >= 0, got {decision.more_to_decode}")
    prefill = state.count(PREFILL) - len(decision.to_decode) - decision.more_to_decode
    decode = state.count(DECODE) - len(decision.to_prefill) + len(decision.to_decode)
    if prefill < 1 or decode < state.decode_floor:
        raise RoleError(f"the change leaves {prefill} prefill and {decode} decode GPU(s) "
                        f"serving; prefill needs 1, decode {state.decode_floor}")


def _prefill_per_node(roles: Sequence[str], nodes: Sequence[int]) -> dict[int, int]:
    per: dict[int, int] = {}
    for g, r in enumerate(roles):
        per[nodes[g]] = per.get(nodes[g], 0) + (r == PREFILL)
    return per


def leaving_node(roles: Sequence[str], nodes: Sequence[int]) -> int | None:
    """The node prefill GPUs leave first: of those with some, the one with the fewest (ties:
    the last). Prefill stays packed on as few nodes as it can, so its SP groups stay inside
    them (measured: scattered prefill GPUs halved the pool's efficiency on Mooncake)."""
    per = _prefill_per_node(roles, nodes)
    some = [(count, -node) for node, count in per.items() if count]
    return -min(some)[1] if some else None


def pick_to_decode(state: RoleState, count: int, dwell_s: float) -> tuple[int, ...]:
    """Up to `count` GPUs that may decode now (idle prefill GPUs past their dwell, no KV of a
    request still prefilling) on the `leaving_node`, the highest-numbered first."""
    nodes = state.nodes or (0,) * len(state.roles)
    node = leaving_node(state.roles, nodes)
    free = [g for g, ok in enumerate(state.prefill_free)
            if ok and nodes[g] == node and state.may_change(g, dwell_s)]
    return tuple(sorted(free, reverse=True)[:count])


def pick_to_prefill(state: RoleState, count: int, dwell_s: float) -> tuple[int, ...]:
    """Up to `count` decode GPUs past their dwell and with no request still prefilling on
    them, on the node with the most prefill GPUs that has such GPUs (prefill stays packed),
    the least loaded first (they drain first)."""
    nodes = state.nodes or (0,) * len(state.roles)
    per = _prefill_per_node(state.roles, nodes)
    streaming = state.decode_streaming or (False,) * len(state.roles)
    decode = [g for g, r in enumerate(state.roles) if r == DECODE and not streaming[g]
              and state.may_change(g, dwell_s)]
    if not decode:
        return ()
    best = max(per[nodes[g]] for g in decode)
    decode = [g for g in decode if per[nodes[g]] == best]
    decode.sort(key=lambda g: (state.decode_kv[g], g))
    return tuple(decode[:count])


def utilisation(state: RoleState, prefill: int, decode: int,
                interval_s: float) -> tuple[float, float]:
    """(prefill, decode) demand over capacity with that many GPUs per role: prefill as the
    arriving work plus the backlog cleared within one interval; decode as the KV in use,
    waiting, and coming from the requests in prefill, over the GPUs' KV memory."""
    p = (state.prefill_rate + state.prefill_backlog_s / interval_s) / (
        max(prefill, 1) * state.prefill_efficiency)
    in_use = sum(kv for kv, r in zip(state.decode_kv, state.roles, strict=True) if r == DECODE)
    d = (in_use + state.decode_waiting_kv + state.prefill_kv) / (max(decode, 1) *
                                                                  state.kv_capacity)
    return p, d


@dataclass
class ThresholdRoles:
    """One GPU moves per decision: to decode when decode is over HIGH_MARK and prefill would
    stay under LOW_MARK without it; to prefill when prefill is over HIGH_MARK and decode would
    stay under HIGH_MARK without it."""

    interval_s: float
    dwell_s: float
    name: str = "threshold"

    def decide(self, state: RoleState) -> RoleDecision:
        n_p, n_d = state.count(PREFILL), state.count(DECODE)
        p, d = utilisation(state, n_p, n_d, self.interval_s)
        if d > HIGH_MARK and n_p > 1:
            p_after, _ = utilisation(state, n_p - 1, n_d + 1, self.interval_s)
            if p_after < LOW_MARK:
                now = pick_to_decode(state, 1, self.dwell_s)
                return RoleDecision(to_decode=now, more_to_decode=1 - len(now))
        if p > HIGH_MARK and n_d > state.decode_floor:
            _, d_after = utilisation(state, n_p + 1, n_d - 1, self.interval_s)
            if d_after < HIGH_MARK:
                return RoleDecision(to_prefill=pick_to_prefill(state, 1, self.dwell_s))
        return RoleDecision()


@dataclass
class RoleSignals:
    """Recent rates behind a `RoleState`: exponential averages, memory `tau_s`, of what the
    executor reports (`arrived`) and of the ledger's cumulative count of decode KV freed."""

    tau_s: float
    prefill_rate: float = 0.0
    kv_in_rate: float = 0.0
    kv_out_rate: float = 0.0
    _t: float = 0.0
    _work: float = 0.0
    _kv: int = 0
    _last: tuple[float, int, int] = (0.0, 0, 0)

    def arrived(self, work_s: float, kv_tokens: int) -> None:
        """A request arrived needing `work_s` one-GPU seconds of prefill and `kv_tokens` of
        decode KV (its prompt and the tokens it may generate)."""
        self._work += work_s
        self._kv += kv_tokens

    @property
    def arrived_work(self) -> float:
        """One-GPU prefill seconds arrived so far."""
        return self._work

    def update(self, now: float, kv_freed_total: int) -> None:
        dt = now - self._t
        if dt <= 0:
            return
        work, kv, freed = self._last
        w = -math.expm1(-dt / self.tau_s)
        self.prefill_rate += w * ((self._work - work) / dt - self.prefill_rate)
        self.kv_in_rate += w * ((self._kv - kv) / dt - self.kv_in_rate)
        self.kv_out_rate += w * ((kv_freed_total - freed) / dt - self.kv_out_rate)
        self._t = now
        self._last = (self._work, self._kv, kv_freed_total)


def prefill_target(slo_scale: float) -> float:
    """The prefill utilisation ρ at which a request's queueing delay stays within its TTFT
    slack, S - 1 of its own prefill times (S: its TTFT SLO over its isolated TTFT). With the
    pool as an M/D/1 queue the mean wait is ρ / (2(1 - ρ)) service times, and a wait's 90th
    percentile is about ln 10 ≈ 2.3 times its mean (an exponential tail), so
    ρ / (1 - ρ) ≤ 2(S - 1) / ln 10. S = 5 gives 0.78, S = 2 gives 0.46; S ≤ 1 leaves no
    slack (0.05, so the pool is never planned empty)."""
    x = 2.0 * max(slo_scale - 1.0, 0.0) / math.log(10.0)
    return max(0.05, min(1.0, x / (1.0 + x)))


def initial_roles(gpus: int, prefill: int) -> list[str]:
    """GPUs 0..prefill-1 prefill, the rest decode (the fixed split's layout)."""
    if not 1 <= prefill < gpus:
        raise ValueError(f"an elastic cluster of {gpus} GPUs starts with 1..{gpus - 1} "
                         f"prefill GPUs, not {prefill}")
    return [PREFILL] * prefill + [DECODE] * (gpus - prefill)


def role_counts(roles: Sequence[str]) -> tuple[int, int, int]:
    """(prefill, decode, draining to prefill)."""
    return (sum(r == PREFILL for r in roles), sum(r == DECODE for r in roles),
            sum(r == TO_PREFILL for r in roles))
