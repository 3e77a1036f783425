"""Combine attention results computed over disjoint key sets through their logsumexps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def merge(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """outs[i] [T, H, D] and lses[i] [T, H] are attention over key set i (sets disjoint).

    Returns attention over their union: lse = logsumexp_i(lse_i) (float32) and
    out = Σ_i exp(lse_i − lse)·out_i in outs' dtype, accumulated in fp32 (fp64 for fp64 outs).
    Partials with lse -inf contribute nothing; rows where all are -inf get out 0, lse -inf."""
    if not outs or len(outs) != len(lses):
        raise ValueError(f"need as many outs as lses, at least one; got {len(outs)}, {len(lses)}")
    shape, dtype = outs[0].shape, outs[0].dtype
    for out, lse in zip(outs, lses, strict=True):
        if out.shape != shape or out.dtype != dtype or lse.shape != shape[:2]:
            raise ValueError(f"partials must be [T, H, D] of one dtype with lse [T, H]; got "
                             f"{tuple(out.shape)} {out.dtype}, lse {tuple(lse.shape)}")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    stacked = torch.stack([lse.to(acc) for lse in lses])
    total = torch.logsumexp(stacked, dim=0)
    # All partials -inf: shift by 0 so that each weight is exp(-inf) = 0 rather than NaN.
    weights = torch.exp(stacked - torch.where(torch.isneginf(total), 0.0, total))
    merged = torch.zeros(shape, dtype=acc, device=outs[0].device)
    for weight, out in zip(weights, outs, strict=True):
        merged += weight[..., None] * out.to(acc)
    return merged.to(dtype), total.float()
