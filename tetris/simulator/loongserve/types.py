"""LoongServe's router data (re-implemented, no code copied): requests, batches and
macro-iteration coroutines as `loongserve/longserve_server/io_struct.py` (`Req`, `Batch`) and
`router/manager.py` track them, and the kinds of the simulator's events."""

from __future__ import annotations

from dataclasses import dataclass, field

from tetris.simulator.records import RequestRecord

EPS_S = 1e-9

# Event kinds: pushed by the macro-iteration and prefill components, dispatched by the router.
ARRIVAL, STEP, DECODE_END, CO_END, CO_WAKE, CO_RETRY = (
    "arrival", "step", "decode_end", "co_end", "co_wake", "co_retry")


@dataclass(slots=True, eq=False)
class Req:
    order: int  # input index: their request ids grow with arrival (Fcfs pauses the largest)
    prompt: int
    output: int
    record: RequestRecord
    kv: dict[int, int] = field(default_factory=dict)
    paused: bool = False  # PAUSED_AND_OFFLOAD: KV dropped, re-prefilled with its output so far

    @property
    def need(self) -> int:  # their get_first_router_need_tokens
        return self.prompt + len(self.record.token_times) if self.paused else self.prompt

    def tuple_tokens(self) -> tuple[int, int]:
        """Their `NormalReq.get_tuple_tokens` (is_busy: router_token_ratio 0 and ignore_eos in
        their benchmark make the reservation the true output length)."""
        g = len(self.record.token_times)
        if self.paused:
            return self.prompt + g + 1, max(0, self.output - g - 2)
        if g == 0:
            return self.prompt + 1, max(0, self.output - 2)
        return self.prompt + g, max(0, self.output - g - 1)


@dataclass(slots=True, eq=False)
class Batch:
    reqs: list[Req]
    instances: list[int]
    bused: dict[int, int]  # this batch's KV tokens per instance


Masters = list[tuple[int, int, int]]  # (instance, first req, end req) of each master's share


@dataclass(slots=True, eq=False)
class Co:
    """One of their `_run_independent_batch_list` coroutines inside a macro-iteration."""

    batches: list[Batch]
    idle: list[int] = field(default_factory=list)
    prefill: bool = False
    counted: bool = False  # still counted in num_running_prefill
    waiting: bool = False  # batch list empty, polling for greedy prefill
    done: bool = False
    inflight: int = 0  # CO_END events of the current iteration still to come (it awaits all)
    epoch: int = 0  # invalidates stale CO_WAKE events
    plans: list[tuple[Batch, Masters]] = field(default_factory=list)
