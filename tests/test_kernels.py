"""`attention` (every backend) and `merge` against float64 attention from an explicit mask."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tetris.kernels import attention, attention_backend, available_backends, merge
from tetris.kernels.attention import Segment, plan_segments

# The package re-exports the function `attention`, which shadows the module as an attribute.
attention_module = importlib.import_module("tetris.kernels.attention")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

CPU_BACKENDS = available_backends(torch.device("cpu"), torch.float32)
HEADS = [(1, 1), (4, 4), (6, 2), (9, 3)]
TOL = 1e-5
# Hypothesis draws a fresh torch seed per example: new data each run, yet replayable on failure.
SEEDS = st.integers(0, 2**32 - 1)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
              k_pos: torch.Tensor, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 softmax over a mask built from positions; GQA by repeating kv heads."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    keys = k.double().cpu().repeat_interleave(group, 1)
    values = v.double().cpu().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double().cpu(), keys) * scale
    scores = scores.masked_fill(k_pos.cpu()[None, None, :] > q_pos.cpu()[None, :, None],
                                -torch.inf)
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])
    return torch.einsum("hqk,khd->qhd", probs, values), lse.T


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got - want| / max|want| over the entries where want is finite."""
    finite = torch.isfinite(want)
    if not finite.any():
        return 0.0
    diff = (got.double().cpu() - want)[finite].abs().max()
    return float(diff / want[finite].abs().max().clamp_min(1e-30))


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
          k_pos: torch.Tensor, backend: str | None, tol: float = TOL,
          scale: float | None = None, lse_tol: float | None = None) -> None:
    out, lse = attention(q, k, v, q_positions=q_pos, k_positions=k_pos, backend=backend,
                         scale=scale)
    want_out, want_lse = reference(q, k, v, q_pos, k_pos, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:2] and lse.dtype == torch.float32
    empty = torch.isneginf(want_lse)
    assert torch.equal(torch.isneginf(lse).cpu(), empty), "rows without visible keys differ"
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out.cpu()[empty] == 0).all()
    assert rel_error(out, want_out) < tol
    assert rel_error(lse, want_lse) < (tol if lse_tol is None else lse_tol)


def positions(draw_int: Callable[[int, int], int], mode: str,
              num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key positions for one layout of a request's tokens."""
    if mode == "prefix":  # a prefill chunk: queries p..p+Tq, keys 0..p+Tq
        p = draw_int(0, 70)
        return torch.arange(p, p + num_queries), torch.arange(p + num_queries)
    if mode == "scattered":  # an SP rank's arbitrary, unsorted subset of keys
        num_keys = draw_int(0, 90)
        return torch.randint(0, 120, (num_queries,)), torch.randperm(120)[:num_keys]
    if mode == "sorted_subset":  # pass_q: a whole chunk over one rank's (sorted) share
        keys = torch.randperm(120)[:60].sort().values
        return torch.arange(40, 40 + num_queries), keys
    # decode: one token after every key
    num_keys = draw_int(1, 90)
    return torch.full((min(num_queries, 1),), num_keys), torch.randperm(num_keys)


def drawer(data: st.DataObject) -> Callable[[int, int], int]:
    return lambda lo, hi: data.draw(st.integers(lo, hi))


def torch_int(lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi + 1, ()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=60, deadline=None)
@given(data=st.data(), heads=st.sampled_from(HEADS), dim=st.sampled_from([8, 16, 64]),
       num_queries=st.integers(0, 70),
       mode=st.sampled_from(["prefix", "scattered", "sorted_subset", "decode"]), seed=SEEDS)
def test_cpu_backends_match_float64_reference(backend: str, data: st.DataObject,
                                              heads: tuple[int, int], dim: int,
                                              num_queries: int, mode: str, seed: int) -> None:
    """Each CPU backend equals float64 attention on chunk, scattered, subset and decode layouts."""
    torch.manual_seed(seed)
    q_pos, k_pos = positions(drawer(data), mode, num_queries)
    q = torch.randn(len(q_pos), heads[0], dim)
    k, v = torch.randn(2, len(k_pos), heads[1], dim)
    check(q, k, v, q_pos, k_pos, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (9, 3)])
def test_gqa_query_head_uses_kv_head_h_over_group(backend: str, heads: int,
                                                  kv_heads: int) -> None:
    """GQA: query head h attends with kv head h // (H // Hkv), on a long prefilled chunk."""
    q_pos, k_pos = torch.arange(100, 164), torch.arange(164)
    q = torch.randn(64, heads, 32)
    k, v = torch.randn(2, 164, kv_heads, 32)
    check(q, k, v, q_pos, k_pos, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_custom_scale(backend: str) -> None:
    """An explicit scale replaces D**-0.5."""
    q, k, v = torch.randn(3, 40, 4, 16)
    check(q, k, v, torch.arange(40), torch.arange(40), backend, scale=0.3)


def test_float64_inputs_use_online_backend_exactly() -> None:
    """Float64 inputs go to the exact fallback: out to fp64 precision (lse is fp32 by contract)."""
    q, k, v = torch.randn(3, 50, 6, 16, dtype=torch.float64)
    assert attention_backend(q) == "online"
    check(q, k, v, torch.arange(50), torch.randperm(50), None, tol=1e-12, lse_tol=1e-6)


def test_bfloat16_cpu_flash() -> None:
    """bf16 inputs run on the fused CPU kernel, out in bf16, lse in fp32."""
    q = torch.randn(80, 6, 32).bfloat16()
    k, v = torch.randn(2, 120, 3, 32).bfloat16()
    assert attention_backend(q) == "cpu_flash"
    check(q, k, v, torch.arange(40, 120), torch.arange(120), None, tol=2e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_kv_gives_zero_out_and_minus_inf_lse(backend: str) -> None:
    """Tk == 0: every row is out 0, lse -inf."""
    q = torch.randn(5, 4, 8)
    out, lse = attention(q, torch.empty(0, 2, 8), torch.empty(0, 2, 8),
                         q_positions=torch.arange(5), k_positions=torch.empty(0, dtype=torch.int64),
                         backend=backend)
    assert (out == 0).all() and torch.isneginf(lse).all() and lse.shape == (5, 4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_queries_gives_empty_results(backend: str) -> None:
    """Tq == 0: empty out [0, H, D] and lse [0, H]."""
    k, v = torch.randn(2, 7, 2, 8)
    out, lse = attention(torch.empty(0, 4, 8), k, v, q_positions=torch.empty(0, dtype=torch.int64),
                         k_positions=torch.arange(7), backend=backend)
    assert out.shape == (0, 4, 8) and lse.shape == (0, 4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rows_without_visible_keys_get_zero_out_and_minus_inf_lse(backend: str) -> None:
    """Queries before every key (in fused calls and masked batches alike) are out 0, lse -inf."""
    k_pos = torch.tensor([50, 10, 30, 70])
    q_pos = torch.tensor([5, 60, 0, 9, 31, 10])
    q = torch.randn(6, 4, 8)
    k, v = torch.randn(2, 4, 2, 8)
    check(q, k, v, q_pos, k_pos, backend)
    out, lse = attention(q, k, v, q_positions=q_pos, k_positions=k_pos, backend=backend)
    assert torch.isneginf(lse[[0, 2, 3]]).all() and (out[[0, 2, 3]] == 0).all()


def test_cpu_op_causal_is_top_left_aligned() -> None:
    """Trap: the CPU op's is_causal lets query i see keys 0..i even when Tk > Tq."""
    q, k, v = torch.randn(3, 1, 2, 4, 8)
    q = q[:, :, :2]
    out, _ = attention_module._cpu_flash_op(q, k, v, 0.0, True)
    top_left = torch.softmax((q @ k.transpose(-1, -2)) * 8 ** -0.5
                             + torch.full((2, 4), -torch.inf).triu(1), -1) @ v
    torch.testing.assert_close(out, top_left)


def test_prefix_chunk_is_bottom_right_causal() -> None:
    """A chunk after a prefix sees the whole prefix: the top-left op is split into full + causal."""
    calls: list[tuple[int, int, bool]] = []
    op = attention_module._cpu_flash_op

    def spy(q: torch.Tensor, k: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append((q.shape[2], k.shape[2], args[2]))
        return op(q, k, *args, **kwargs)

    q, k, v = torch.randn(3, 96, 4, 16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_module, "_cpu_flash_op", spy)
        check(q[:32], k, v, torch.arange(64, 96), torch.arange(96), "cpu_flash")
    # The 32×32 diagonal block is causal (where alignment does not matter), the prefix is full.
    assert sorted(calls) == [(32, 32, True), (32, 64, False)]


def test_cpu_op_masked_row_lse_is_zero() -> None:
    """Trap: the CPU op returns lse 0 (not -inf) for a row whose mask hides every key."""
    q, k, v = torch.randn(3, 1, 1, 3, 8)
    mask = torch.zeros(3, 3)
    mask[1] = -torch.inf
    _, lse = attention_module._cpu_flash_op(q, k, v, 0.0, False, attn_mask=mask)
    assert lse[0, 0, 1] == 0


def test_masked_rows_lse_converted_to_minus_inf() -> None:
    """The CPU kernel wrapper turns the op's lse 0 for fully masked rows into -inf."""
    q, k, v = torch.randn(3, 3, 2, 8)
    mask = torch.zeros(3, 3)
    mask[1] = -torch.inf
    out, lse = attention_module._cpu_flash_kernel(q, k, v, 8 ** -0.5, False, mask)
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all() and torch.isfinite(lse[0]).all()


@settings(max_examples=40, deadline=None)
@given(data=st.data(), num_queries=st.integers(0, 40),
       mode=st.sampled_from(["prefix", "scattered", "sorted_subset", "decode"]), seed=SEEDS)
def test_cpu_op_never_sees_empty_kv(data: st.DataObject, num_queries: int, mode: str,
                                    seed: int) -> None:
    """Trap: the CPU op dies with SIGFPE on a zero-length KV; it is never called with one."""
    torch.manual_seed(seed)
    op = attention_module._cpu_flash_op

    def guarded(q: torch.Tensor, k: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if k.shape[2] == 0 or q.shape[2] == 0:
            raise AssertionError(f"CPU op called with Tq={q.shape[2]}, Tk={k.shape[2]}")
        return op(q, k, *args, **kwargs)

    q_pos, k_pos = positions(drawer(data), mode, num_queries)
    q = torch.randn(len(q_pos), 4, 8)
    k, v = torch.randn(2, len(k_pos), 2, 8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_module, "_cpu_flash_op", guarded)
        check(q, k, v, q_pos, k_pos, "cpu_flash")
        check(q, k[:0], v[:0], q_pos, k_pos[:0], "cpu_flash")


@pytest.mark.parametrize("min_run", [1, 10_000])
def test_segment_calls_and_masked_batches_agree(min_run: int) -> None:
    """Scattered positions give the same result as one-call-per-run and as masked batches."""
    q_pos, k_pos = torch.randint(0, 300, (200,)), torch.randperm(300)[:150]
    q = torch.randn(200, 6, 16)
    k, v = torch.randn(2, 150, 2, 16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_module, "MIN_RUN", min_run)
        check(q, k, v, q_pos, k_pos, "cpu_flash")


def test_plan_segments_shapes() -> None:
    """Chunk → one causal call; decode → one full call; zigzag share → alternating calls."""
    assert plan_segments([0, 0, *range(5, 25)]) == [Segment(2, 22, "causal", 24)]
    assert plan_segments([7]) == [Segment(0, 1, "full", 7)]
    share = [*range(1, 21), *[20] * 20, *range(21, 41)]
    assert [s.kind for s in plan_segments(share)] == ["causal", "full", "causal"]
    assert plan_segments([1, 3, 5, 8]) == [Segment(0, 4, "masked", 8)]


def test_bad_inputs_raise_clear_errors() -> None:
    """Shape, dtype, GQA and backend mistakes are ValueErrors naming the problem."""
    q, k = torch.randn(4, 6, 8), torch.randn(5, 4, 8)
    pos_q, pos_k = torch.arange(4), torch.arange(5)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention(q, k, k, q_positions=pos_q, k_positions=pos_k)
    with pytest.raises(ValueError, match="int64"):
        attention(q, k[:, :2], k[:, :2], q_positions=pos_q.int(), k_positions=pos_k)
    with pytest.raises(ValueError, match="one floating dtype"):
        attention(q, k[:, :2].double(), k[:, :2], q_positions=pos_q, k_positions=pos_k)
    with pytest.raises(ValueError, match="not available"):
        attention(q, k[:, :2], k[:, :2], q_positions=pos_q, k_positions=pos_k, backend="sdpa_cuda")


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 5])
def test_merge_of_shards_equals_full_attention(num_shards: int) -> None:
    """Attention over N disjoint random key shards (some empty), merged, equals full attention."""
    q_pos, k_pos = torch.arange(30, 70), torch.randperm(70)
    q = torch.randn(40, 6, 16)
    k, v = torch.randn(2, 70, 2, 16)
    owner = torch.randint(0, num_shards, (70,))
    shards = [owner == shard for shard in range(num_shards)] + [torch.zeros(70, dtype=torch.bool)]
    outs, lses = zip(*(attention(q, k[keys], v[keys], q_positions=q_pos, k_positions=k_pos[keys])
                       for keys in shards), strict=True)
    out, lse = merge(outs, lses)
    want_out, want_lse = reference(q, k, v, q_pos, k_pos)
    assert rel_error(out, want_out) < TOL and rel_error(lse, want_lse) < TOL


def test_merge_all_minus_inf_rows_are_zero_without_nan() -> None:
    """Rows where every partial is -inf merge to out 0, lse -inf, with no NaN; dtype is kept."""
    outs = [torch.randn(3, 2, 4).bfloat16() for _ in range(3)]
    lses = [torch.randn(3, 2) for _ in range(3)]
    for lse in lses:
        lse[1] = -torch.inf
    lses[0][2] = -torch.inf
    out, lse = merge(outs, lses)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    assert not out.isnan().any() and torch.isfinite(lse[[0, 2]]).all()
    torch.testing.assert_close(lse[2], torch.logaddexp(lses[1][2], lses[2][2]))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["prefix", "scattered", "sorted_subset", "decode"])
def test_cuda_backends_match_float64_reference(dtype: torch.dtype, mode: str) -> None:
    """Each CUDA backend equals float64 attention (fp32 to 1e-5, half types to 2e-2)."""
    tol = TOL if dtype == torch.float32 else 2e-2
    for backend in available_backends(torch.device("cuda"), dtype):
        for num_queries in (0, 1, 37, 64):
            q_pos, k_pos = positions(torch_int, mode, num_queries)
            q = torch.randn(len(q_pos), 6, 64, dtype=dtype, device="cuda")
            k, v = torch.randn(2, len(k_pos), 2, 64, dtype=dtype, device="cuda")
            check(q, k, v, q_pos.cuda(), k_pos.cuda(), backend, tol)
