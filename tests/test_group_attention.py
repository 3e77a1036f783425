"""`group_attention` on real gloo processes equals single-process `attention` over all the KV."""

from __future__ import annotations

import os
import random
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from tetris.kernels import attention, choose_strategy, group_attention
from tetris.kernels.group import comm_bytes
from tetris.runtime.ports import free_port

JOIN_TIMEOUT_S = 60.0
TOL = 1e-5


@dataclass(frozen=True)
class Case:
    """One request: every token's q/k/v and position, and which rank holds each query and key."""

    name: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    q_owner: torch.Tensor
    k_owner: torch.Tensor


def owners(n: int, world: int, gen: torch.Generator) -> torch.Tensor:
    """A random uneven split of n tokens over the ranks; each rank but one may get none."""
    weights = torch.rand(world, generator=gen) * (torch.rand(world, generator=gen) < 0.6)
    weights[torch.randint(world, (), generator=gen)] += 0.1
    return torch.multinomial(weights, n, replacement=True, generator=gen) if n else \
        torch.empty(0, dtype=torch.int64)


def cases(world: int, seed: int) -> Iterator[Case]:
    """The same cases on every rank (seeded by the parent's random seed): scattered tokens split
    unevenly (ranks without queries or KV), a chunk after a prefix, decode over KV on all ranks,
    and no tokens at all. Each runs on the world group, a two-rank sub-group and single ranks."""
    gen = torch.Generator().manual_seed(seed)

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (), generator=gen))

    def case(name: str, q_pos: torch.Tensor, k_pos: torch.Tensor, heads: int, kv_heads: int,
             k_owner: torch.Tensor | None = None, q_owner: torch.Tensor | None = None) -> Case:
        q = torch.randn(len(q_pos), heads, 16, generator=gen)
        k, v = torch.randn(2, len(k_pos), kv_heads, 16, generator=gen)
        q_owner = owners(len(q_pos), world, gen) if q_owner is None else q_owner
        k_owner = owners(len(k_pos), world, gen) if k_owner is None else k_owner
        return Case(name, q, k, v, q_pos, k_pos, q_owner, k_owner)

    for _ in range(2):
        num_keys = randint(0, 60)
        yield case("scattered", torch.randint(0, 100, (randint(0, 40),), generator=gen),
                   torch.randperm(100, generator=gen)[:num_keys], 6, 2)
    # Surely some rank without queries (the last) and some without KV (the first).
    num_queries, num_keys = randint(1, 30), randint(1, 60)
    yield case("skewed", torch.randint(0, 100, (num_queries,), generator=gen),
               torch.randperm(100, generator=gen)[:num_keys], 9, 3,
               q_owner=torch.randint(0, world - 1, (num_queries,), generator=gen),
               k_owner=torch.randint(1, world, (num_keys,), generator=gen))
    # A prefill chunk after a prefix: each chunk token's KV stays on the rank that computed it.
    prefix, chunk = randint(0, 50), randint(1, 40)
    q_owner = owners(chunk, world, gen)
    k_owner = torch.cat([owners(prefix, world, gen), q_owner])
    yield case("chunk", torch.arange(prefix, prefix + chunk), torch.arange(prefix + chunk), 9, 3,
               k_owner, q_owner)
    num_keys = randint(1, 80)
    yield case("decode", torch.tensor([num_keys]), torch.randperm(num_keys, generator=gen), 4, 4,
               q_owner=torch.zeros(1, dtype=torch.int64),
               k_owner=torch.arange(num_keys) % world)
    yield case("nothing", torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64),
               4, 2)


def check_case(case: Case, members: list[int], group: dist.ProcessGroup | None) -> None:
    """This rank's share of `case` through every strategy against attention over everything."""
    me = members.index(dist.get_rank())
    mine_q = case.q_owner % len(members) == me
    mine_k = case.k_owner % len(members) == me
    want = attention(case.q, case.k, case.v, q_positions=case.q_pos,
                     k_positions=case.k_pos)[0][mine_q]
    for strategy in ("gather_kv", "pass_q", "auto"):
        got = group_attention(case.q[mine_q], case.k[mine_k], case.v[mine_k],
                              q_positions=case.q_pos[mine_q], k_positions=case.k_pos[mine_k],
                              group=group, strategy=strategy)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert not got.isnan().any(), f"{case.name} via {strategy} on rank {me}: NaN"
        scale = want.abs().max().clamp_min(1e-30) if want.numel() else 1.0
        error = float((got - want).abs().max() / scale) if want.numel() else 0.0
        assert error < TOL, f"{case.name} via {strategy} on rank {me}: rel error {error}"


def rank_main(rank: int, world: int, port: int, seed: int, errors: Path) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        # All ranks create every group, in the same order (new_group is collective).
        odd_pair = dist.new_group([0, world - 1])
        singles = [dist.new_group([r]) for r in range(world)]
        for case in cases(world, seed):
            check_case(case, list(range(world)), None)
            if rank in (0, world - 1):
                check_case(case, [0, world - 1], odd_pair)
            check_case(case, [rank], singles[rank])
    except BaseException:
        # One rank's failure breaks its peers' connections; keep every rank's own story.
        (errors / f"rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def first_cause(errors: Path) -> str:
    """The ranks' tracebacks, those not caused by a peer's broken connection first."""
    reports = [p.read_text() for p in sorted(errors.glob("rank*.txt"))]
    return "\n".join(sorted(reports, key=lambda text: "by peer" in text))


@pytest.mark.parametrize("world", [2, 3])
def test_group_attention_equals_single_process_attention(world: int, tmp_path: Path) -> None:
    """Every strategy equals one-process attention on uneven splits, chunks, decode, no tokens."""
    seed = random.randrange(1 << 31)
    context = mp.start_processes(rank_main, args=(world, free_port(), seed, tmp_path),
                                 nprocs=world, start_method="spawn", join=False)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"seed {seed}: ranks still running after {JOIN_TIMEOUT_S} s")
    except ProcessException as error:
        raise AssertionError(f"seed {seed}: rank {error.error_index} failed\n"
                             f"{first_cause(tmp_path)}") from error
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


def test_choose_strategy_by_volume() -> None:
    """Decode and long prefixes pass queries; a GQA chunk without prefix gathers KV."""
    llama = (32, 8, 128)
    assert choose_strategy([1, 0], [4096, 4096], *llama) == "pass_q"
    assert choose_strategy([256, 256], [256, 256], *llama) == "gather_kv"
    assert choose_strategy([256, 256], [2304, 2304], *llama) == "pass_q"
    assert choose_strategy([0, 0], [0, 0], *llama) == "gather_kv"


def test_comm_bytes_counts_padding_and_skips_empty_rounds() -> None:
    """gather_kv pays for the longest rank's KV on every receiver; no queries moves nothing."""
    row = 2 * 2 * 16 * 4 + 8
    assert comm_bytes("gather_kv", [1, 1, 1], [5, 0, 1], 4, 2, 16, 4) == 3 * 2 * 5 * row
    assert comm_bytes("pass_q", [0, 0], [7, 9], 4, 2, 16, 4) == 0
    assert comm_bytes("gather_kv", [0, 0], [7, 9], 4, 2, 16, 4) == 0


def test_unknown_strategy_is_rejected() -> None:
    """A misspelt strategy raises before any collective."""
    q = torch.randn(1, 2, 8)
    with pytest.raises(ValueError, match="strategy"):
        group_attention(q, q, q, q_positions=torch.zeros(1, dtype=torch.int64),
                        k_positions=torch.zeros(1, dtype=torch.int64), strategy="ring")
