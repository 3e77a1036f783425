"""A Llama-family decoder with explicit positions and pluggable attention.

`LlamaModel.forward(token_ids, positions, attend)` runs one request's tokens (no batch dimension):
a prefill chunk passes `positions = arange(start, end)`, a decode step one position. The model
applies RoPE to q and k from those positions and hands them to `attend`, which owns KV storage
and the attention itself: a local KV cache (`kv_cache.LocalAttend`) or attention over an SP group.
The model knows nothing of ranks or caches, so sequence parallelism is a different `attend`.

Module names mirror HF's (`layers.{i}.self_attn.q_proj`, ...) without the `model.` prefix, so
weight loading is a rename; numerics follow HF's (RMSNorm and RoPE in float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tetris.models.config import LlamaConfig

# (layer_index, q [T, H, D], k [T, Hkv, D], v [T, Hkv, D], positions [T]) -> out [T, H, D].
# q and k arrive with RoPE applied, so whatever `attend` stores is ready for later queries.
Attend = Callable[[int, Tensor, Tensor, Tensor, Tensor], Tensor]


def rope_inv_freq(config: LlamaConfig) -> Tensor:
    """Inverse frequencies [D/2] in float32, with the config's scaling, computed as HF does."""
    d = config.head_dim
    exponents = torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3 (Llama 3.1): long wavelengths slowed by `factor`, short ones kept, a ramp between.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [T, H, D]; cos, sin: [T, D] in x's dtype. HF's rotate-half layout (not interleaved pairs).
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalised in float32 and cast back before the weight, as HF does, so bf16 matches too.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_index: int) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
        bias = config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)

    def forward(
        self, x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, attend: Attend
    ) -> Tensor:
        # x: [T, hidden]; positions: [T]; cos, sin: [T, D]
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(self.layer_index, q, k, v, positions)
        assert out.shape == q.shape, f"attend returned {tuple(out.shape)}, want {tuple(q.shape)}"
        projected: Tensor = self.o_proj(out.reshape(t, self.num_heads * self.head_dim))
        return projected


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        h, m = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, m, bias=False)
        self.up_proj = nn.Linear(h, m, bias=False)
        self.down_proj = nn.Linear(m, h, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_index: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_index)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, attend: Attend
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, cos, sin, attend)
        out: Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return out


class LlamaModel(nn.Module):
    inv_freq: Tensor  # [D/2] float32, a non-persistent buffer

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Tied: the embedding matrix doubles as the output projection (no lm_head parameter).
        self.lm_head = (
            None if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        # Not a checkpoint weight; built on CPU explicitly so that a model created under
        # `torch.device("meta")` (the loader's fast path) still has a real table.
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # positions: [T] int64 -> cos, sin: [T, D]. Angles in float32 whatever the model dtype:
        # bf16 positions past 256 would already be rounded.
        inv_freq = self.inv_freq
        freqs = positions.to(inv_freq.device, torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, token_ids: Tensor, positions: Tensor, attend: Attend) -> Tensor:
        """token_ids, positions: [T] -> hidden [T, hidden] after the final norm (T may be 0)."""
        assert token_ids.dim() == 1 and positions.shape == token_ids.shape, (
            f"token_ids {tuple(token_ids.shape)} and positions {tuple(positions.shape)} "
            "must both be [T]"
        )
        x = self.embed_tokens(token_ids)  # [T, hidden]
        cos, sin = self.rope(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, positions, cos, sin, attend)
        out: Tensor = self.norm(x)
        return out

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [T, hidden] -> logits [T, vocab] in float32."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()
