"""The model's `Attend` for one continuous-batching decode step over many requests.

The batch's rows are the requests this rank leads (one new token each, in entry order). Each
request attends over its own KV: locally when it lives on this rank alone, otherwise through
`group_attention` over its decode group (the KV split over several decode instances), where
ranks that only lend KV join with no queries. Entries are walked in the same order on every
rank, so each multi-rank request's collectives line up across its group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tetris.kernels.attention import attention
from tetris.kernels.group import group_attention
from tetris.models.kv_cache import KVCache


@dataclass(frozen=True, slots=True)
class DecodeEntry:
    request_id: str
    token_id: int  # the last sampled token (input of this step); used by the lead only
    position: int
    lead: int  # the rank that computes this request's token and stores its new KV
    ranks: tuple[int, ...]  # every rank holding part of its KV (lead included)


@dataclass
class BatchAttend:
    cache: KVCache
    entries: Sequence[DecodeEntry]
    rank: int
    groups: Mapping[tuple[int, ...], Any]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        # q: [B, H, D] over the entries this rank leads, in entry order.
        outs: list[torch.Tensor] = []
        row = 0
        for entry in self.entries:
            if self.rank not in entry.ranks:
                continue
            leads = entry.lead == self.rank
            rows = slice(row, row + 1) if leads else slice(row, row)
            if leads:
                self.cache.append(entry.request_id, layer, k[rows], v[rows], positions[rows])
                row += 1
            keys, values, key_positions = self.cache.get(entry.request_id, layer)
            if len(entry.ranks) == 1:
                out, _ = attention(q[rows], keys, values, q_positions=positions[rows],
                                   k_positions=key_positions)
            else:
                out = group_attention(q[rows], keys, values, q_positions=positions[rows],
                                      k_positions=key_positions,
                                      group=self.groups[entry.ranks], strategy="pass_q")
            if leads:
                outs.append(out)
        return torch.cat(outs) if outs else q.new_zeros(q.shape)
