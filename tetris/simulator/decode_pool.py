"""Simulated decode instances: continuous batching under a KV-memory limit.

Each decode instance runs back-to-back steps; one step gives every sequence it leads one token
and lasts `cost_model.decode_step_seconds(batch, kv_tokens)` (memory-bound: the weights plus all
KV it holds are read once). Sequences join at step boundaries (a KV arriving mid-step waits for
the next step) and leave when their last token is out, freeing their KV.

Memory: a request reserves its final KV (prompt + all output tokens) and a batch slot when
dispatched (in the shared `Ledger`, by the shared FIFO `DecodeQueue`), so a running batch never
runs out of memory mid-decode (no preemption to model). A request whose KV
does not fit on one instance is split by the dispatcher (decode SP > 1): every instance holding a
share counts it in its batch and KV reads, and the lead instance's steps produce its tokens
(the non-lead instances' partial attention is assumed to overlap with the lead's step).

Failures (`tetris.simulator.failures`): `abort` takes requests out wherever they are here (queue,
KV in flight, batches), `lose_instance` stops a lost instance's step.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from tetris.simulator.events import PRIORITY_COMPLETE, Event, EventQueue
from tetris.simulator.noise import DurationNoise
from tetris.simulator.records import RequestRecord, SimRequest
from tetris.solver.cost_model import CostModel
from tetris.solver.policy.dispatch import DecodeQueue, Placement
from tetris.solver.policy.ledger import Ledger

DECODE_STEP = "decode_step"
KV_ARRIVE = "kv_arrive"


@dataclass(slots=True, eq=False)  # identity: list.remove must find this very sequence
class _Seq:
    record: RequestRecord
    remaining: int
    placement: Placement
    prefill_tokens: int  # KV it arrives with: its prompt (plus earlier tokens, if redone)
    tokens: int  # tokens it decodes here


@dataclass(slots=True)
class _Instance:
    active: list[_Seq] = field(default_factory=list)
    incoming: list[_Seq] = field(default_factory=list)
    kv_tokens: int = 0
    stepping: bool = False
    busy_s: float = 0.0


class DecodePool:
    """The decode side of a disaggregated cluster. Its events (`DECODE_STEP`, `KV_ARRIVE`)
    go on the simulator's queue; the simulator hands them back through `handle`."""

    def __init__(
        self,
        cost_model: CostModel,
        ledger: Ledger,
        events: EventQueue,
        noise: DurationNoise,
        *,
        max_batch: int = 256,
        max_sp: int | None = None,
        kv_cross_node: bool = True,
    ) -> None:
        num_instances = len(ledger.decode_reserved)
        if num_instances <= 0:
            raise ValueError(f"need at least one decode instance, got {num_instances}")
        self.cost_model = cost_model
        self.ledger = ledger
        self.capacity = cost_model.kv_capacity_tokens
        self.instances = [_Instance() for _ in range(num_instances)]
        self.events = events
        self.noise = noise
        self.max_sp = num_instances if max_sp is None else max_sp
        self.queue = DecodeQueue(self.capacity, max_batch, self.max_sp)
        self.kv_cross_node = kv_cross_node
        self.waiting: dict[str, RequestRecord] = {}
        self.steps = 0
        self.tokens = 0

    def require_fits(self, request: SimRequest) -> None:
        """ValueError unless the request's final KV fits on the instances it may span."""
        need = request.prompt_tokens + request.output_tokens
        span = min(self.max_sp, len(self.instances))
        if need > self.capacity * span:
            raise ValueError(
                f"request {request.request_id!r}: its KV ({request.prompt_tokens} + "
                f"{request.output_tokens} tokens) exceeds the memory of {span} decode "
                f"instance(s) ({self.capacity} tokens each)"
            )

    def submit(self, record: RequestRecord, now: float) -> None:
        """The request's first token is out (its prefill ended at `now`): move its KV here."""
        if record.finished:
            self.ledger.release(record.request_id)  # a one-token answer never decodes
            return
        request = record.request
        self.require_fits(request)
        self.waiting[request.request_id] = record
        self.queue.submit(request.request_id, request.prompt_tokens + request.output_tokens)
        self.dispatch(now)

    def dispatch(self, now: float) -> None:
        """Place waiting requests, first come first served, while the head fits."""
        while (placed := self.queue.place_head(self.ledger.decode_loads())) is not None:
            rid, placement = placed
            self.queue.pop()
            record = self.waiting.pop(rid)
            entry = self.ledger.decode_begin(rid, placement.instances, placement.shares)
            record.decode_instances = placement.instances
            # The ledger's prompt, not the request's: a redone request re-prefilled its
            # earlier output tokens too.
            transfer = self.cost_model.kv_transfer_seconds(
                entry.prompt_tokens, cross_node=self.kv_cross_node
            )
            record.kv_transfer_s = transfer
            tokens = record.request.output_tokens - len(record.token_times)
            seq = _Seq(record, tokens, placement, entry.prompt_tokens, tokens)
            self.events.push(now + transfer, PRIORITY_COMPLETE, KV_ARRIVE, seq)

    def handle(self, kind: str, payload: object, now: float) -> None:
        if kind == KV_ARRIVE:
            assert isinstance(payload, _Seq)
            self._arrive(payload, now)
        else:
            assert isinstance(payload, int)
            self._step_end(payload, now)

    def _arrive(self, seq: _Seq, now: float) -> None:
        self.ledger.kv_moved(seq.record.request_id)
        total = max(1, seq.record.request.prompt_tokens + seq.record.request.output_tokens)
        for g, share in zip(seq.placement.instances, seq.placement.shares, strict=True):
            inst = self.instances[g]
            inst.incoming.append(seq)
            # The KV read by each step is the prompt share now, growing by one per token.
            inst.kv_tokens += share * seq.prefill_tokens // total
            if not inst.stepping:
                self._start_step(g, now)

    def _start_step(self, g: int, now: float) -> None:
        inst = self.instances[g]
        if inst.incoming:
            inst.active.extend(inst.incoming)
            inst.incoming.clear()
        if not inst.active:
            inst.stepping = False
            return
        inst.stepping = True
        seconds = self.noise.apply(
            self.cost_model.decode_step_seconds(len(inst.active), inst.kv_tokens)
        )
        inst.busy_s += seconds
        self.events.push(now + seconds, PRIORITY_COMPLETE, DECODE_STEP, g)

    def _step_end(self, g: int, now: float) -> None:
        inst = self.instances[g]
        self.steps += 1
        finished: list[_Seq] = []
        for seq in inst.active:
            if seq.placement.instances[0] != g:
                continue
            seq.record.token_times.append(now)
            seq.remaining -= 1
            inst.kv_tokens += 1
            self.tokens += 1
            if seq.remaining == 0:
                finished.append(seq)
        for seq in finished:
            self.ledger.release(seq.record.request_id)
            self._detach(seq)
        if finished:
            self.dispatch(now)
        self._start_step(g, now)

    def _detach(self, seq: _Seq) -> None:
        """Take `seq` and the KV it holds off every instance it spans."""
        request = seq.record.request
        total = max(1, request.prompt_tokens + request.output_tokens)
        lead = seq.placement.instances[0]
        for g, share in zip(seq.placement.instances, seq.placement.shares, strict=True):
            inst = self.instances[g]
            if seq in inst.active:
                inst.active.remove(seq)
            else:  # a non-lead instance that has not stepped since the KV arrived
                inst.incoming.remove(seq)
            inst.kv_tokens -= share * seq.prefill_tokens // total
            if g == lead:  # one KV token per token it decoded
                inst.kv_tokens -= seq.tokens - seq.remaining
            # A non-lead instance may now have nothing left to step: it stops at its step end.

    # -- failures -------------------------------------------------------------------------------
    def abort(self, request_ids: Collection[str]) -> None:
        """Take these requests out of the pool wherever they are — waiting for room, their KV
        in flight (the transfer ends, failed, in the ledger) or decoding — so that the ledger
        may redo them."""
        for rid in request_ids:
            if self.queue.remove(rid):
                del self.waiting[rid]

        def moving(e: Event) -> bool:
            return e[3] == KV_ARRIVE and e[4].record.request_id in request_ids

        for event in self.events.cancel(moving):
            self.ledger.kv_moved(event[4].record.request_id)
        seen: dict[int, _Seq] = {}
        for inst in self.instances:
            for seq in (*inst.active, *inst.incoming):
                if seq.record.request_id in request_ids:
                    seen[id(seq)] = seq
        for seq in seen.values():
            self._detach(seq)

    def lose_instance(self, g: int) -> None:
        """Decode instance `g` is gone: its step in progress never ends (its requests are
        aborted by the caller), and it steps again only once something arrives on it."""
        def its_step(e: Event) -> bool:
            return e[3] == DECODE_STEP and e[4] == g

        self.events.cancel(its_step)
        self.instances[g].stepping = False

    def idle(self) -> bool:
        return not self.waiting and all(
            not i.active and not i.incoming for i in self.instances
        )
