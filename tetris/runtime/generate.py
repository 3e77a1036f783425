"""One request through a hand-given plan on a local SP group: prefill chunk by chunk, then decode
with the KV spread over the decode ranks. What `tetris generate` and the equivalence tests run."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tetris.runtime.local_group import LocalSPGroup
from tetris.runtime.sampling import Sampler, SamplingParams
from tetris.solver.cluster import ClusterSpec
from tetris.solver.cost_model import CostModel
from tetris.solver.hardware import HARDWARE_PRESETS
from tetris.solver.model_spec import ModelSpec
from tetris.solver.plan import ChunkPlan, ChunkSpec, RequestPlan
from tetris.solver.problem import PendingRequest, Problem
from tetris.solver.validator import validate_plans


@dataclass(frozen=True)
class ChunkTiming:
    start_token: int
    end_token: int
    sp: int
    seconds: float


@dataclass(frozen=True)
class Generation:
    prompt_tokens: int
    token_ids: list[int]
    chunks: list[ChunkTiming]
    first_token_s: float
    decode_tokens_per_s: float | None
    first_logits: torch.Tensor  # [vocab], of the last prompt token


def check_plan(model: ModelSpec, prompt_tokens: int, chunks: Sequence[ChunkSpec],
               world_size: int) -> None:
    """The independent validator on the plan's structure (coverage, nesting, ranks); a
    hand-given plan has no schedule, so times are not checked. ValueError: user input."""
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


def generate(group: LocalSPGroup, prompt_ids: list[int], chunks: list[ChunkSpec],
             sampling: SamplingParams, eos_ids: Sequence[int], decode_sp: int | None = None,
             request_id: str = "generate", strategy: str = "auto") -> Generation:
    """`strategy`: how SP ranks share attention — "gather_kv", "pass_q" or "auto" (by volume,
    see `tetris.kernels.group`)."""
    last_group = chunks[-1].instances
    decode_ranks = tuple(range(decode_sp or len(last_group)))
    if len(decode_ranks) > group.config.world_size:
        raise ValueError(f"decode SP {len(decode_ranks)} exceeds the {group.config.world_size} "
                         "ranks of the group")
    sampler = Sampler(sampling)
    started = time.perf_counter()
    logits, seconds = group.prefill(request_id, prompt_ids, chunks, strategy)
    tokens = [sampler(logits)]
    first_token_s = time.perf_counter() - started
    # Decode SP narrower than the last prefill group: move the outer ranks' KV inwards.
    outer = tuple(r for r in last_group if r >= len(decode_ranks))
    if outer:
        target_of = {r: r % len(decode_ranks) for r in outer}
        group.call("migrate", request_id, outer, target_of,
                   ranks=tuple(sorted(set(outer) | set(target_of.values()))))
    decode_started = time.perf_counter()
    stop = set(eos_ids)
    try:
        while len(tokens) < sampling.max_tokens and tokens[-1] not in stop:
            step = len(tokens) - 1
            owner = decode_ranks[step % len(decode_ranks)]  # spreads the new KV evenly
            answers = group.call("decode", request_id, tokens[-1], len(prompt_ids) + step,
                                 owner, decode_ranks, strategy, ranks=decode_ranks)
            tokens.append(sampler(answers[owner]))
    finally:
        group.call("free", request_id)
    decode_s = time.perf_counter() - decode_started
    steps = len(tokens) - 1
    return Generation(
        prompt_tokens=len(prompt_ids),
        token_ids=tokens,
        chunks=[ChunkTiming(c.start_token, c.end_token, c.sp, s)
                for c, s in zip(chunks, seconds, strict=True)],
        first_token_s=first_token_s,
        decode_tokens_per_s=steps / decode_s if steps and decode_s > 0 else None,
        first_logits=logits,
    )
