"""One instance of the runtime: a model replica, its KV cache and its place in the data plane.

Hosted by a Ray actor per instance (`actors.py`) in the daemon, and by a spawned process per
instance (`local_group.py`) for `tetris generate`; both drivers issue the same calls. Rank r of
one torch.distributed world spanning every instance (prefill ranks first, then decode).
Collectives and point-to-point transfers are issued by the driver from one thread, and each
host runs its calls in the order they were submitted, so every group sees its operations in one
global order (no deadlock).

- Prefill: each rank of the chunk's group runs the model on its zigzag share of the chunk
  (`chunking.zigzag_positions`) and attends with `GroupAttend` over the KV the group holds, so
  each chunk's KV stays on the rank that computed it. Process groups are created on first use,
  by every rank in the same order (`create_group`, sent to all ranks by the driver): torch
  names a group by how many this process has created, so members creating groups on their own
  would disagree on names (measured: `use_local_synchronization` hung for that reason).
- KV transfer prefill → decode: gloo/NCCL point-to-point, one packed tensor per move
  (`benchmarks/kv_transfer_cpu.py` measured it 3–5× faster than Ray's object store here).
  Streamed (`stream=True`): over a process group of its own (every rank's `transfer_group`),
  on a second thread of the host (the actor's "kv" concurrency group), beside the chunks and
  decode steps of the first; see `send_kv`.
- Decode: continuous batching (`decode_step`) over every request this rank leads or lends KV to.
- KV space is checked then taken: the driver checks its ledger before launching, `allocate`
  raises MemoryError if the room is gone, and nothing is written before the room is taken.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import TCPStore  # type: ignore[attr-defined]

from tetris.kernels.group import group_attention
from tetris.models.kv_cache import KVCache, LocalAttend
from tetris.models.llama import Attend, LlamaModel
from tetris.runtime.batch_attend import BatchAttend, DecodeEntry
from tetris.runtime.chunking import zigzag_positions
from tetris.runtime.faults import Fault, FaultPoint, FaultyAttend
from tetris.runtime.instance_pool import PrefillResult
from tetris.runtime.kv_moves import KVMove
from tetris.runtime.sampling import Sampler, SamplingParams
from tetris.solver.plan import ChunkSpec

# How long joining the world waits for every rank to reach the store (they all join at once,
# after every model is loaded).
STORE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class WorkerConfig:
    rank: int
    world_size: int
    model_dir: Path
    kv_tokens: int
    threads: int = 1
    device: str = "cpu"
    dtype: str = "float32"  # of the weights and the KV cache
    # How long a rank waits in a collective or transfer for a peer. A peer that died is seen
    # at once (its sockets close); one that raised or hangs is seen only after this, so it
    # bounds how long a fault can hold its peers.
    collective_timeout_s: float = 600.0


@dataclass
class GroupAttend:
    """The model's `Attend` for one request's prefill chunk on one rank of an SP group."""

    cache: KVCache
    request_id: str
    group: dist.ProcessGroup
    strategy: str = "auto"

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        # q: [T, H, D], k/v: [T, Hkv, D], positions: [T] — T may be 0 on a rank with no tokens.
        self.cache.append(self.request_id, layer, k, v, positions)
        keys, values, key_positions = self.cache.get(self.request_id, layer)
        return group_attention(q, keys, values, q_positions=positions,
                               k_positions=key_positions, group=self.group,
                               strategy=self.strategy)


class InstanceWorker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self._model: LlamaModel | None = None
        self._cache: KVCache | None = None
        self.groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        self.samplers: dict[str, Sampler] = {}
        self.faults: dict[FaultPoint, Fault] = {}
        self._listener: socket.socket | None = None  # rank 0: the store's bound socket
        self.transfer_group: dist.ProcessGroup | None = None
        # Streamed KV is received on a second thread: the cache's book of requests (a dict
        # the first thread iterates to count room) changes only under this lock.
        self._room = threading.Lock()

    def setup(self, master_addr: str, master_port: int) -> dict[str, Any]:
        """Load the model and join the world (every instance calls this at once; rank 0
        hosts the store at `master_addr:master_port`)."""
        self.load()
        self.join_world(master_addr, master_port)
        return {"rank": self.config.rank, "kv_tokens": self.config.kv_tokens,
                "pid": os.getpid()}

    def load(self) -> int:
        """Load the model and make the empty KV cache (once); this process's id."""
        from tetris.models.weights import load_model

        c = self.config
        torch.set_num_threads(c.threads)
        if self._model is None:
            dtype = getattr(torch, c.dtype)
            self._model = load_model(c.model_dir, dtype=dtype, device=c.device)
            mc = self._model.config
            self._cache = KVCache(mc.num_layers, mc.num_kv_heads, mc.head_dim, dtype,
                                  torch.device(c.device), c.kv_tokens)
        return os.getpid()

    def join_world(self, master_addr: str, master_port: int) -> None:
        """(Re)join the world: after an instance was replaced every rank joins a new one
        (torch cannot add a process to a world); the KV cache is kept, process groups are
        made again on use."""
        c = self.config
        if dist.is_initialized():
            dist.destroy_process_group()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.groups.clear()
        if c.device == "cpu":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        # Measured: torch's store binds every interface whatever address it is given, so rank
        # 0 binds the socket itself, on the rendezvous address only, and hands it over.
        store_timeout = datetime.timedelta(seconds=max(STORE_TIMEOUT_S, c.collective_timeout_s))
        if c.rank == 0:
            self._listener = socket.create_server((master_addr, master_port))
            store = TCPStore(master_addr, master_port, c.world_size, True, store_timeout,
                                  master_listen_fd=self._listener.fileno())
        else:
            store = TCPStore(master_addr, master_port, c.world_size, False, store_timeout)
        backend = "nccl" if c.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, store=store, rank=c.rank, world_size=c.world_size,
                                timeout=self._timeout)
        # Streamed KV travels on a group of its own: its messages never interleave with the
        # collectives and transfers the first thread issues on the others.
        self.transfer_group = dist.new_group(list(range(c.world_size)), timeout=self._timeout)

    @property
    def _timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.config.collective_timeout_s)

    def ping(self) -> int:
        return self.config.rank

    def arm_fault(self, fault: Fault) -> None:
        """`fault` fires in the next call of its kind (see `faults.py`)."""
        self.faults[fault.point] = fault

    def _attend(self, point: FaultPoint, attend: Attend) -> Attend:
        fault = self.faults.pop(point, None)
        return attend if fault is None else FaultyAttend(attend, fault)

    def create_group(self, ranks: tuple[int, ...]) -> None:
        """Called on every rank, in one order; non-members only keep the count in step."""
        # torch gives a new group its own default timeout (30 min), not the world's.
        group = dist.new_group(list(ranks), timeout=self._timeout)
        if self.config.rank in ranks:
            self.groups[ranks] = group

    @property
    def model(self) -> LlamaModel:
        if self._model is None:
            raise RuntimeError("worker not set up")
        return self._model

    @property
    def cache(self) -> KVCache:
        if self._cache is None:
            raise RuntimeError("worker not set up")
        return self._cache

    def _group(self, ranks: tuple[int, ...]) -> dist.ProcessGroup:
        try:
            return self.groups[ranks]
        except KeyError:
            raise ValueError(f"rank {self.config.rank}: no process group for ranks {ranks} "
                             "(create_group first)") from None

    # -- KV space ---------------------------------------------------------------------------
    def allocate(self, request_id: str, tokens: int) -> None:
        """Take room for `tokens` more KV tokens of the request; MemoryError if it is gone."""
        cache = self.cache
        with self._room:
            if not cache.can_allocate(tokens):
                raise MemoryError(f"rank {self.config.rank}: no KV room for {tokens} tokens of "
                                  f"{request_id!r} ({cache.num_free_tokens} free)")
            cache.allocate(request_id, tokens)

    def free_tokens(self) -> int:
        with self._room:
            return self.cache.num_free_tokens

    def free(self, request_id: str) -> None:
        with self._room:
            self.cache.free(request_id)
        self.samplers.pop(request_id, None)

    # -- prefill ----------------------------------------------------------------------------
    def prefill(self, request_id: str, chunk: ChunkSpec, chunk_ids: Sequence[int],
                sampling: SamplingParams | None, strategy: str = "auto",
                return_logits: bool = False) -> PrefillResult:
        """This rank's share of `chunk`; `sampling` is given for the prompt's last chunk, and
        the rank holding the last token samples the first output token (and returns its
        logits too if `return_logits`). `strategy`: how the group shares attention, see
        `tetris.kernels.group`."""
        started = time.perf_counter()
        self._agree_to_run(request_id, chunk)
        logits = self._forward(request_id, chunk, chunk_ids, strategy, sampling is not None)
        seconds = time.perf_counter() - started
        if logits is None or sampling is None:
            return PrefillResult(seconds)
        sampler = Sampler(sampling)
        token = sampler(logits)
        return PrefillResult(seconds, token, sampler.state(), logits if return_logits else None)

    def _agree_to_run(self, request_id: str, chunk: ChunkSpec) -> None:
        """Every rank of the group checks its KV room, then they agree (one all-reduce): if
        one rank cannot run the chunk, all raise together instead of leaving the others
        waiting inside the chunk's collectives."""
        need = chunk.tokens_on(self.config.rank)
        room = self.free_tokens()
        if chunk.sp > 1:
            flag = torch.tensor([1 if need <= room else 0], dtype=torch.int32,
                                device=self.cache.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._group(chunk.instances))
            if not flag.item():
                raise MemoryError(f"chunk [{chunk.start_token}, {chunk.end_token}) of "
                                  f"{request_id!r} on {chunk.instances}: a rank has no KV room "
                                  f"(rank {self.config.rank}: {need} needed, {room} free)")
        elif need > room:
            raise MemoryError(f"rank {self.config.rank}: no KV room for {need} tokens of "
                              f"{request_id!r} ({room} free)")

    @torch.inference_mode()
    def _forward(self, request_id: str, chunk: ChunkSpec, chunk_ids: Sequence[int],
                 strategy: str, want_logits: bool) -> torch.Tensor | None:
        """Run the model on this rank's share of the chunk (ids of the whole chunk given);
        the logits of the chunk's last token on the rank that computed it, if wanted."""
        positions = zigzag_positions(chunk, self.config.rank)
        ids = torch.tensor(list(chunk_ids), dtype=torch.int64)[positions - chunk.start_token]
        device = self.cache.device
        ids, positions = ids.to(device), positions.to(device)
        self.allocate(request_id, positions.numel())
        attend: GroupAttend | LocalAttend
        if chunk.sp == 1:
            attend = LocalAttend(self.cache, request_id)  # alone: no group, no collective
        else:
            attend = GroupAttend(self.cache, request_id, self._group(chunk.instances), strategy)
        hidden = self.model(ids, positions, self._attend("prefill", attend))
        if want_logits and positions.numel() and int(positions[-1]) == chunk.end_token - 1:
            return self.model.logits(hidden[-1:])[0]
        return None

    # -- KV transfer ------------------------------------------------------------------------
    def send_kv(self, request_id: str, moves: Sequence[KVMove], start: int = 0,
                stream: bool = False, local_key: str | None = None) -> None:
        """Send this rank's KV of the request from its `start`-th token on (append order),
        move by move, then free it here. `stream`: a request still prefilling, from the
        second thread over `transfer_group`; the KV is kept (later chunks attend to it, the
        driver frees it once all is sent). Reading it beside a running chunk of the same
        request is safe: the cache only appends, never rewrites a filled token, and a grown
        buffer replaces the old one only once the filled tokens are copied into it.
        A move to this very rank (elastic roles: its own decode role, whose KV of the request
        is kept under `local_key`) is a copy inside the cache, its room taken here (the
        receiving call, made after this one, takes the rest of the reservation)."""
        cache = self.cache
        layers = range(cache.num_layers)
        group = self.transfer_group if stream else None
        offset = start
        for move in moves:
            if move.source != self.config.rank:
                continue
            end = offset + move.tokens
            k = torch.stack([cache.get(request_id, layer)[0][offset:end] for layer in layers])
            v = torch.stack([cache.get(request_id, layer)[1][offset:end] for layer in layers])
            positions = cache.get(request_id, 0)[2][offset:end]
            if positions.numel() != move.tokens:
                raise RuntimeError(f"rank {self.config.rank}: KV of {request_id!r} ends at "
                                   f"{offset + positions.numel()}, {end} to send")
            if move.dest == self.config.rank:
                if local_key is None or local_key == request_id:
                    raise ValueError(f"rank {self.config.rank}: a move of {request_id!r} to "
                                     "itself needs the key of its other role (local_key)")
                self.allocate(local_key, move.tokens)
                for layer in layers:
                    cache.append(local_key, layer, k[layer], v[layer], positions)
            else:
                dist.send(torch.stack([k, v]).contiguous(), move.dest, group=group)
                dist.send(positions.contiguous(), move.dest, group=group)
            offset = end
        if not stream:
            self.free(request_id)

    def recv_kv(self, request_id: str, moves: Sequence[KVMove], reserve_tokens: int,
                sampling: SamplingParams | None = None,
                sampler_state: torch.Tensor | None = None, stream: bool = False) -> None:
        """Take room for `reserve_tokens` (the prompt share plus, on the lead, the tokens to
        be generated; 0 for a later streamed batch), then receive every move addressed here.
        The lead also gets the request's sampler, continuing the random stream of its first
        token. `stream`: on the second thread over `transfer_group` (see `send_kv`), into a
        request no decode step touches until the driver has seen every batch arrive. Moves from
        this very rank were copied by its `send_kv`, which took their room."""
        cache = self.cache
        rank = self.config.rank
        self.allocate(request_id, reserve_tokens - sum(
            m.tokens for m in moves if m.source == rank == m.dest))
        group = self.transfer_group if stream else None
        shape = (cache.num_layers, 0, cache.num_kv_heads, cache.head_dim)
        for move in moves:
            if move.dest != rank or move.source == rank:
                continue
            kv = torch.empty((2, shape[0], move.tokens, *shape[2:]), dtype=cache.dtype,
                             device=cache.device)
            positions = torch.empty(move.tokens, dtype=torch.int64, device=cache.device)
            dist.recv(kv, move.source, group=group)
            dist.recv(positions, move.source, group=group)
            for layer in range(cache.num_layers):
                cache.append(request_id, layer, kv[0, layer], kv[1, layer], positions)
        if sampling is not None:
            self.set_sampler(request_id, sampling, sampler_state)

    def kv_held(self, request_id: str) -> tuple[int, torch.Tensor | None]:
        """KV tokens of the request held here, and its sampler's state if this rank leads
        its decode: what a move of a decoding request off this rank sends."""
        sampler = self.samplers.get(request_id)
        return self.cache.num_tokens(request_id), None if sampler is None else sampler.state()

    def set_sampler(self, request_id: str, sampling: SamplingParams,
                    state: torch.Tensor | None = None) -> None:
        """This rank leads the request's decode: it samples its tokens from now on."""
        self.samplers[request_id] = Sampler(sampling, state)

    # -- decode -----------------------------------------------------------------------------
    @torch.inference_mode()
    def decode_step(self, entries: Sequence[DecodeEntry]) -> dict[str, int]:
        """One continuous-batching step: every entry this rank leads computes one token (its
        KV appended here); entries it only lends KV to join their group's attention. All ranks
        of a multi-rank entry get the same entries in the same order."""
        mine = [e for e in entries if e.lead == self.config.rank]
        device = self.cache.device
        ids = torch.tensor([e.token_id for e in mine], dtype=torch.int64, device=device)
        positions = torch.tensor([e.position for e in mine], dtype=torch.int64, device=device)
        attend = BatchAttend(self.cache, entries, self.config.rank, self.groups)
        hidden = self.model(ids, positions, self._attend("decode", attend))
        if not mine:
            return {}
        logits = self.model.logits(hidden)
        return {e.request_id: self.samplers[e.request_id](logits[i])
                for i, e in enumerate(mine)}
