"""Simulated decode instances: KV hand-off over the network, continuous batching under a
KV-memory limit.

Hand-off (`network.Network`): every rank of a chunk's group sends the KV it computed over its
own link, in parallel, to the request's decode instance(s). With `stream` the request is queued
for decode when its first chunk ends; once placed, every finished chunk's KV is sent at once
(later chunks keep computing: a transfer never blocks prefill), so only the tail is exposed
after the last chunk. Without `stream` the request is queued after its last chunk and all of its
KV leaves then. The request joins its decode instance when the last chunk has ended and its last
transfer has arrived; `RequestRecord.kv_transfer_s` is that wait after the first token.

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
from tetris.simulator.network import KV_SENT, Network, Transfer
from tetris.simulator.noise import DurationNoise
from tetris.simulator.records import ChunkRecord, RequestRecord, SimRequest
from tetris.solver.cost_model import CostModel
from tetris.solver.plan import ChunkSpec
from tetris.solver.policy.dispatch import DecodeQueue, Placement
from tetris.solver.policy.ledger import Ledger

DECODE_STEP = "decode_step"


@dataclass(slots=True, eq=False)  # identity: list.remove must find this very sequence
class _Seq:
    record: RequestRecord
    remaining: int
    placement: Placement
    prefill_tokens: int  # KV it arrives with: its prompt (plus earlier tokens, if redone)
    tokens: int  # tokens it decodes here


@dataclass(slots=True, eq=False)
class _Handoff:
    """One request on its way from prefill to decode."""

    record: RequestRecord
    placement: Placement | None = None
    unsent: dict[int, int] = field(default_factory=dict)  # prefill instance -> KV tokens
    in_flight: set[Transfer] = field(default_factory=set)
    prefill_end_s: float | None = None  # its last chunk's end: the first token is out


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
        stream: bool = True,
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
        self.network = Network(cost_model.cluster, cost_model.hardware, events)
        self.stream = stream
        self.num_prefill = cost_model.cluster.prefill_instances
        self.kv_bytes = cost_model.model.kv_bytes_per_token
        self.handoffs: dict[str, _Handoff] = {}
        cluster = cost_model.cluster
        self._decode_node = [cluster.node_of(self.num_prefill + j)
                             for j in range(num_instances)]
        self._decode_nodes: dict[int, int] = {}  # node -> its first decode instance
        for j, node in enumerate(self._decode_node):
            self._decode_nodes.setdefault(node, j)
        # Only a decode instance on a prefill node has a faster path (NVLink) to choose.
        self._shared_nodes = bool(set(self._decode_node) & set(cluster.prefill_node_of))
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

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def chunk_ended(self, record: RequestRecord, chunk: ChunkRecord, last: bool,
                    now: float) -> None:
        """A chunk of the request ended at `now` (`last`: its first token is out). Its KV goes
        to decode now if the request is placed, else once it is."""
        rid = record.request_id
        h = self.handoffs.get(rid)
        if h is None:
            # The last chunk samples one token: a request decodes if more are left after it.
            decodes = not record.finished if last else \
                record.request.output_tokens - len(record.token_times) > 1
            if not decodes:
                if last:  # a one-token answer (or a redo with one token left) is done
                    self.ledger.release(rid)
                return
            h = self.handoffs[rid] = _Handoff(record)
        if h.placement is None and rid not in self.queue and (self.stream or last):
            self._submit(record)
        shares = ChunkSpec(chunk.start_token, chunk.end_token, chunk.instances).kv_shares()
        if h.placement is None:
            for g, n in shares.items():
                h.unsent[g] = h.unsent.get(g, 0) + n
        else:
            self._send(h, shares, now)
        if last:
            h.prefill_end_s = now
            self._maybe_arrive(h, now)
        self.dispatch(now)

    def _submit(self, record: RequestRecord) -> None:
        request = record.request
        self.require_fits(request)
        self.queue.submit(request.request_id, request.prompt_tokens + request.output_tokens)

    def dispatch(self, now: float) -> None:
        """Place waiting requests, first come first served, while the head fits."""
        handoff = self._handoff_s if self._shared_nodes else None
        while (placed := self.queue.place_head(self.ledger.decode_loads(),
                                               handoff)) is not None:
            rid, placement = placed
            self.queue.pop()
            h = self.handoffs[rid]
            self.ledger.decode_begin(rid, placement.instances, placement.shares)
            h.record.decode_instances = placement.instances
            h.placement = placement
            unsent, h.unsent = h.unsent, {}
            self._send(h, unsent, now)
            self._maybe_arrive(h, now)

    def _handoff_s(self, request_id: str) -> list[float]:
        """Per decode instance: how long the KV ended so far would take to get there alone
        (the slowest of its senders). Links of one kind have one bandwidth, so this depends
        only on the decode instance's node: computed once per node."""
        held = self.handoffs[request_id].unsent
        base, net, kv = self.num_prefill, self.network, self.kv_bytes
        per_node: dict[int, float] = {}
        for node, j in self._decode_nodes.items():
            per_node[node] = max((net.seconds_alone(g, base + j, n * kv)
                                  for g, n in held.items()), default=0.0)
        return [per_node[self._decode_node[j]] for j in range(len(self.instances))]

    def _send(self, h: _Handoff, shares: dict[int, int], now: float) -> None:
        """Each prefill instance's tokens go to the decode instances in their shares."""
        placement = h.placement
        assert placement is not None
        total = sum(placement.shares)
        base = self.num_prefill
        for g, n in shares.items():
            left = n
            for i, (j, share) in enumerate(zip(placement.instances, placement.shares,
                                               strict=True)):
                part = left if i == len(placement.shares) - 1 else n * share // total
                left -= part
                if part:
                    h.in_flight.add(self.network.start(g, base + j, part * self.kv_bytes, now,
                                                       h))

    def _maybe_arrive(self, h: _Handoff, now: float) -> None:
        if h.prefill_end_s is None or h.placement is None or h.in_flight:
            return
        del self.handoffs[h.record.request_id]
        entry, _ = self.ledger.kv_moved(h.record.request_id)
        record = h.record
        record.kv_transfer_s = now - h.prefill_end_s
        tokens = record.request.output_tokens - len(record.token_times)
        # The ledger's prompt, not the request's: a redone request re-prefilled its earlier
        # output tokens too.
        self._arrive(_Seq(record, tokens, h.placement, entry.prompt_tokens, tokens), now)

    def handle(self, kind: str, payload: object, now: float) -> None:
        if kind == KV_SENT:
            assert isinstance(payload, tuple)
            done = self.network.handle(payload, now)
            if done is not None:
                assert isinstance(done, _Handoff)
                done.in_flight.discard(payload[0])
                self._maybe_arrive(done, now)
        else:
            assert isinstance(payload, int)
            self._step_end(payload, now)

    def _arrive(self, seq: _Seq, now: float) -> None:
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
    def abort(self, request_ids: Collection[str], now: float) -> None:
        """Take these requests out of the pool wherever they are — waiting for room, their KV
        in flight (the transfer is cut, failed, in the ledger) or decoding — so that the
        ledger may redo them."""
        for rid in request_ids:
            self.queue.remove(rid)
            h = self.handoffs.pop(rid, None)
            if h is None:
                continue
            for t in h.in_flight:
                self.network.cancel(t, now)
            h.in_flight.clear()
            if h.placement is not None:
                self.ledger.kv_moved(rid, failed=True)
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
        return not self.handoffs and not len(self.queue) and all(
            not i.active and not i.incoming for i in self.instances
        )
