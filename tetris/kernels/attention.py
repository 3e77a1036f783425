"""`attention`: the one dispatch point for causal-by-position attention returning (out, lse).

Backends (`available_backends`, forced with `backend=`):
- "flash_attn": CUDA, fp16/bf16, the `flash_attn` package if importable (never required).
- "sdpa_cuda": CUDA, fp16/bf16/fp32, PyTorch's fused flash / memory-efficient kernels.
- "cpu_flash": CPU, fp32/bf16/fp16, `aten._scaled_dot_product_flash_attention_for_cpu`.
- "online": any device and dtype, exact blockwise online softmax in fp32 (fp64 for fp64 inputs).
`attention_backend` names the one picked when none is forced: the fused kernel of the device if
the dtype suits it, otherwise "online".

Fused kernels take only two mask shapes: none, and causal. Positions are therefore reduced to
those shapes first (`plan_segments`): with keys and queries sorted by position, query i sees
exactly the first c_i keys, c non-decreasing. A run of queries with equal c is a full (unmasked)
call over c keys; a run where c grows by one per query is a bottom-right causal call, which is
what a prefill chunk is (its prefix and itself). Short runs, as from scattered positions, are
batched under an explicit mask (CPU) or computed by "online" (CUDA).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from tetris.kernels.merge import merge

BACKENDS = ("flash_attn", "sdpa_cuda", "cpu_flash", "online")
SegmentKind = Literal["full", "causal", "masked"]
# Kernel(q [n, H, D], k [m, Hkv, D], v, scale, causal, additive mask [n, m] | None) -> (out, lse);
# n, m >= 1 and every row sees at least one key; causal is bottom-right aligned.
Kernel = Callable[[Tensor, Tensor, Tensor, float, bool, Tensor | None], tuple[Tensor, Tensor]]

# A fused call costs 10-20 µs before any work (measured on CPU); runs shorter than this are
# batched under one mask rather than called one by one.
MIN_RUN = 16
# Bounds the [rows, keys] additive mask of one masked call.
MAX_MASKED_ROWS = 512
# Scores held at once by "online": [H, Tq, block] elements.
ONLINE_SCORE_BUDGET = 1 << 22

_HALF = (torch.float16, torch.bfloat16)
# Looked up at call time so tests can wrap it (it must never see an empty KV: SIGFPE).
_cpu_flash_op: Any = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def attention(q: Tensor, k: Tensor, v: Tensor, *, q_positions: Tensor, k_positions: Tensor,
              scale: float | None = None, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """q [Tq, H, D], k and v [Tk, Hkv, D] with H a multiple of Hkv (GQA: query head h uses kv
    head h // (H // Hkv)); q_positions [Tq], k_positions [Tk] (int64 token positions in the
    prompt; keys need NOT be contiguous or sorted — an SP rank holds an arbitrary subset).
    Key j is visible to query i iff k_positions[j] <= q_positions[i]. scale defaults to D**-0.5.
    Returns (out [Tq, H, D] in q's dtype, lse [Tq, H] float32, natural-log logsumexp of the
    scaled scores over the visible keys).
    A query row with no visible key (or Tk == 0): out row 0, lse -inf. Tq == 0: empty results.
    `backend` forces one of `available_backends(q.device, q.dtype)`; None picks
    `attention_backend(q)`."""
    check_inputs(q, k, v, q_positions, k_positions)
    names = available_backends(q.device, q.dtype, q.shape[-1])
    name = names[0] if backend is None else backend
    if name not in names:
        raise ValueError(f"attention backend {name!r} is not available for {q.dtype}, head dim "
                         f"{q.shape[-1]} on {q.device} (available: {names})")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out = q.new_zeros(q.shape)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    if q.shape[0] == 0 or k.shape[0] == 0:
        return out, lse
    if name == "online":
        return _online(q, k, v, q_positions, k_positions, scale)
    return _fused(q, k, v, q_positions, k_positions, scale, name)


def check_inputs(q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor,
                 k_positions: Tensor) -> None:
    """Raise ValueError unless the arguments fit `attention`'s contract."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q must be [Tq, H, D] and k [Tk, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v {tuple(v.shape)} must have k's shape {tuple(k.shape)}")
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"query heads {heads} must be a multiple of kv heads {kv_heads}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"head dims differ: q {q.shape[2]}, k {k.shape[2]}")
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v need one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, pos, n in (("q_positions", q_positions, q.shape[0]),
                         ("k_positions", k_positions, k.shape[0])):
        if pos.dtype != torch.int64 or pos.shape != (n,):
            raise ValueError(f"{name} must be int64 of shape ({n},); got {pos.dtype} "
                             f"{tuple(pos.shape)}")
    devices = {t.device for t in (q, k, v, q_positions, k_positions)}
    if len(devices) != 1:
        raise ValueError(f"q, k, v and positions must share a device; got {devices}")


def available_backends(device: torch.device, dtype: torch.dtype,
                       head_dim: int | None = None) -> tuple[str, ...]:
    """The backends that can run inputs of `dtype` (and `head_dim`, if given) on `device`,
    preferred first."""
    names: list[str] = []
    # The CUDA kernels take head dims up to 256 in multiples of 8.
    cuda_dim = head_dim is None or (head_dim % 8 == 0 and head_dim <= 256)
    if device.type == "cuda" and cuda_dim:
        if dtype in _HALF and _flash_attn_func() is not None:
            names.append("flash_attn")
        if dtype in (*_HALF, torch.float32):
            names.append("sdpa_cuda")
    elif device.type == "cpu" and dtype in (*_HALF, torch.float32):
        names.append("cpu_flash")
    names.append("online")
    return tuple(names)


def attention_backend(q: Tensor) -> str:
    """The backend `attention` uses for queries like `q` when none is forced."""
    return available_backends(q.device, q.dtype, q.shape[-1])[0]


@dataclass(frozen=True)
class Segment:
    """Sorted query rows [start, stop) attend to the first num_keys sorted keys as `kind`."""

    start: int
    stop: int
    kind: SegmentKind
    num_keys: int


def plan_segments(counts: Sequence[int]) -> list[Segment]:
    """Cover the rows of a non-decreasing visible-key count sequence with kernel calls.

    Rows seeing no key are left out (their result is out 0, lse -inf)."""
    runs: list[Segment] = []
    n, r = len(counts), 0
    while r < n and counts[r] == 0:
        r += 1
    while r < n:
        start = r
        step = counts[r + 1] - counts[r] if r + 1 < n else -1
        if step in (0, 1):
            while r + 1 < n and counts[r + 1] - counts[r] == step:
                r += 1
        r += 1
        if step == 1 and r - start > 1:
            runs.append(Segment(start, r, "causal", counts[r - 1]))
        else:
            runs.append(Segment(start, r, "full", counts[start]))
    segments: list[Segment] = []
    i = 0
    while i < len(runs):
        first = last = runs[i]
        i += 1
        if first.stop - first.start < MIN_RUN:
            while (i < len(runs) and runs[i].stop - runs[i].start < MIN_RUN
                   and runs[i].stop - first.start <= MAX_MASKED_ROWS):
                last = runs[i]
                i += 1
        if last is first:
            segments.append(first)
        else:
            segments.append(Segment(first.start, last.stop, "masked", counts[last.stop - 1]))
    return segments


def _fused(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float,
           name: str) -> tuple[Tensor, Tensor]:
    kernel: Kernel = {"flash_attn": _flash_attn_kernel, "sdpa_cuda": _sdpa_cuda_kernel,
                      "cpu_flash": _cpu_flash_kernel}[name]
    if int(k_pos.max()) <= int(q_pos.min()):
        # Everything visible (decode, or queries after all held keys): skip the sorting copies.
        return kernel(q, k, v, scale, False, None)
    if bool((k_pos[1:] < k_pos[:-1]).any()):
        order = torch.argsort(k_pos, stable=True)
        k, v, k_pos = k[order], v[order], k_pos[order]
    q_order: Tensor | None = None
    if bool((q_pos[1:] < q_pos[:-1]).any()):
        q_order = torch.argsort(q_pos, stable=True)
        q, q_pos = q[q_order], q_pos[q_order]
    counts = torch.searchsorted(k_pos, q_pos, right=True)
    out = q.new_zeros(q.shape)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for seg in plan_segments(counts.tolist()):
        rows = slice(seg.start, seg.stop)
        keys = slice(0, seg.num_keys)
        if seg.kind != "masked":
            part = kernel(q[rows], k[keys], v[keys], scale, seg.kind == "causal", None)
        elif name == "cpu_flash":
            visible = k_pos[keys][None, :] <= q_pos[rows][:, None]
            mask = torch.zeros(visible.shape, dtype=q.dtype).masked_fill_(~visible, -torch.inf)
            part = kernel(q[rows], k[keys], v[keys], scale, False, mask)
        else:
            part = _online(q[rows], k[keys], v[keys], q_pos[rows], k_pos[keys], scale)
        out[rows], lse[rows] = part
    if q_order is not None:
        out = torch.empty_like(out).index_copy_(0, q_order, out)
        lse = torch.empty_like(lse).index_copy_(0, q_order, lse)
    return out, lse


def _split_causal(kernel: Kernel, q: Tensor, k: Tensor, v: Tensor,
                  scale: float) -> tuple[Tensor, Tensor]:
    """Bottom-right causal from kernels whose own causal mask is top-left aligned: the keys
    before the diagonal block are seen by every row, the square block is causal either way."""
    n, m = q.shape[0], k.shape[0]
    if m < n:
        raise ValueError(f"bottom-right causal needs Tk >= Tq; got {m} < {n}")
    square = kernel(q, k[m - n:], v[m - n:], scale, True, None)
    if m == n:
        return square
    prefix = kernel(q, k[: m - n], v[: m - n], scale, False, None)
    return merge([prefix[0], square[0]], [prefix[1], square[1]])


def _cpu_flash_kernel(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
                      mask: Tensor | None) -> tuple[Tensor, Tensor]:
    n, m = q.shape[0], k.shape[0]
    if causal and m != n:
        return _split_causal(_cpu_flash_kernel, q, k, v, scale)
    if n == 0 or m == 0:
        raise ValueError("the CPU flash kernel crashes the process on empty inputs")
    # Views in [1, H, T, D]; the op takes strided inputs and GQA (head h uses h // (H // Hkv)).
    out, lse = _cpu_flash_op(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                             v.transpose(0, 1)[None], 0.0, causal, attn_mask=mask, scale=scale)
    lse = lse[0].transpose(0, 1).float()
    if mask is not None:
        # A fully masked row comes back with lse 0, not -inf.
        lse = lse.masked_fill(torch.isneginf(mask).all(dim=1)[:, None], -torch.inf)
    return out[0].transpose(0, 1), lse


def _sdpa_cuda_kernel(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
                      mask: Tensor | None) -> tuple[Tensor, Tensor]:
    n, m = q.shape[0], k.shape[0]
    if mask is not None:
        raise ValueError("sdpa_cuda takes no mask")
    if causal and m != n:
        return _split_causal(_sdpa_cuda_kernel, q, k, v, scale)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))
    if q.dtype in _HALF:
        res = torch.ops.aten._scaled_dot_product_flash_attention(q4, k4, v4, 0.0, causal,
                                                                 False, scale=scale)
    else:
        res = torch.ops.aten._scaled_dot_product_efficient_attention(q4, k4, v4, None, True,
                                                                     0.0, causal, scale=scale)
    out, lse = res[0], res[1]
    # The efficient kernel pads lse's query dim to a multiple of 32.
    return out[0].transpose(0, 1), lse[0, :, :n].transpose(0, 1).float()


def _flash_attn_kernel(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
                       mask: Tensor | None) -> tuple[Tensor, Tensor]:
    if mask is not None:
        raise ValueError("flash_attn takes no mask")
    func = _flash_attn_func()
    assert func is not None
    # flash-attn's causal mask is bottom-right aligned, as needed; it takes GQA as is.
    out, lse, _ = func(q[None], k[None], v[None], dropout_p=0.0, softmax_scale=scale,
                       causal=causal, return_attn_probs=True)
    lse = lse[0].transpose(0, 1).float()
    return out[0], lse.masked_fill(torch.isposinf(lse), -torch.inf)


@functools.cache
def _flash_attn_func() -> Any:
    try:
        from flash_attn import flash_attn_func
    except (ImportError, OSError):
        return None
    return flash_attn_func


def _online(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
            scale: float) -> tuple[Tensor, Tensor]:
    """Exact attention with any mask: online softmax over key blocks in fp32 (fp64 for fp64)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n, heads, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    # [Hkv, G, Tq, D] against [Hkv, 1, D, block]: GQA by broadcasting, without copying K/V.
    qs = (q.to(acc) * scale).reshape(n, kv_heads, group, dim).permute(1, 2, 0, 3)
    m = torch.full((kv_heads, group, n), -torch.inf, dtype=acc, device=q.device)
    total = torch.zeros_like(m)
    o = torch.zeros((kv_heads, group, n, dim), dtype=acc, device=q.device)
    block = max(64, ONLINE_SCORE_BUDGET // max(1, heads * n))
    for s in range(0, k.shape[0], block):
        kb = k[s:s + block].to(acc).permute(1, 2, 0)[:, None]
        vb = v[s:s + block].to(acc).permute(1, 0, 2)[:, None]
        scores = torch.matmul(qs, kb)
        hidden = k_pos[s:s + block][None, :] > q_pos[:, None]
        scores.masked_fill_(hidden, -torch.inf)
        m_new = torch.maximum(m, scores.amax(dim=-1))
        # A row with nothing visible yet keeps max -inf; shift by 0 there to avoid inf - inf.
        base = torch.where(torch.isneginf(m_new), 0.0, m_new)
        p = torch.exp(scores - base[..., None])
        correction = torch.exp(m - base)
        total = total * correction + p.sum(dim=-1)
        o = o * correction[..., None] + torch.matmul(p, vb)
        m = m_new
    seen = total > 0
    out = torch.where(seen[..., None], o / torch.where(seen, total, 1.0)[..., None], 0.0)
    lse = torch.where(seen, m + torch.log(torch.where(seen, total, 1.0)), -torch.inf)
    return (out.permute(2, 0, 1, 3).reshape(n, heads, dim).to(q.dtype),
            lse.permute(2, 0, 1).reshape(n, heads).float())
