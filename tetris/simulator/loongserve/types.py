"""LoongServe's router data (re-implemented, no code copied): its knobs, and requests,
batches and macro-iteration coroutines as `loongserve/longserve_server/io_struct.py`
(`Req`, `Batch`) and `router/manager.py` track them."""

from __future__ import annotations

from dataclasses import dataclass, field

from tetris.simulator.records import RequestRecord

EPS_S = 1e-9


@dataclass(frozen=True)
class LoongServeOptions:
    """Knobs of their router (`api_server.py` flags); defaults as in their evaluation launcher
    `test/longserve/5-start-api-server.py` (AE), else the flag's own default."""

    # AE: --batch_max_tokens 500000 (flag default: max(N·capacity/6, max_req_total_len)).
    batch_max_tokens: int = 500_000
    # AE: running_max_req_size 1024 for every dataset but sched-zipf (flag default 1000).
    running_max_req_size: int = 1024
    # Flag default 10 (AE sets 1..64 per dataset: sharegpt 1, leval 8, zipf 64).
    max_num_ooe: int = 10
    # AE: --max_prefill_time 5000 ms (flag default 500 ms); caps batches of more than one.
    max_prefill_time_s: float = 5.0
    # AE: --avg_decoding_time 22 ms for <= 8 GPUs, else 25 ms (flag default 30 ms). None: that rule.
    avg_decoding_time_s: float | None = None
    # AE and flag default: 10 decode iterations between admission attempts.
    max_wait_tokens: int = 10
    # AE: 128 (flag default 100): a decode batch wider than this per master takes idle instances.
    min_comp_bound_decoding_batch_size: int = 128
    # Flag default False (their ablation switch for elastic scale-up).
    disable_scale_up: bool = False
    # manager.py __init__: sum_finished_req_output_len = 512, num_finished_reqs = 1.
    prior_output_tokens: int = 512
    # req_queue.py generate_new_req_list: estimated_max_iterations starts at 10.
    min_estimated_iterations: int = 10
    # req_queue.py generate_new_req_list: once a request goes down the "undecided" path, the
    # slice `cache_len_list[:-len(undecided_cache_len_list)]` (an always-empty list, so [:-0])
    # empties the reservation list for the rest of that admission pass. True keeps that
    # behaviour (what produced their numbers); False keeps the reservations.
    quirk_undecided_clears_reservations: bool = True
    # longserve_c_scheduler/src/main.cpp: the DP's two pruning bounds. True (their code) makes
    # every prefill one batch (see `plan_prefill_batches`); False searches every split, as the
    # paper's batching step describes.
    dp_pruning: bool = True

    def decoding_time_s(self, instances: int) -> float:
        if self.avg_decoding_time_s is not None:
            return self.avg_decoding_time_s
        return 0.022 if instances <= 8 else 0.025


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
