"""Per-instance KV cache for arbitrary token ranges of several requests, and the local `Attend`.

Under sequence parallelism an instance holds only some of a request's tokens (its share of each
chunk, at any positions), so the cache stores positions next to keys and values and never
assumes they are contiguous. Token order is append order, per (request, layer).

Accounting is in tokens and check/act like nano-vllm's block manager: `can_allocate(n)` then
`allocate(request_id, n)`, called again as a request grows (each chunk, each decode step);
`append` writes only into room reserved that way. A request this instance never saw holds the
empty range: ranks of an SP group that got no tokens of a request still take part in attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tetris.kernels.attention import attention


class KVCacheFullError(RuntimeError):
    """An allocation beyond `max_tokens`."""


@dataclass
class _Slot:
    """One request's storage: per layer a buffer of `capacity` tokens, `filled[layer]` used."""

    reserved: int = 0
    filled: list[int] = field(default_factory=list)
    keys: list[Tensor] = field(default_factory=list)  # per layer [capacity, Hkv, D]
    values: list[Tensor] = field(default_factory=list)
    positions: list[Tensor] = field(default_factory=list)  # per layer [capacity] int64


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, max_tokens: int) -> None:
        if min(num_layers, num_kv_heads, head_dim) <= 0 or max_tokens < 0:
            raise ValueError("KVCache sizes must be positive and max_tokens non-negative")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.max_tokens = max_tokens
        self._slots: dict[str, _Slot] = {}

    # -- accounting ------------------------------------------------------------------------
    @property
    def num_used_tokens(self) -> int:
        return sum(slot.reserved for slot in self._slots.values())

    @property
    def num_free_tokens(self) -> int:
        return self.max_tokens - self.num_used_tokens

    def can_allocate(self, num_tokens: int) -> bool:
        return 0 <= num_tokens <= self.num_free_tokens

    def allocate(self, request_id: str, num_tokens: int) -> None:
        """Reserve room for `num_tokens` more tokens of `request_id` (in every layer)."""
        if num_tokens < 0:
            raise ValueError(f"cannot allocate {num_tokens} tokens")
        if not self.can_allocate(num_tokens):
            raise KVCacheFullError(
                f"KV cache full: {num_tokens} tokens requested for {request_id!r}, "
                f"{self.num_free_tokens} of {self.max_tokens} free"
            )
        slot = self._slots.get(request_id)
        if slot is None:
            slot = self._slots[request_id] = _Slot(filled=[0] * self.num_layers)
        slot.reserved += num_tokens

    def free(self, request_id: str) -> None:
        """Release the request's room and storage; a request not held here is a no-op."""
        self._slots.pop(request_id, None)

    def num_tokens(self, request_id: str, layer: int = 0) -> int:
        slot = self._slots.get(request_id)
        return 0 if slot is None else slot.filled[layer]

    def request_ids(self) -> list[str]:
        return list(self._slots)

    # -- storage ---------------------------------------------------------------------------
    def append(self, request_id: str, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> None:
        # k, v: [T, Hkv, D]; positions: [T] int64
        t = positions.shape[0]
        shape = (t, self.num_kv_heads, self.head_dim)
        assert k.shape == shape and v.shape == shape, (
            f"k {tuple(k.shape)}, v {tuple(v.shape)}: want {shape}"
        )
        assert positions.dim() == 1 and positions.dtype == torch.int64
        assert 0 <= layer < self.num_layers, f"layer {layer} of {self.num_layers}"
        if t == 0:
            return
        slot = self._slots.get(request_id)
        start = 0 if slot is None else slot.filled[layer]
        if slot is None or start + t > slot.reserved:
            raise KVCacheFullError(
                f"request {request_id!r}, layer {layer}: appending {t} tokens to {start} "
                f"exceeds its allocation of {0 if slot is None else slot.reserved} "
                "(call allocate first)"
            )
        self._grow(slot, start + t)
        end = start + t
        slot.keys[layer][start:end] = k
        slot.values[layer][start:end] = v
        slot.positions[layer][start:end] = positions
        slot.filled[layer] = end

    def get(self, request_id: str, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """(k [N, Hkv, D], v [N, Hkv, D], positions [N]) in append order: views, not copies."""
        slot = self._slots.get(request_id)
        if slot is None or not slot.keys:
            empty = torch.empty(0, self.num_kv_heads, self.head_dim, dtype=self.dtype,
                                device=self.device)
            return empty, empty, torch.empty(0, dtype=torch.int64, device=self.device)
        n = slot.filled[layer]
        return slot.keys[layer][:n], slot.values[layer][:n], slot.positions[layer][:n]

    def _grow(self, slot: _Slot, needed: int) -> None:
        capacity = slot.keys[0].shape[0] if slot.keys else 0
        if needed <= capacity:
            return
        # Geometric growth (1/8 headroom) keeps one-token decode appends amortised O(1) while
        # the storage stays within 12.5% (+16 tokens) of what the request reserved.
        new_capacity = max(needed, capacity + capacity // 8 + 16)
        kv_shape = (new_capacity, self.num_kv_heads, self.head_dim)
        for store, shape, dtype in ((slot.keys, kv_shape, self.dtype),
                                    (slot.values, kv_shape, self.dtype),
                                    (slot.positions, (new_capacity,), torch.int64)):
            grown = [torch.empty(shape, dtype=dtype, device=self.device)
                     for _ in range(self.num_layers)]
            for layer, old in enumerate(store):
                grown[layer][: slot.filled[layer]] = old[: slot.filled[layer]]
            store[:] = grown


@dataclass
class LocalAttend:
    """The single-process `Attend`: this layer's k, v join the request's cache, q attends to all.

    The caller allocates room for the step's tokens first (`cache.allocate(request_id, T)`)."""

    cache: KVCache
    request_id: str

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        # q: [T, H, D]; k, v: [T, Hkv, D]; positions: [T] -> out [T, H, D]
        self.cache.append(self.request_id, layer, k, v, positions)
        keys, values, key_positions = self.cache.get(self.request_id, layer)
        out, _ = attention(q, keys, values, q_positions=positions, k_positions=key_positions)
        return out
