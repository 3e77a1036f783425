"""The ledger's role operations (elastic clusters), a part of `Ledger`.

An instance serves when it is neither lost (a failure) nor parked (on an elastic cluster, its
GPU serves the other role: `park`, `close_decode`). Parking never strands anything: a prefill
instance parks only idle and holding no KV of a request still prefilling (KV of prefilled
requests leaves by its hand-off as before), and a decode instance that stops taking requests
parks only once the ones it holds are gone. On an elastic cluster (`elastic`) prefill instance
i and decode instance i are one GPU, so its decode room is what both roles' KV leaves free.
A decoding request's KV may also move off a decode instance that stops taking requests
(`Ledger.decode_move`, the runtime's drain), so it parks without waiting for the request to
finish.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the ledger imports this module
    from tetris.solver.policy.ledger import RequestEntry


class LedgerError(RuntimeError):
    """An executor event contradicts the ledger (an executor bug, never a user's input)."""


class RoleLedger:
    """Parking and opening instances; the ledger's own state, declared here for its methods."""

    elastic: bool
    busy: list[bool]
    lost: list[bool]
    parked: list[bool]
    off: list[bool]
    kv_used: list[int]
    decode_reserved: list[int]
    decode_batch: list[int]
    decode_lost: list[bool]
    decode_parked: list[bool]
    decode_off: list[bool]
    prefill: dict[str, RequestEntry]

    def may_park(self, instance: int) -> bool:
        """Idle, and no request still prefilling holds KV on it (its next chunk would need
        it)."""
        return not self.busy[instance] and not (self.kv_used[instance] and any(
            instance in e.kv_held for e in self.prefill.values()))

    def park(self, instance: int) -> None:
        """Prefill instance `instance` stops serving (its GPU turns to decode); `may_park`
        must hold, so no request is left waiting on it."""
        if not self.may_park(instance):
            raise LedgerError(f"park of prefill instance {instance}: it is busy or holds KV "
                              "of a request still prefilling")
        self.parked[instance] = self.off[instance] = True

    def unpark(self, instance: int) -> None:
        """Prefill instance `instance` serves again (empty)."""
        self.parked[instance] = False
        self.off[instance] = self.lost[instance]

    def close_decode(self, instance: int) -> None:
        """Decode instance `instance` takes no new requests; those on it go on decoding
        (`decode_empty` says when they are all gone)."""
        self.decode_parked[instance] = self.decode_off[instance] = True

    def open_decode(self, instance: int) -> None:
        self.decode_parked[instance] = False
        self.decode_off[instance] = self.decode_lost[instance]

    def decode_room(self, instance: int, kv_tokens: int) -> int:
        """Free KV tokens on decode instance `instance` of `kv_tokens` (elastic: the GPU's
        prefill KV takes room too)."""
        used = self.decode_reserved[instance]
        return kv_tokens - used - (self.kv_used[instance] if self.elastic else 0)

    def decode_empty(self, instance: int) -> bool:
        return not (self.decode_reserved[instance] or self.decode_batch[instance])

