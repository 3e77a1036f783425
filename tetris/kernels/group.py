"""`group_attention`: attention of each rank's queries over the KV that an SP group holds.

Every rank calls it with its own queries and KV; the collectives it makes depend only on sizes
that all ranks learn in a first round, so all ranks make the same calls in the same order, even
with no queries or no KV. Tensors are packed as raw bytes per token row so that one collective
carries values and positions (and lse) of any dtype; gloo gets CPU tensors, NCCL CUDA ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from tetris.kernels.attention import attention, check_inputs
from tetris.kernels.merge import merge

STRATEGIES = ("auto", "gather_kv", "pass_q")


def group_attention(q: Tensor, k: Tensor, v: Tensor, *, q_positions: Tensor, k_positions: Tensor,
                    group: dist.ProcessGroup | None = None, strategy: str = "auto",
                    scale: float | None = None) -> Tensor:
    """Called collectively by every rank of `group` (None = world). Each rank passes ITS queries
    (q [Tq_r, H, D], possibly Tq_r == 0) and the KV IT holds for this request (k, v
    [Tk_r, Hkv, D], possibly empty; positions arbitrary and disjoint across ranks). Returns
    out [Tq_r, H, D]: each local query's attention over the union of all ranks' KV (causal by
    positions).

    strategy "gather_kv" all-gathers K, V and positions and attends locally; "pass_q"
    all-gathers queries, attends them over the local KV, returns each (out, lse) partial to
    the queries' owner (all_to_all) and merges there. "auto" (`choose_strategy`) takes the one
    that moves fewer elements: gather_kv Σ_r Tk_r·2·Hkv·D to every rank, pass_q Σ_r Tq_r·H·D
    out and Σ_r Tq_r·(H·D + H) back; it uses the sizes all ranks exchange first, so all ranks
    pick the same. Attention runs on q's device; only packed buffers travel to the
    collectives' device (CPU for gloo, the current CUDA device for NCCL)."""
    check_inputs(q, k, v, q_positions, k_positions)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
    if dist.get_world_size(group) == 1:
        return attention(q, k, v, q_positions=q_positions, k_positions=k_positions,
                         scale=scale)[0]
    comm = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend(group) == "nccl" else torch.device("cpu")
    q_sizes, k_sizes = _exchange_sizes(q, k, group, comm)
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    if sum(q_sizes) == 0:
        return q.new_zeros(q.shape)
    if strategy == "auto":
        strategy = choose_strategy(q_sizes, k_sizes, heads, kv_heads, dim)
    if strategy == "gather_kv":
        rows = _all_gather_rows(_pack(k, v, k_positions).to(comm), k_sizes, group)
        keys, values, positions = _unpack(rows.to(q.device), [k.shape[1:], v.shape[1:], ()],
                                          [k.dtype, k.dtype, torch.int64])
        return attention(q, keys, values, q_positions=q_positions, k_positions=positions,
                         scale=scale)[0]
    rows = _all_gather_rows(_pack(q, q_positions).to(comm), q_sizes, group)
    queries, positions = _unpack(rows.to(q.device), [q.shape[1:], ()], [q.dtype, torch.int64])
    out, lse = attention(queries, k, v, q_positions=positions, k_positions=k_positions,
                         scale=scale)
    # Gathered rows are in rank order, so rank r's queries' partials go to rank r.
    world = len(q_sizes)
    sent = _pack(out, lse).to(comm)
    received = sent.new_empty((world * q.shape[0], sent.shape[1]))
    dist.all_to_all_single(received, sent, [q.shape[0]] * world, list(q_sizes), group=group)
    outs, lses = _unpack(received.to(q.device), [out.shape[1:], lse.shape[1:]],
                         [out.dtype, lse.dtype])
    merged, _ = merge(outs.reshape(world, *q.shape).unbind(0),
                      lses.reshape(world, *q.shape[:2]).unbind(0))
    return merged


def choose_strategy(q_sizes: Sequence[int], k_sizes: Sequence[int], num_heads: int,
                    num_kv_heads: int, head_dim: int) -> str:
    """The strategy that moves fewer elements, from every rank's query and KV counts.

    gather_kv brings every rank all KV: Σ_r Tk_r·2·Hkv·D elements per rank. pass_q brings every
    rank all queries, Σ_r Tq_r·H·D, and each query's owner a partial (out and lse) from every
    rank, which over the group adds up to as much again per rank as Σ_r Tq_r·(H·D + H). Padding
    to the longest rank and the positions are left out; ties go to gather_kv (no merge)."""
    gather_kv = sum(k_sizes) * 2 * num_kv_heads * head_dim
    pass_q = sum(q_sizes) * (2 * num_heads * head_dim + num_heads)
    return "pass_q" if pass_q < gather_kv else "gather_kv"


def comm_bytes(strategy: str, q_sizes: Sequence[int], k_sizes: Sequence[int], num_heads: int,
               num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes that all ranks together receive from other ranks in one call of `strategy`,
    padding included, the size round (a few bytes per rank) not."""
    if strategy not in ("gather_kv", "pass_q"):
        raise ValueError(f"no traffic model for strategy {strategy!r}")
    world = len(q_sizes)
    if sum(q_sizes) == 0:
        return 0  # no queries anywhere: nothing moves after the size round
    if strategy == "gather_kv":
        return world * (world - 1) * max(k_sizes) * (2 * num_kv_heads * head_dim * itemsize + 8)
    queries = world * (world - 1) * max(q_sizes) * (num_heads * head_dim * itemsize + 8)
    partials = (world - 1) * sum(q_sizes) * num_heads * (head_dim * itemsize + 4)
    return queries + partials


def _exchange_sizes(q: Tensor, k: Tensor, group: dist.ProcessGroup | None,
                    comm: torch.device) -> tuple[list[int], list[int]]:
    mine = torch.tensor([q.shape[0], k.shape[0], *q.shape[1:], k.shape[1], q.element_size()],
                        dtype=torch.int64, device=comm)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    table = torch.stack(every).tolist()
    # Every rank sees the same table, so a mismatch raises on all of them alike (no hang).
    if any(row[2:] != table[0][2:] for row in table):
        raise ValueError(f"ranks disagree on (H, D, Hkv, itemsize): {[r[2:] for r in table]}")
    return [row[0] for row in table], [row[1] for row in table]


def _pack(*parts: Tensor) -> Tensor:
    """Token-major tensors [T, ...] → one uint8 tensor [T, bytes per token]."""
    rows = parts[0].shape[0]
    return torch.cat([p.contiguous().view(torch.uint8).reshape(rows, _row_bytes(p))
                      for p in parts], dim=1)


def _unpack(packed: Tensor, shapes: Sequence[Sequence[int]],
            dtypes: Sequence[torch.dtype]) -> list[Tensor]:
    rows, offset, parts = packed.shape[0], 0, []
    for shape, dtype in zip(shapes, dtypes, strict=True):
        width = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        chunk = packed[:, offset:offset + width].contiguous()
        parts.append(chunk.view(dtype).reshape(rows, *shape))
        offset += width
    return parts


def _all_gather_rows(packed: Tensor, sizes: Sequence[int],
                     group: dist.ProcessGroup | None) -> Tensor:
    """All ranks' rows, concatenated in rank order (all_gather needs equal shapes: pad, trim)."""
    longest = max(sizes)
    if longest == 0:
        return packed
    padded = packed.new_zeros((longest, packed.shape[1]))
    padded[: packed.shape[0]] = packed
    every = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(every, padded, group=group)
    return torch.cat([t[:n] for t, n in zip(every, sizes, strict=True)])


def _row_bytes(t: Tensor) -> int:
    return _numel(t.shape[1:]) * t.element_size()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
