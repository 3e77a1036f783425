"""One instance's share of SP prefill and decode: a model replica, its KV cache, its groups.

Device-owning and transport-agnostic: the local process group (`local_group.py`) drives it over
queues here, Ray actors will host it in the runtime. Every rank of a chunk's group runs the model
on its own tokens; attention is `group_attention` over the KV that the group's ranks hold, so each
chunk's KV stays on the rank that computed it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from tetris.kernels.group import group_attention
from tetris.models.kv_cache import KVCache, LocalAttend
from tetris.models.llama import LlamaModel
from tetris.runtime.chunking import zigzag_positions
from tetris.solver.plan import ChunkSpec


@dataclass
class GroupAttend:
    """The model's `Attend` for one request on one rank of an SP group."""

    cache: KVCache
    request_id: str
    group: dist.ProcessGroup
    strategy: str = "auto"

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        # q: [T, H, D], k/v: [T, Hkv, D], positions: [T] — T may be 0 on a rank with no tokens.
        if positions.numel():
            self.cache.append(self.request_id, layer, k, v, positions)
        keys, values, key_positions = self.cache.get(self.request_id, layer)
        return group_attention(q, keys, values, q_positions=positions,
                               k_positions=key_positions, group=self.group,
                               strategy=self.strategy)


class SPWorker:
    def __init__(self, rank: int, model: LlamaModel, cache: KVCache,
                 groups: dict[tuple[int, ...], dist.ProcessGroup]) -> None:
        self.rank = rank
        self.model = model
        self.cache = cache
        self.groups = groups

    def _attend(self, request_id: str, ranks: tuple[int, ...],
                strategy: str) -> GroupAttend | LocalAttend:
        if len(ranks) == 1:
            return LocalAttend(self.cache, request_id)  # alone: no group, no collective
        try:
            group = self.groups[ranks]
        except KeyError:
            raise ValueError(f"no process group for ranks {ranks}") from None
        return GroupAttend(self.cache, request_id, group, strategy)

    def _reserve(self, request_id: str, tokens: int) -> None:
        if tokens and not self.cache.can_allocate(tokens):
            raise MemoryError(f"rank {self.rank}: no KV room for {tokens} tokens of "
                              f"{request_id!r} ({self.cache.num_free_tokens} free)")
        if tokens:
            self.cache.allocate(request_id, tokens)

    @torch.inference_mode()
    def prefill(self, request_id: str, chunk: ChunkSpec, chunk_ids: list[int],
                want_logits: bool, strategy: str = "auto") -> torch.Tensor | None:
        """Run this rank's share of `chunk` (token ids of the whole chunk given). Returns the
        logits of the chunk's last token on the rank that computed it, if `want_logits`."""
        if self.rank not in chunk.instances:
            return None
        positions = zigzag_positions(chunk, self.rank)
        ids = torch.tensor(chunk_ids, dtype=torch.int64)[positions - chunk.start_token]
        # The model and the KV live on the instance's device (a GPU in production).
        ids, positions = ids.to(self.cache.device), positions.to(self.cache.device)
        self._reserve(request_id, positions.numel())
        hidden = self.model(ids, positions, self._attend(request_id, chunk.instances, strategy))
        last = chunk.end_token - 1
        if want_logits and positions.numel() and int(positions[-1]) == last:
            return self.model.logits(hidden[-1:])[0]
        return None

    @torch.inference_mode()
    def decode(self, request_id: str, token_id: int, position: int, owner: int,
               ranks: tuple[int, ...], strategy: str = "auto") -> torch.Tensor | None:
        """One decode step over the KV spread on `ranks`; `owner` computes the token (and keeps
        its KV), the others only lend their KV to attention. Returns logits on the owner."""
        if self.rank not in ranks:
            return None
        mine = self.rank == owner
        device = self.cache.device
        ids = torch.tensor([token_id] if mine else [], dtype=torch.int64, device=device)
        positions = torch.tensor([position] if mine else [], dtype=torch.int64, device=device)
        self._reserve(request_id, int(mine))
        hidden = self.model(ids, positions, self._attend(request_id, ranks, strategy))
        return self.model.logits(hidden)[0] if mine else None

    @torch.inference_mode()
    def migrate(self, request_id: str, sources: tuple[int, ...], target_of: dict[int, int]) -> None:
        """Move this request's KV from each rank in `sources` to `target_of[rank]` (point to
        point over the world group): how decode SP narrower than the prefill group is set up."""
        if self.rank in sources:
            dest = target_of[self.rank]
            for layer in range(self.model.config.num_layers):
                k, v, pos = self.cache.get(request_id, layer)
                header = torch.tensor([k.shape[0]], dtype=torch.int64)
                dist.send(header, dest)
                if k.shape[0]:
                    dist.send(k.contiguous(), dest)
                    dist.send(v.contiguous(), dest)
                    dist.send(pos.contiguous(), dest)
            self.cache.free(request_id)
        for src in sorted(r for r in sources if target_of[r] == self.rank):
            for layer in range(self.model.config.num_layers):
                header = torch.empty(1, dtype=torch.int64)
                dist.recv(header, src)
                n = int(header.item())
                if not n:
                    continue
                if layer == 0:
                    self._reserve(request_id, n)
                k = torch.empty(n, self.cache.num_kv_heads, self.cache.head_dim,
                                dtype=self.cache.dtype)
                v = torch.empty_like(k)
                pos = torch.empty(n, dtype=torch.int64)
                dist.recv(k, src)
                dist.recv(v, src)
                dist.recv(pos, src)
                self.cache.append(request_id, layer, k, v, pos)

    def free(self, request_id: str) -> None:
        self.cache.free(request_id)

    def kv_tokens(self, request_id: str) -> int:
        k, _, _ = self.cache.get(request_id, 0)
        return int(k.shape[0])
