"""An SP group of local processes (one per instance, gloo over loopback) driven over queues.

The stand-in for the runtime's Ray actors, for `tetris generate` and tests: each process owns a
model replica and a KV cache (`SPWorker`); the driver sends every command to every rank and waits
for all answers, so the ranks enter their collectives together.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tetris.runtime.ports import free_port
from tetris.solver.plan import ChunkSpec

START_TIMEOUT_S = 300.0
COMMAND_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class GroupConfig:
    model_dir: Path
    world_size: int
    threads_per_rank: int = 1
    kv_tokens_per_rank: int = 1 << 16


def _rank_main(rank: int, config: GroupConfig, port: int, commands: Any, results: Any) -> None:
    # Imports inside: a spawned child starts from scratch, keep the parent's import cheap.
    import torch.distributed as dist

    from tetris.models.kv_cache import KVCache
    from tetris.models.weights import load_model
    from tetris.runtime.sp_worker import SPWorker

    try:
        torch.set_num_threads(config.threads_per_rank)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          GLOO_SOCKET_IFNAME="lo")
        dist.init_process_group("gloo", rank=rank, world_size=config.world_size)
        # Every rank creates the nested prefix groups in the same order (a collective).
        groups = {tuple(range(s)): dist.new_group(list(range(s)))
                  for s in range(1, config.world_size + 1)}
        model = load_model(config.model_dir)
        mc = model.config
        cache = KVCache(mc.num_layers, mc.num_kv_heads, mc.head_dim, torch.float32,
                        torch.device("cpu"), config.kv_tokens_per_rank)
        worker = SPWorker(rank, model, cache, groups)
    except Exception:
        results.put(("error", rank, traceback.format_exc()))
        return
    results.put(("ready", rank, None))
    while True:
        name, args = commands.get()
        if name == "stop":
            break
        try:
            results.put(("ok", rank, getattr(worker, name)(*args)))
        except Exception:
            results.put(("error", rank, traceback.format_exc()))
    dist.destroy_process_group()


class RankFailed(RuntimeError):
    pass


@dataclass
class LocalSPGroup:
    """`with LocalSPGroup(config) as group: group.call(...)`."""

    config: GroupConfig
    _procs: list[Any] = field(default_factory=list)
    _commands: list[Any] = field(default_factory=list)
    _results: Any = None

    def __enter__(self) -> LocalSPGroup:
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        port = free_port()
        for rank in range(self.config.world_size):
            commands = ctx.Queue()
            proc = ctx.Process(target=_rank_main, daemon=True,
                               args=(rank, self.config, port, commands, self._results))
            proc.start()
            self._procs.append(proc)
            self._commands.append(commands)
        try:
            self._collect("ready", range(self.config.world_size), START_TIMEOUT_S)
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
                    commands.put(("stop", ()))
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        self._procs.clear()
        self._commands.clear()

    def _collect(self, expect: str, ranks: Iterator[int] | range | tuple[int, ...],
                 timeout: float) -> dict[int, Any]:
        waiting = set(ranks)
        out: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while waiting:
            try:
                left = max(0.1, deadline - time.monotonic())
                status, rank, value = self._results.get(timeout=left)
            except queue.Empty:
                dead = [r for r in waiting if not self._procs[r].is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close()
                    raise RankFailed(f"ranks {sorted(waiting)} did not answer "
                                     f"(dead: {dead})") from None
                continue
            if status == "error":
                self.close()
                raise RankFailed(f"rank {rank} failed:\n{value}")
            if status == expect or (expect == "ok" and status == "ok"):
                out[rank] = value
                waiting.discard(rank)
        return out

    def call(self, name: str, *args: Any, ranks: tuple[int, ...] | None = None) -> dict[int, Any]:
        """Run `SPWorker.<name>(*args)` on `ranks` (default all); {rank: result}."""
        targets = tuple(range(self.config.world_size)) if ranks is None else ranks
        for rank in targets:
            self._commands[rank].put((name, args))
        return self._collect("ok", targets, COMMAND_TIMEOUT_S)

    def prefill(self, request_id: str, prompt_ids: list[int], chunks: list[ChunkSpec],
                strategy: str = "auto") -> tuple[torch.Tensor, list[float]]:
        """Every chunk in order; (logits of the last prompt token, seconds per chunk)."""
        seconds = []
        logits = None
        for i, chunk in enumerate(chunks):
            started = time.perf_counter()
            answers = self.call("prefill", request_id, chunk,
                                prompt_ids[chunk.start_token:chunk.end_token],
                                i == len(chunks) - 1, strategy, ranks=chunk.instances)
            seconds.append(time.perf_counter() - started)
            found = [v for v in answers.values() if v is not None]
            if found:
                logits = found[0]
        assert logits is not None, "the last chunk's last token produced no logits"
        return logits, seconds
