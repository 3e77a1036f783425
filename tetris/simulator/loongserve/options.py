"""LoongServe's router knobs (re-implemented, no code copied): the flags of their
`loongserve/longserve_server/api_server.py`, with the values of their evaluation."""

from __future__ import annotations

from dataclasses import dataclass


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
