"""The simulated LoongServe cluster: one plain object that every component reads and updates.

What their `RouterManager` (`router/manager.py`) tracks — per-instance KV, the running batches,
the waiting queue, the counters their admission estimate uses, the macro-iteration in flight —
plus the simulation's clock, event queue, statistics and invariant checks. The components
(admission, decode, compaction, prefill, macro-iteration, router) keep no run state of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

from tetris.simulator.events import PRIORITY_DECIDE, EventQueue
from tetris.simulator.loongserve.options import LoongServeOptions
from tetris.simulator.loongserve.predictor import PrefillPredictor
from tetris.simulator.loongserve.types import EPS_S, STEP, Batch, Co, Req
from tetris.simulator.noise import DurationNoise
from tetris.simulator.records import RequestRecord, SimRequest
from tetris.solver.cost_model import CostModel

_COUNTERS = (
    "decisions", "prefill_iterations", "prefill_requests", "prefill_sp_sum",
    "prefill_request_sp_sum", "decode_steps", "decode_iterations", "macro_iterations",
    "greedy_prefills", "stalled_batches", "migrations", "migrated_tokens", "merges",
    "scale_ups", "multi_master_iterations", "preemptions", "ooe_admissions",
    "fallback_plans", "admission_trims", "invariant_checks")


class LoongServeState:
    """Cluster constants, KV memory, batches, queues, clock, events and stats of one run."""

    __slots__ = (
        "avg_decode_s", "busy_until", "cap", "cm", "cos", "dec", "events", "has_wait",
        "macro_len", "macro_start", "mode", "n", "noise", "now", "num_fin", "num_ooe",
        "num_running_prefill", "opts", "paused", "pending", "per_node", "pred", "reqs",
        "retry_queued", "running", "st", "step_queued", "sum_out", "used", "waiting")

    def __init__(self, requests: Sequence[SimRequest], cost_model: CostModel, seed: int,
                 noise_cv: float, options: LoongServeOptions) -> None:
        self.cm = cost_model
        self.opts = options
        self.n = n = cost_model.cluster.prefill_instances
        self.per_node = cost_model.cluster.gpus_per_node
        self.cap = cost_model.kv_capacity_tokens
        self.pred = PrefillPredictor(cost_model)
        self.noise = DurationNoise(noise_cv, seed)
        self.avg_decode_s = options.decoding_time_s(n)
        co = cost_model.coefficients
        self.dec = (co.decode_fixed_s, co.decode_kv_s_per_token, co.lin_s_per_token,
                    co.step_intra_s, co.step_inter_s)
        self.events = EventQueue()
        self.reqs = [Req(i, r.prompt_tokens, r.output_tokens, RequestRecord(r))
                     for i, r in enumerate(requests)]
        _validate(self.reqs, n, self.cap, options)
        self.used = [0] * n  # KV tokens per instance
        self.busy_until = [0.0] * n
        self.running: list[Batch] = []
        self.waiting: list[Req] = []
        self.paused = 0  # paused requests in `waiting`
        self.has_wait = 0  # decode iterations since the last admission attempt
        self.num_ooe = 0  # consecutive out-of-order admissions
        self.sum_out = options.prior_output_tokens
        self.num_fin = 1
        self.mode = "idle"  # "idle", "decode" (lock-step iterations) or "macro"
        self.step_queued = False
        self.now = 0.0
        # The macro-iteration in flight: its coroutines, the decode batches it stalls, how many
        # prefill batches still run, and its start and predicted length.
        self.cos: list[Co] = []
        self.pending: list[Batch] = []
        self.num_running_prefill = 0
        self.macro_start = 0.0
        self.macro_len = 0.0
        self.retry_queued = False
        self.st: dict[str, Any] = dict.fromkeys(_COUNTERS, 0)
        self.st["migration_s"] = 0.0

    def queue_step(self, now: float) -> None:
        """One router step per instant, however many events ask for it."""
        if not self.step_queued:
            self.step_queued = True
            self.events.push(now, PRIORITY_DECIDE, STEP)

    # -- invariants ---------------------------------------------------------------------------
    def fail(self, what: str) -> NoReturn:
        raise RuntimeError(f"LoongServe invariant broken at t={self.now:.6f}s: {what}")

    def occupy(self, instances: Sequence[int], start: float, end: float) -> None:
        """An instance never runs two iterations at once."""
        bu = self.busy_until
        for i in instances:
            if bu[i] > start + EPS_S:
                self.fail(f"instance {i} starts at {start:.6f}s but is busy to {bu[i]:.6f}s")
            bu[i] = end
        self.st["invariant_checks"] += 1

    def check_memory(self, instances: Sequence[int]) -> None:
        used, cap = self.used, self.cap
        for i in instances:
            if used[i] > cap or used[i] < 0:
                self.fail(f"instance {i} holds {used[i]} KV tokens (capacity {cap})")
        self.st["invariant_checks"] += 1


def _validate(reqs: list[Req], n: int, cap: int, opts: LoongServeOptions) -> None:
    """Refuse up front what could never be served, naming the request."""
    ids = set()
    for q in reqs:
        r = q.record.request
        ids.add(r.request_id)
        if q.prompt < 1 or q.output < 1:
            raise ValueError(f"request {r.request_id!r}: needs >= 1 prompt and output token")
        held, left = q.tuple_tokens()
        if held + left > n * cap:
            raise ValueError(
                f"request {r.request_id!r}: its KV ({q.prompt} + {q.output} tokens) can never "
                f"fit in memory, even over all {n} instances ({cap} tokens each)")
        if q.prompt > opts.batch_max_tokens:
            raise ValueError(f"request {r.request_id!r}: prompt of {q.prompt} tokens exceeds "
                             f"batch_max_tokens={opts.batch_max_tokens}")
    if len(ids) != len(reqs):
        raise ValueError("request ids must be unique")
