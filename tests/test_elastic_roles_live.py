"""Elastic roles on live Ray actors of the embedded SmolLM2 (three GPUs, each actor serving
either role): a decode GPU turns to prefill after its decoding request's KV moves to another
GPU, and every output stays HF-exact; a GPU's own prefilled KV reaches its decode role by a
copy inside its cache."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from tests.live import hf_greedy, hf_model
from tetris.runtime.deployment import Deployment, deploy
from tetris.runtime.engine_api import GenerationRequest, RequestSummary
from tetris.runtime.kv_moves import KVMove
from tetris.runtime.ports import free_port
from tetris.runtime.ray_instances import RayInstances
from tetris.runtime.sampling import SamplingParams
from tetris.runtime.serve_config import SERVE_POLICY, ServeConfig
from tetris.solver.plan import ChunkSpec
from tetris.solver.policy.roles import DECODE, PREFILL, RoleDecision, RoleState

pytest.importorskip("transformers")

TEXT = ("Bees visit flowers for nectar and carry pollen from one blossom to the next, so the "
        "plants set seed and fruit. ")


@pytest.fixture(scope="module")
def deployment(ray_session: Any) -> Iterator[Deployment]:
    # 8192 KV tokens per GPU hold SmolLM2's whole context: one decode GPU is the floor, so
    # the three GPUs start as two prefilling and one decoding.
    config = ServeConfig(port=free_port(), prefill_instances=3, decode_instances=3,
                         kv_tokens_per_instance=8192,
                         policy=SERVE_POLICY.model_copy(update={
                             "roles": "threshold", "role_interval_s": 0.1, "quantum_s": 0.4}))
    d = deploy(config)
    yield d
    d.shutdown()


class SwapRoles:
    """Once GPU 2 decodes a request and GPU 1 is free: GPU 1 to decode, GPU 2 to prefill."""

    name = "swap"

    def __init__(self) -> None:
        self.decided_s: float | None = None

    def decide(self, state: RoleState) -> RoleDecision:
        if state.roles == (PREFILL, PREFILL, DECODE) and state.decode_kv[2] and \
                state.prefill_free[1]:
            self.decided_s = state.now_s
            return RoleDecision(to_decode=(1,), to_prefill=(2,))
        return RoleDecision()


async def run_swap(deployment: Deployment, first: list[int], later: list[list[int]],
                   tokens: int) -> tuple[RequestSummary, list[RequestSummary]]:
    engine = deployment.engine
    assert engine.roles is not None
    planner = SwapRoles()
    engine.roles.planner = planner
    await engine.start()
    try:
        a = await engine.submit(GenerationRequest("a", first, SamplingParams(max_tokens=tokens)))
        async for _ in a:
            pass
        assert planner.decided_s is not None, "the roles never swapped"
        assert engine.roles.book.roles == [PREFILL, DECODE, PREFILL]
        streams = [await engine.submit(GenerationRequest(f"b{i}", p, SamplingParams(
            max_tokens=tokens))) for i, p in enumerate(later)]
        for s in streams:
            async for _ in s:
                pass
        return a.summary, [s.summary for s in streams]
    finally:
        await engine.stop()


def test_a_decode_gpu_turns_to_prefill_after_its_kv_moves_and_tokens_match_hf(
        deployment: Deployment) -> None:
    """'a' (greedy, 40 tokens) starts decoding on GPU 2; GPU 1 turns to decode and GPU 2 to
    prefill, so 'a's KV and sampler move to GPU 1 mid-stream; then two 600-token prompts
    prefill on GPUs 0 and 2 and decode on GPU 1. Every output equals HF's, the move is
    counted, and every actor's KV is free after."""
    engine = deployment.engine
    first = engine.encode(TEXT * 4)[:90]
    later = [engine.encode(TEXT * 40)[k:k + 600] for k in (0, 7)]
    hf = hf_model(deployment.model_dir)
    eos = engine.tokenizer.eos_ids
    expected = [hf_greedy(hf, eos, p, 40) for p in (first, *later)]
    a, bs = asyncio.run(run_swap(deployment, first, later, 40))
    assert a.token_ids == expected[0]
    assert a.decode_instances == (1,), "its KV moved off the draining GPU 2"
    assert [b.token_ids for b in bs] == expected[1:]
    assert {g for b in bs for c in b.chunks for g in c.instances} <= {0, 2}
    assert any(2 in c.instances for b in bs for c in b.chunks), "GPU 2 prefills"
    assert all(b.decode_instances == (1,) for b in bs)
    body = engine.metrics.render()[0].decode()
    assert "tetris:kv_migrations_total 1.0" in body
    assert 'tetris:role_changes_total{role="to_prefill"} 1.0' in body
    assert 'tetris:gpus_by_role{role="prefill"} 2.0' in body
    ray, pool = deployment.ray, deployment.pool
    assert ray.get([w.free_tokens.remote() for w in pool.all], timeout=60) == [8192] * 3


def test_a_gpus_own_prefilled_kv_reaches_its_decode_role_by_a_local_copy(
        deployment: Deployment) -> None:
    """Prefilled on GPUs 0 and 1 (SP 2), decoded on GPU 0 and 1's decode roles: each GPU
    keeps its own share (two local copies, no transfer), the KV of both roles lives under
    separate keys while it is copied, and the greedy tokens equal HF's."""
    ray, pool = deployment.ray, deployment.pool
    instances = RayInstances(ray, pool)
    prompt = deployment.engine.encode(TEXT * 4)[:80]
    expected = hf_greedy(hf_model(deployment.model_dir), deployment.engine.tokenizer.eos_ids,
                         prompt, 6)
    p = pool.num_prefill
    instances.ensure_group((0, 1))
    instances.ensure_group((p, p + 1))

    async def run() -> list[int]:
        chunk = ChunkSpec(0, len(prompt), (0, 1))
        results = await instances.prefill("local", chunk, prompt, SamplingParams(max_tokens=6))
        first = next(r for r in results if not isinstance(r, BaseException)
                     and r.first_token is not None)
        held = {g: chunk.tokens_on(g) for g in (0, 1)}
        moves = [KVMove(g, p + g, n) for g, n in held.items()]
        lead_room = held[0] + 6
        errors = await instances.move_kv("local", moves, (p, p + 1), (lead_room, held[1]),
                                         SamplingParams(max_tokens=6), first.sampler_state)
        assert not errors, errors
        out = [first.first_token]
        from tetris.runtime.batch_attend import DecodeEntry

        while len(out) < 6:
            entry = DecodeEntry("local", out[-1], len(prompt) + len(out) - 1, p, (p, p + 1))
            step = await instances.decode_step({p: [entry], p + 1: [entry]})
            assert not step.failed, step.failed
            out.append(step.tokens["local"])
        instances.free("local", [p, p + 1])
        return out

    out = asyncio.run(run())
    assert out[:len(expected)] == expected
    assert ray.get([w.free_tokens.remote() for w in pool.all], timeout=60) == [8192] * 3
