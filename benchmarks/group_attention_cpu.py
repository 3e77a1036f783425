"""gather_kv vs pass_q on 2 gloo processes (1 thread each) on CPU; JSON on stdout.

For each head shape, chunk size and prefix: the chunk's queries and KV are split zigzag over the
2 ranks (4 pieces, rank 0 takes the outer two), the prefix's KV likewise. Reports the bytes
each strategy makes the ranks receive (`comm_bytes`), the seconds per call (slowest rank, best
of `REPEATS`), and the strategy "auto" picks.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tetris.kernels.group import choose_strategy, comm_bytes, group_attention
from tetris.runtime.ports import free_port

WORLD = 2
SHAPES = {"llama3-8b": (32, 8, 128), "smollm2": (9, 3, 64)}
CHUNKS = (512, 2048)
PREFIXES = (0, 4096)
REPEATS = 3


def zigzag(start: int, stop: int, rank: int) -> torch.Tensor:
    bounds = torch.linspace(start, stop, 2 * WORLD + 1).round().long().tolist()
    pieces = (rank, 2 * WORLD - 1 - rank)
    return torch.cat([torch.arange(bounds[p], bounds[p + 1]) for p in pieces])


def seconds_per_call(strategy: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     q_pos: torch.Tensor, k_pos: torch.Tensor) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        dist.barrier()
        start = time.perf_counter()
        group_attention(q, k, v, q_positions=q_pos, k_positions=k_pos, strategy=strategy)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        best = min(best, float(elapsed))
    return best


def rank_main(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    results = []
    with torch.inference_mode():
        for shape, (heads, kv_heads, dim) in SHAPES.items():
            for chunk in CHUNKS:
                for prefix in PREFIXES:
                    q_pos = zigzag(prefix, prefix + chunk, rank)
                    k_pos = torch.cat([zigzag(0, prefix, rank), q_pos])
                    q = torch.randn(len(q_pos), heads, dim)
                    k, v = torch.randn(2, len(k_pos), kv_heads, dim)
                    q_sizes = [len(zigzag(prefix, prefix + chunk, r)) for r in range(WORLD)]
                    k_sizes = [len(zigzag(0, prefix, r)) + n for r, n in enumerate(q_sizes)]
                    row: dict[str, object] = {"shape": shape, "heads": heads,
                                              "kv_heads": kv_heads, "head_dim": dim,
                                              "chunk": chunk, "prefix": prefix}
                    for strategy in ("gather_kv", "pass_q"):
                        seconds = seconds_per_call(strategy, q, k, v, q_pos, k_pos)
                        row[strategy] = {
                            "bytes": comm_bytes(strategy, q_sizes, k_sizes, heads, kv_heads,
                                                dim, q.element_size()),
                            "seconds": round(seconds, 4),
                        }
                    row["auto"] = choose_strategy(q_sizes, k_sizes, heads, kv_heads, dim)
                    results.append(row)
    if rank == 0:
        print(json.dumps({"world": WORLD, "threads_per_rank": 1, "dtype": "float32",
                          "results": results}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.start_processes(rank_main, args=(free_port(),), nprocs=WORLD, start_method="spawn")
