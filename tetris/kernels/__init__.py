"""Attention returning (out, lse), LSE merging, and attention over an SP group.

`attention` is the one dispatch point (fused CPU / CUDA kernels, flash-attn when installed, an
exact online-softmax fallback), causal by explicit token positions; `merge` combines partials
over disjoint key sets; `group_attention` runs attention over the KV spread across an SP group.
"""

from tetris.kernels.attention import attention, attention_backend, available_backends
from tetris.kernels.group import choose_strategy, group_attention
from tetris.kernels.merge import merge

__all__ = [
    "attention",
    "attention_backend",
    "available_backends",
    "choose_strategy",
    "group_attention",
    "merge",
]
