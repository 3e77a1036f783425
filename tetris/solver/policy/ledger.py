"""The ledger: what runs where and what KV each request holds, kept from executor events.

Both executors report the same events — a request arrived, a chunk was launched or ended, its
prompt's KV moved to decode, it finished or was cancelled, an instance was lost — and the ledger
turns them into the planner's view (`view`). It is the one book of instance state and KV room:
the simulator and the runtime keep no other (the runtime's workers hold the KV itself; the
ledger says how much of it is whose).

A request passes through three books: `prefill` (prompt left to plan, or a chunk running),
`handoff` (prefilled: its KV waits on its prefill instances for decode room) and `decode`
(reserved on decode instances, its KV `moving` until the transfer is done). With KV streaming a
request is placed on decode while still in `prefill` (`decode_begin` after its first chunk): its
finished chunks' KV is copied to decode while later chunks compute (they still attend to it, so
the prefill copy is kept until `kv_moved`), and it goes straight from `prefill` to `decode` when
its last chunk ends. `release` takes it out of whichever book it is in; while a chunk or a KV
transfer of it is in flight, the release is deferred to that work's end, so nothing is freed
under a running operation.

An instance serves when it is neither lost (a failure) nor parked (elastic roles:
`ledger_roles.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from tetris.solver.policy.dispatch import DecodeLoad
from tetris.solver.policy.ledger_roles import LedgerError, RoleLedger
from tetris.solver.policy.settings import PolicySettings
from tetris.solver.policy.view import Launch, LoadTracker, PrefillView
from tetris.solver.problem import PendingRequest

# A lost instance is shown free only this far in the future: plans never start on it now, and
# the planners (which need finite times) price any plan waiting for it as hopeless.
LOST_AVAILABILITY_S = 1e6


@dataclass(slots=True)
class RequestEntry:
    request_id: str
    arrival_s: float
    prompt_tokens: int
    ttft_slo_s: float
    prefilled: int = 0  # tokens of launched chunks
    kv_instances: tuple[int, ...] = ()  # the last launched chunk's group
    planned_ready_s: float = 0.0
    running: bool = False
    kv_held: dict[int, int] = field(default_factory=dict)  # prefill instance -> KV tokens
    decode: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # (instances, reserved)
    moving: bool = False  # its KV transfer prefill -> decode is in flight
    release_pending: bool = False  # released while its work was in flight: freed at its end


@dataclass(frozen=True, slots=True)
class Released:
    """What a request held when it left the ledger (the executor frees it on the workers)."""

    request_id: str
    prefill_kv: dict[int, int]  # prefill instance -> KV tokens
    decode_instances: tuple[int, ...]


class Ledger(RoleLedger):
    def __init__(self, num_prefill: int, num_decode: int, settings: PolicySettings,
                 prefill_kv_tokens: int | None = None, *, elastic: bool = False) -> None:
        if num_prefill < 1:
            raise ValueError(f"need at least one prefill instance, got {num_prefill}")
        self.settings = settings
        self.elastic = elastic
        self.prefill_kv_tokens = prefill_kv_tokens  # None: the planners bound KV alone
        self.busy = [False] * num_prefill  # running a chunk, or sending KV
        self.planned_end = [0.0] * num_prefill
        self.busy_s = [0.0] * num_prefill
        self.lost = [False] * num_prefill
        self.parked = [False] * num_prefill
        self.off = [False] * num_prefill  # lost or parked: takes no work
        self.kv_used = [0] * num_prefill
        self.decode_reserved = [0] * num_decode
        self.decode_batch = [0] * num_decode
        self.decode_lost = [False] * num_decode
        self.decode_parked = [False] * num_decode  # closed to new requests, or parked
        self.decode_off = [False] * num_decode
        # Decode KV tokens ever freed: its rate is what the role planners read.
        self.decode_freed_total = 0
        self.load = LoadTracker(settings.load_tau_s)
        self.prefill: dict[str, RequestEntry] = {}  # arrival order: the planners' order
        self.handoff: dict[str, RequestEntry] = {}
        self.decode: dict[str, RequestEntry] = {}

    # -- queries ------------------------------------------------------------------------------
    def entry(self, request_id: str) -> RequestEntry | None:
        return (self.prefill.get(request_id) or self.handoff.get(request_id)
                or self.decode.get(request_id))

    def __contains__(self, request_id: str) -> bool:
        return self.entry(request_id) is not None

    def __len__(self) -> int:
        return len(self.prefill) + len(self.handoff) + len(self.decode)

    def idle(self, instances: Sequence[int]) -> bool:
        return not any(self.busy[g] or self.off[g] for g in instances)

    def decode_loads(self) -> list[DecodeLoad]:
        """The dispatcher's view; a decode instance that takes no requests shows no room and
        no slot."""
        big = 1 << 62
        reserved = self.decode_reserved
        if self.elastic:  # the GPU's prefill KV takes room too
            reserved = [r + k for r, k in zip(reserved, self.kv_used, strict=True)]
        return [DecodeLoad(big, big) if off else DecodeLoad(r, b) for r, b, off in
                zip(reserved, self.decode_batch, self.decode_off, strict=True)]

    def is_empty(self) -> bool:
        """Nothing held anywhere: every instance free and every KV count back to zero."""
        return (not len(self) and not any(self.busy) and not any(self.kv_used)
                and not any(self.decode_reserved) and not any(self.decode_batch))

    # -- the planner's view ---------------------------------------------------------------------
    def nothing_to_decide(self, now: float) -> bool:
        """Advance the load average; True when no chunk could start now (every prefill
        instance busy, or every request in prefill mid-chunk), so a decision is skipped."""
        # An instance off counts as neither busy nor idle: the load is the serving ones'.
        live = [b for b, off in zip(self.busy, self.off, strict=True) if not off]
        busy = sum(live)
        self.load.update(now, busy / len(live) if live else 1.0)
        return busy == len(live) or all(e.running or e.release_pending
                                        for e in self.prefill.values())

    def view(self, now: float) -> PrefillView:
        overrun = now + self.settings.overrun_s
        availability = tuple(LOST_AVAILABILITY_S + now if off else max(end, overrun) if b
                             else now for b, end, off in zip(self.busy, self.planned_end,
                                                            self.off, strict=True))
        pending = []
        for e in self.prefill.values():
            if e.prefilled == e.prompt_tokens or e.release_pending:
                continue  # its last chunk is running, or it is gone: nothing left to plan
            pending.append(PendingRequest(
                e.request_id, e.arrival_s, e.prompt_tokens, e.ttft_slo_s,
                prefilled_tokens=e.prefilled, kv_instances=e.kv_instances,
                ready_s=max(e.planned_ready_s, overrun) if e.running else None))
        idle = tuple(not (b or off) for b, off in zip(self.busy, self.off, strict=True))
        return PrefillView(now, availability, idle, tuple(pending), self.load.load)

    # -- prefill events -----------------------------------------------------------------------
    def arrive(self, request_id: str, arrival_s: float, prompt_tokens: int,
               ttft_slo_s: float) -> None:
        if request_id in self:
            raise LedgerError(f"request id {request_id!r} is already in the ledger")
        self.prefill[request_id] = RequestEntry(request_id, arrival_s, prompt_tokens,
                                                ttft_slo_s)

    def refusal(self, launch: Launch) -> str | None:
        """Why `launch` cannot start now, or None: a decision made on an older view may
        name a request that has gone or instances busy since, and planners bound one
        request's KV per instance, not the sum over requests."""
        e = self.prefill.get(launch.request_id)
        c = launch.chunk
        if e is None or e.release_pending:
            return "not a pending request"
        if e.running or c.start_token != e.prefilled or \
                not e.prefilled < c.end_token <= e.prompt_tokens:
            return (f"tokens [{c.start_token}, {c.end_token}) do not continue its prefill at "
                    f"{e.prefilled}")
        if not self.idle(c.instances) or not set(e.kv_instances) <= set(c.instances):
            return f"instances {c.instances} busy or not nested"
        room = self.prefill_kv_tokens
        if room is not None and any(self.kv_used[g] + n > room
                                    for g, n in c.kv_shares().items()):
            return f"no KV room on instances {c.instances}"
        return None

    def launch(self, launch: Launch, start_s: float, planned_s: float) -> RequestEntry:
        """The chunk starts at `start_s`, planned to take `planned_s` (LedgerError if it may
        not: check `refusal` first where a refusal is expected)."""
        why = self.refusal(launch)
        if why is not None:
            raise LedgerError(f"launch of {launch.request_id!r}: {why}")
        e = self.prefill[launch.request_id]
        c = launch.chunk
        e.prefilled, e.kv_instances = c.end_token, c.instances
        e.planned_ready_s = start_s + planned_s
        e.running = True
        for g, n in c.kv_shares().items():
            self.kv_used[g] += n
            e.kv_held[g] = e.kv_held.get(g, 0) + n
        for g in c.instances:
            self.busy[g] = True
            self.planned_end[g] = start_s + planned_s
        return e

    def chunk_ended(self, request_id: str,
                    seconds: float) -> tuple[RequestEntry, Released | None]:
        """The request's running chunk ended (done or failed) after `seconds`: its group is
        free. A request whose last chunk this was moves to the handoff book; one released
        while the chunk ran leaves the ledger now, and what it held is returned."""
        e = self.prefill.get(request_id)
        if e is None or not e.running:
            raise LedgerError(f"chunk end of {request_id!r}: no chunk of it is running")
        e.running = False
        for g in e.kv_instances:
            self.busy[g] = False
            self.busy_s[g] += seconds
        if e.release_pending:
            # A KV stream still in flight frees it at its end (`kv_moved`).
            return (e, None) if e.moving else (e, self._drop(e))
        if e.prefilled == e.prompt_tokens:
            del self.prefill[request_id]
            # Placed on decode while it prefilled (streaming): no handoff wait.
            (self.handoff if e.decode is None else self.decode)[request_id] = e
        return e, None

    def may_send(self, instances: Sequence[int]) -> bool:
        """Prefill instances that may send KV now: none computing or lost (a parked one, its
        GPU decoding, still sends the KV it holds)."""
        return not any(self.busy[g] or self.lost[g] for g in instances)

    def hold(self, instances: Sequence[int], now: float) -> None:
        """Take prefill instances for a KV transfer (a sender cannot compute)."""
        if not self.may_send(instances):
            raise LedgerError(f"hold of {tuple(instances)}: not idle")
        for g in instances:
            self.busy[g], self.planned_end[g] = True, now + self.settings.overrun_s

    def unhold(self, instances: Sequence[int]) -> None:
        for g in instances:
            self.busy[g] = False

    # -- decode events ------------------------------------------------------------------------
    def decode_begin(self, request_id: str, instances: tuple[int, ...],
                     reserved: tuple[int, ...], moving: bool = True) -> RequestEntry:
        """The request takes `reserved[i]` KV tokens and a batch slot on decode instance
        `instances[i]` (the lead first); its KV is `moving` there until `kv_moved`. A request
        still in prefill (KV streaming: at least one chunk launched) stays in that book until
        its last chunk ends."""
        e = self.handoff.pop(request_id, None)
        streaming = e is None
        if e is None:
            e = self.prefill.get(request_id)
            if e is None or e.decode is not None or e.release_pending or not e.prefilled:
                raise LedgerError(f"decode of {request_id!r}: it is neither prefilled nor "
                                  "prefilling without a decode placement")
            if not moving:
                raise LedgerError(f"decode of {request_id!r}: its prefill is not done, so its "
                                  "KV must stream")
        for j, n in zip(instances, reserved, strict=True):
            self.decode_reserved[j] += n
            self.decode_batch[j] += 1
        e.decode, e.moving = (instances, reserved), moving
        if not streaming:
            self.decode[request_id] = e
        if not moving:
            self._free_prefill_kv(e)
        return e

    def kv_moved(self, request_id: str, *, failed: bool = False
                 ) -> tuple[RequestEntry, Released]:
        """The transfer ended: the prefill KV is gone (sent, or to be freed after a failure:
        `Released.prefill_kv` says where it was). A request released during the transfer
        leaves the ledger now (`Released.decode_instances` to free too). A stream may end
        before the prefill does only when it `failed` (the request is redone next) or the
        request was released."""
        e = self.decode.get(request_id) or self.prefill.get(request_id)
        if e is None or not e.moving:
            raise LedgerError(f"KV moved of {request_id!r}: no transfer of it is in flight")
        if request_id in self.prefill and not (e.release_pending or failed):
            raise LedgerError(f"KV moved of {request_id!r}: its prefill is not done")
        e.moving = False
        if e.running:  # released mid-prefill, its stream cut short: the chunk's end frees it
            return e, Released(request_id, {}, ())
        held = self._free_prefill_kv(e)
        if e.release_pending:
            return e, replace(self._drop(e), prefill_kv=held)
        return e, Released(request_id, held, ())

    # -- endings ------------------------------------------------------------------------------
    def release(self, request_id: str) -> Released | None:
        """The request finished, was cancelled or failed: what it held, to free on the
        workers; None if a chunk or transfer of it is still in flight (its end frees it) or
        it is not in the ledger."""
        e = self.entry(request_id)
        if e is None or e.release_pending:
            return None
        if e.running or e.moving:
            e.release_pending = True
            return None
        return self._drop(e)

    def _drop(self, e: RequestEntry) -> Released:
        held = self._free_prefill_kv(e)
        decode: tuple[int, ...] = ()
        if e.decode is not None:
            decode, reserved = e.decode
            for j, n in zip(decode, reserved, strict=True):
                self.decode_reserved[j] -= n
                self.decode_batch[j] -= 1
            self.decode_freed_total += sum(reserved)
            e.decode = None
        for book in (self.prefill, self.handoff, self.decode):
            book.pop(e.request_id, None)
        return Released(e.request_id, held, decode)

    def _free_prefill_kv(self, e: RequestEntry) -> dict[int, int]:
        held, e.kv_held = e.kv_held, {}
        for g, n in held.items():
            self.kv_used[g] -= n
        return held

    # -- instance failures ----------------------------------------------------------------------
    def instance_lost(self, instance: int) -> list[str]:
        """Prefill instance `instance` is gone: it takes no more work, and the requests whose
        KV or running chunk was on it are returned (their prompts must be failed or redone),
        including one whose KV was being sent from it to decode."""
        self.lost[instance] = self.off[instance] = True
        return [e.request_id for book in (self.prefill, self.handoff, self.decode)
                for e in book.values()
                if instance in e.kv_held or (e.running and instance in e.kv_instances)]

    def decode_instance_lost(self, instance: int) -> list[str]:
        """Decode instance `instance` is gone: nothing more is placed on it, and the requests
        decoding there (or moving their KV there) are returned."""
        self.decode_lost[instance] = self.decode_off[instance] = True
        return [e.request_id for book in (self.prefill, self.decode) for e in book.values()
                if e.decode is not None and instance in e.decode[0]]

    def instance_back(self, instance: int) -> None:
        """Prefill instance `instance` serves again, empty (a restarted replica)."""
        if self.kv_used[instance]:
            raise LedgerError(f"prefill instance {instance} rejoins holding "
                              f"{self.kv_used[instance]} KV tokens of lost requests")
        self.lost[instance] = self.busy[instance] = False
        self.off[instance] = self.parked[instance]

    def decode_instance_back(self, instance: int) -> None:
        if self.decode_reserved[instance] or self.decode_batch[instance]:
            raise LedgerError(f"decode instance {instance} rejoins with requests on it")
        self.decode_lost[instance] = False
        self.decode_off[instance] = self.decode_parked[instance]

    def decode_move(self, request_id: str, old: int, new: int) -> tuple[int, int]:
        """A decoding request's KV on decode instance `old` starts moving to `new` (a drain):
        `new` takes its reservation there and a batch slot, `old` keeps them until
        `decode_moved` (the KV is on both meanwhile). Returns (its index in the placement,
        the tokens reserved)."""
        e = self.decode.get(request_id)
        if e is None or e.decode is None or e.moving or e.release_pending:
            raise LedgerError(f"move of {request_id!r}: it is not decoding, or its KV is "
                              "already moving")
        instances, reserved = e.decode
        if old not in instances or new in instances or self.decode_off[new]:
            raise LedgerError(f"move of {request_id!r} from decode instance {old} to {new}: "
                              f"it decodes on {instances}, and {new} must be open and new to it")
        i = instances.index(old)
        n = reserved[i]
        self.decode_reserved[new] += n
        self.decode_batch[new] += 1
        e.decode = ((*instances[:i], new, *instances[i + 1:]), reserved)
        e.moving = True
        return i, n

    def decode_moved(self, request_id: str, old: int, tokens: int) -> Released | None:
        """The move from `old` ended (or failed): its room there is free. A request released
        meanwhile leaves the ledger now (what to free is returned)."""
        e = self.decode.get(request_id)
        if e is None or not e.moving:
            raise LedgerError(f"moved of {request_id!r}: no move of it is in flight")
        self.decode_reserved[old] -= tokens
        self.decode_batch[old] -= 1
        e.moving = False
        return self._drop(e) if e.release_pending else None

    def redo(self, request_id: str, prompt_tokens: int, *, arrival_s: float | None = None,
             ttft_slo_s: float | None = None) -> Released:
        """Start the request's prefill over from token 0 with `prompt_tokens` to prefill (a
        decoding request's prompt plus the tokens it generated), after KV of it was lost:
        everything it holds anywhere is returned to free, and it waits in prefill again in
        arrival order. Its chunk or KV transfer must have ended first."""
        e = self.entry(request_id)
        if e is None or e.release_pending:
            raise LedgerError(f"redo of {request_id!r}: not in the ledger")
        if e.running or e.moving:
            raise LedgerError(f"redo of {request_id!r}: its chunk or KV transfer is in flight")
        released = self._drop(e)
        fresh = RequestEntry(request_id, e.arrival_s if arrival_s is None else arrival_s,
                             prompt_tokens, e.ttft_slo_s if ttft_slo_s is None else ttft_slo_s)
        waiting = [*self.prefill.values(), fresh]
        waiting.sort(key=lambda x: x.arrival_s)  # stable: ties keep their order
        self.prefill = {x.request_id: x for x in waiting}
        return released
