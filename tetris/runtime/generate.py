"""One request through a hand-given plan, driven as the serving engine drives its workers.

Each chunk's `prefill` on its group (the last with the sampling parameters: the rank holding the
last prompt token samples the first token and hands on its sampler state), the prompt's KV moved
to the decode ranks (`plan_kv_moves`, `send_kv` / `recv_kv`; the lead decode rank gets the
sampler), then `decode_step` one token at a time, then `free`. Over any `WorkerGroup`: what
`tetris generate` and the token-exact tests run on local processes, and the Ray actor tests on
the daemon's actors.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tetris.runtime.batch_attend import DecodeEntry
from tetris.runtime.engine_api import ChunkRun
from tetris.runtime.instance_pool import PrefillResult
from tetris.runtime.kv_moves import plan_kv_moves
from tetris.runtime.sampling import SamplingParams
from tetris.runtime.worker_group import Call, WorkerGroup
from tetris.solver.cluster import ClusterSpec
from tetris.solver.cost_model import CostModel
from tetris.solver.hardware import HARDWARE_PRESETS
from tetris.solver.model_spec import ModelSpec
from tetris.solver.plan import ChunkPlan, ChunkSpec, RequestPlan
from tetris.solver.problem import PendingRequest, Problem
from tetris.solver.validator import validate_plans


@dataclass(frozen=True)
class Generation:
    prompt_tokens: int
    token_ids: list[int]
    chunks: list[ChunkRun]
    decode_ranks: tuple[int, ...]  # lead first
    first_token_s: float
    decode_tokens_per_s: float | None
    first_logits: torch.Tensor  # [vocab], of the last prompt token


def check_plan(model: ModelSpec, prompt_tokens: int, chunks: Sequence[ChunkSpec],
               world_size: int) -> None:
    """The independent validator on the plan's structure (coverage, nesting, ranks) over
    `world_size` prefill instances; a hand-given plan has no schedule, so times are not
    checked. ValueError: user input."""
    cluster = ClusterSpec(prefill_instances=world_size, gpus_per_node=world_size)
    # Any hardware will do: only the structure is checked, and KV memory is the runtime's own.
    hardware = HARDWARE_PRESETS["h100"].model_copy(update={"hbm_bytes": 1e15})
    problem = Problem(
        CostModel(model, hardware, cluster),
        availability_s=(0.0,) * world_size,
        requests=(PendingRequest("generate", 0.0, prompt_tokens, 1.0),),
        block_tokens=1,
    )
    plan = RequestPlan("generate", tuple(
        ChunkPlan(c.start_token, c.end_token, c.instances, 0.0, 0.0) for c in chunks))
    violations = validate_plans(problem, [plan], timing=False)
    if violations:
        raise ValueError("; ".join(v.message for v in violations))


def prefill_prompt(workers: WorkerGroup, request_id: str, prompt_ids: Sequence[int],
                   chunks: Sequence[ChunkSpec], sampling: SamplingParams,
                   strategy: str = "auto") -> tuple[PrefillResult, list[ChunkRun]]:
    """Every chunk on its group, in order; (the result of the rank that sampled the first
    token, with the last token's logits; each chunk with its wall time on the driver)."""
    runs: list[ChunkRun] = []
    results: list[PrefillResult] = []
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        workers.ensure_group(chunk.instances)
        args = (request_id, chunk, list(prompt_ids[chunk.start_token:chunk.end_token]),
                sampling if last else None)
        started = time.perf_counter()
        results = workers.run([Call(r, "prefill", args,
                                    {"strategy": strategy, "return_logits": last})
                               for r in chunk.instances])
        runs.append(ChunkRun(chunk.start_token, chunk.end_token, chunk.instances,
                             time.perf_counter() - started))
    first = next((r for r in results if r.first_token is not None), None)
    if first is None:
        raise RuntimeError("the last chunk's last token produced no first token")
    return first, runs


def move_kv(workers: WorkerGroup, request_id: str, chunks: Sequence[ChunkSpec],
            first: PrefillResult, sampling: SamplingParams, decode_ranks: tuple[int, ...],
            rooms: Sequence[int]) -> None:
    """The prompt's KV from the prefill ranks onto `decode_ranks` (lead first; `rooms`: their
    free KV tokens), the lead keeping room for the tokens still to generate."""
    held = {r: sum(c.tokens_on(r) for c in chunks)
            for r in sorted({r for c in chunks for r in c.instances})}
    moves, reserve = plan_kv_moves(held, decode_ranks, rooms, sampling.max_tokens - 1)
    # Every prefill rank sends (a rank with no tokens only frees), every decode rank receives.
    workers.run([Call(r, "send_kv", (request_id, moves)) for r in held]
                + [Call(d, "recv_kv", (request_id, moves, n,
                                       *((sampling, first.sampler_state) if k == 0 else ())))
                   for k, (d, n) in enumerate(zip(decode_ranks, reserve, strict=True))])


def decode(workers: WorkerGroup, request_id: str, first_token: int, prompt_tokens: int,
           sampling: SamplingParams, eos_ids: Sequence[int],
           decode_ranks: tuple[int, ...]) -> list[int]:
    """One `decode_step` at a time on every decode rank until EOS or max_tokens; the lead
    computes each token, the others lend their KV to its attention."""
    workers.ensure_group(decode_ranks)
    stop = set(eos_ids)
    tokens = [first_token]
    while len(tokens) < sampling.max_tokens and tokens[-1] not in stop:
        entry = DecodeEntry(request_id, tokens[-1], prompt_tokens + len(tokens) - 1,
                            decode_ranks[0], decode_ranks)
        answers = workers.run([Call(d, "decode_step", ([entry],)) for d in decode_ranks])
        tokens.append(answers[0][request_id])
    return tokens


def generate(workers: WorkerGroup, prompt_ids: Sequence[int], chunks: Sequence[ChunkSpec],
             sampling: SamplingParams, eos_ids: Sequence[int], decode_sp: int = 1, *,
             decode_instances: Sequence[int] | None = None, rooms: Sequence[int] | None = None,
             request_id: str = "generate", strategy: str = "auto") -> Generation:
    """Decode on decode instances `decode_instances` (lead first; rank num_prefill + j for
    instance j), by default the first `decode_sp`; `rooms`: their free KV tokens, by default
    asked of them. `strategy`: how prefill SP ranks share attention — "gather_kv", "pass_q"
    or "auto" (by volume, see `tetris.kernels.group`)."""
    instances = tuple(range(decode_sp) if decode_instances is None else decode_instances)
    p, decoders = workers.num_prefill, workers.world_size - workers.num_prefill
    widest = 1 + max(r for c in chunks for r in c.instances)
    if widest > p:
        raise ValueError(f"the plan uses prefill ranks up to {widest - 1}, the group has {p}")
    if not instances or len(set(instances)) < len(instances) \
            or not all(0 <= j < decoders for j in instances):
        raise ValueError(f"decode instances {instances}: the group has {decoders} decode "
                         "ranks")
    decode_ranks = tuple(p + j for j in instances)
    touched = sorted({r for c in chunks for r in c.instances} | set(decode_ranks))
    try:
        started = time.perf_counter()
        first, runs = prefill_prompt(workers, request_id, prompt_ids, chunks, sampling,
                                     strategy)
        first_token_s = time.perf_counter() - started
        assert first.first_token is not None and first.logits is not None
        if rooms is None:
            rooms = workers.run([Call(d, "free_tokens") for d in decode_ranks])
        move_kv(workers, request_id, chunks, first, sampling, decode_ranks, rooms)
        decode_started = time.perf_counter()
        tokens = decode(workers, request_id, first.first_token, len(prompt_ids), sampling,
                        eos_ids, decode_ranks)
        decode_s = time.perf_counter() - decode_started
    except BaseException:
        # Free whatever the request holds anywhere (freeing what is not held is harmless), so
        # a failed plan leaves no KV behind on workers that outlive it (Ray actors); a group
        # that lost a rank is past use, and its own error is the one that matters.
        with contextlib.suppress(Exception):
            workers.run([Call(r, "free", (request_id,)) for r in touched])
        raise
    workers.run([Call(d, "free", (request_id,)) for d in decode_ranks])
    steps = len(tokens) - 1
    return Generation(
        prompt_tokens=len(prompt_ids),
        token_ids=tokens,
        chunks=runs,
        decode_ranks=decode_ranks,
        first_token_s=first_token_s,
        decode_tokens_per_s=steps / decode_s if steps and decode_s > 0 else None,
        first_logits=first.logits,
    )
