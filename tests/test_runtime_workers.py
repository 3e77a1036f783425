"""The runtime's Ray actors on the embedded SmolLM2: a hand-given 3-chunk plan with SP growing
1→2, its KV moved to decode actors, and decode with the KV over 2 decode actors — greedy output
equal to HF transformers' on the same weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tetris.runtime.actors import WorkerPool
from tetris.runtime.generate import generate
from tetris.runtime.sampling import SamplingParams
from tetris.runtime.worker_group import Call, RayWorkerGroup
from tetris.solver.plan import ChunkSpec

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 12
TEXT = ("Rivers carry water from the mountains to the sea, shaping valleys and plains on the "
        "way. Along their banks people built farms, mills and towns. ")


@pytest.fixture(scope="module")
def pool(ray_session: Any, smollm2_dir: Path) -> Iterator[WorkerPool]:
    p = WorkerPool.start(ray_session, smollm2_dir, 2, 2, prefill_kv_tokens=4096,
                         decode_kv_tokens=4096)
    yield p
    p.shutdown(ray_session)


@pytest.fixture(scope="module")
def prompt_and_reference(smollm2_dir: Path) -> tuple[list[int], list[int]]:
    from tetris.models.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(smollm2_dir)
    prompt = tok.encode(TEXT * 12 + "Summarize:")
    torch.set_num_threads(1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                          eos_token_id=sorted(tok.eos_ids), pad_token_id=sorted(tok.eos_ids)[0])
    return prompt, out[0, len(prompt):].tolist()


def run_plan(ray: Any, pool: WorkerPool, rid: str, prompt: list[int], chunks: list[ChunkSpec],
             decode_instances: tuple[int, ...], rooms: tuple[int, ...]) -> list[int]:
    """Drive the actors with `tetris generate`'s driver, which drives them as the engine does:
    chunks on their groups, the KV moved to the decode ranks, then one decode step at a time."""
    workers = RayWorkerGroup(ray, pool)
    result = generate(workers, prompt, chunks, SamplingParams(max_tokens=NEW_TOKENS), eos_ids=(),
                      decode_instances=decode_instances, rooms=rooms, request_id=rid)
    # The prefill KV was handed over and freed, the decode KV freed at the end.
    free = workers.run([Call(r, "free_tokens") for r in range(workers.world_size)])
    assert free == [pool.prefill_kv_tokens] * pool.num_prefill \
        + [pool.decode_kv_tokens] * len(pool.decode)
    return result.token_ids


def test_three_chunks_sp_growing_1_to_2_match_hf(ray_session: Any, pool: WorkerPool,
                                                 prompt_and_reference: tuple[list[int],
                                                                             list[int]]) -> None:
    """Chunks [0,100) on {0}, [100,250) on {0,1}, rest on {0,1}; decode on one decode actor."""
    prompt, expected = prompt_and_reference
    n = len(prompt)
    assert n > 300
    chunks = [ChunkSpec(0, 100, (0,)), ChunkSpec(100, 250, (0, 1)), ChunkSpec(250, n, (0, 1))]
    got = run_plan(ray_session, pool, "three-chunks", prompt, chunks, (0,), (4096,))
    assert got[:len(expected)] == expected


def test_decode_with_kv_over_two_decode_actors_matches_hf(
        ray_session: Any, pool: WorkerPool,
        prompt_and_reference: tuple[list[int], list[int]]) -> None:
    """Prefill on {1} then {1,0}; the KV split over decode actors 0 and 1 (room on the
    non-lead for 200 tokens only), every decode step attending across both."""
    prompt, expected = prompt_and_reference
    n = len(prompt)
    chunks = [ChunkSpec(0, 150, (1,)), ChunkSpec(150, n, (1, 0))]
    got = run_plan(ray_session, pool, "split-decode", prompt, chunks, (1, 0), (4096, 200))
    assert got[:len(expected)] == expected


def test_a_rank_without_kv_room_fails_the_whole_group_promptly(ray_session: Any,
                                                              pool: WorkerPool) -> None:
    """Rank 0 of {0,1} has no room for its share: both ranks raise MemoryError (nobody is left
    waiting in a collective), and the group runs the next chunk normally."""
    hog = pool.prefill_kv_tokens - 10
    ray_session.get(pool.prefill[0].allocate.remote("hog", hog))
    chunk = ChunkSpec(0, 100, (0, 1))
    pool.ensure_group(chunk.instances)
    refs = [pool.prefill[r].prefill.remote("too-big", chunk, [1] * 100, None) for r in (0, 1)]
    for ref in refs:
        with pytest.raises(Exception, match="no KV room"):
            ray_session.get(ref, timeout=60)
    ray_session.get([pool.prefill[r].free.remote(rid) for r in (0, 1)
                     for rid in ("hog", "too-big")])
    done = ray_session.get([pool.prefill[r].prefill.remote("after", chunk, [1] * 100, None)
                            for r in (0, 1)], timeout=60)
    assert len(done) == 2
    ray_session.get([pool.prefill[r].free.remote("after") for r in (0, 1)])
    assert ray_session.get([pool.prefill[r].free_tokens.remote() for r in (0, 1)]) == \
        [pool.prefill_kv_tokens] * 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_actors_run_the_three_chunk_plan(ray_session: Any, smollm2_dir: Path,
                                             prompt_and_reference: tuple[list[int],
                                                                         list[int]]) -> None:
    """On CUDA (NCCL data plane, 4 actors sharing one GPU, fp32): the 3-chunk SP 1→2 plan and
    decode over 2 decode actors give HF's greedy tokens."""
    gpu_pool = WorkerPool.start(ray_session, smollm2_dir, 2, 2, prefill_kv_tokens=4096,
                                decode_kv_tokens=4096, device="cuda", gpus_per_instance=0.25)
    try:
        prompt, expected = prompt_and_reference
        chunks = [ChunkSpec(0, 100, (0,)), ChunkSpec(100, 250, (0, 1)),
                  ChunkSpec(250, len(prompt), (0, 1))]
        got = run_plan(ray_session, gpu_pool, "gpu", prompt, chunks, (0, 1), (4096, 200))
        assert got[:len(expected)] == expected
    finally:
        gpu_pool.shutdown(ray_session)
