"""A world of `InstanceWorker`s in local processes (gloo over loopback), driven over queues.

The stand-in for the daemon's Ray actors, for `tetris generate`, tests and benchmarks: each
spawned process hosts the same `InstanceWorker` as an actor does, set up with the same
`setup(master_addr, port)` and its groups made with the same `create_group` protocol. Like an
actor, a process runs its commands in the order they were sent; the driver sends a batch of
calls to all their ranks before waiting, so a group's ranks enter their collectives together.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tetris.runtime.ports import free_port
from tetris.runtime.worker import WorkerConfig
from tetris.runtime.worker_group import CALL_TIMEOUT_S, Call

START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class GroupConfig:
    """Ranks 0..prefill_ranks-1 prefill, then `decode_ranks` decode ranks, as in the daemon."""

    model_dir: Path
    prefill_ranks: int
    decode_ranks: int = 1
    threads_per_rank: int = 1
    kv_tokens_per_rank: int = 1 << 16

    @property
    def world_size(self) -> int:
        return self.prefill_ranks + self.decode_ranks


def _rank_main(config: WorkerConfig, commands: Any, results: Any) -> None:
    # Imports inside: a spawned child starts from scratch, keep the parent's import cheap.
    import torch.distributed as dist

    from tetris.runtime.worker import InstanceWorker

    worker = InstanceWorker(config)
    while True:
        command = commands.get()
        if command is None:
            break
        index, name, args, kwargs = command
        try:
            results.put(("ok", config.rank, index, getattr(worker, name)(*args, **kwargs)))
        except Exception:
            results.put(("error", config.rank, index, traceback.format_exc()))
    if dist.is_initialized():
        dist.destroy_process_group()


class RankFailed(RuntimeError):
    pass


@dataclass
class LocalSPGroup:
    """`with LocalSPGroup(config) as group: generate(group, ...)`; a `WorkerGroup`."""

    config: GroupConfig
    _procs: list[Any] = field(default_factory=list)
    _commands: list[Any] = field(default_factory=list)
    _results: Any = None
    _groups: set[tuple[int, ...]] = field(default_factory=set)
    _sent: int = 0  # calls sent so far: each answer names its call

    @property
    def num_prefill(self) -> int:
        return self.config.prefill_ranks

    @property
    def world_size(self) -> int:
        return self.config.world_size

    def __enter__(self) -> LocalSPGroup:
        c = self.config
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        for rank in range(c.world_size):
            commands = ctx.Queue()
            worker = WorkerConfig(rank=rank, world_size=c.world_size, model_dir=c.model_dir,
                                  kv_tokens=c.kv_tokens_per_rank, threads=c.threads_per_rank)
            proc = ctx.Process(target=_rank_main, daemon=True,
                               args=(worker, commands, self._results))
            proc.start()
            self._procs.append(proc)
            self._commands.append(commands)
        port = free_port()
        try:
            self.run([Call(r, "setup", ("127.0.0.1", port)) for r in range(c.world_size)],
                     START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for commands, proc in zip(self._commands, self._procs, strict=True):
            if proc.is_alive():
                with contextlib.suppress(Exception):
                    commands.put(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        self._procs.clear()
        self._commands.clear()

    def ensure_group(self, ranks: tuple[int, ...]) -> None:
        if len(ranks) > 1 and ranks not in self._groups:
            self.run([Call(r, "create_group", (ranks,)) for r in range(self.world_size)])
            self._groups.add(ranks)

    def run(self, calls: Sequence[Call], timeout: float = CALL_TIMEOUT_S) -> list[Any]:
        if not self._procs:
            raise RankFailed("the group is closed")
        first = self._sent
        for i, call in enumerate(calls):
            self._commands[call.rank].put((first + i, call.method, call.args,
                                           dict(call.kwargs)))
        self._sent += len(calls)
        waiting = {first + i: call.rank for i, call in enumerate(calls)}
        out: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while waiting:
            try:
                left = max(0.1, deadline - time.monotonic())
                status, rank, index, value = self._results.get(timeout=min(left, 5.0))
            except queue.Empty:
                dead = sorted({r for r in waiting.values() if not self._procs[r].is_alive()})
                if dead or time.monotonic() > deadline:
                    self.close()
                    raise RankFailed(f"ranks {sorted(set(waiting.values()))} did not answer "
                                     f"(dead: {dead})") from None
                continue
            if status == "error":
                self.close()
                raise RankFailed(f"rank {rank} failed:\n{value}")
            if waiting.pop(index, None) is not None:
                out[index] = value
        return [out[first + i] for i in range(len(calls))]
