"""Shapes of Llama-family decoders, enough to count FLOPs and bytes for the cost model.

Preset shapes come from each model's published HF `config.json`:
- llama3-8b: meta-llama/Llama-3.1-8B (GQA 32/8, 128k context).
- lwm-7b-1m: LargeWorldModel/LWM-Text-1M (Llama-2-7B shape, MHA, 1M context).
- qwen2.5-7b-1m: Qwen/Qwen2.5-7B-Instruct-1M (GQA 28/4, 1,010,000 context).
- smollm2-135m: HuggingFaceTB/SmolLM2-135M-Instruct (GQA 9/3, tied embeddings).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Pure Python (json and dataclasses): the one parser of HF config.json.
from tetris.models.config import LlamaConfig, read_config


class ModelSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    max_context: int = Field(gt=0)
    tie_embeddings: bool = False
    dtype_bytes: int = Field(default=2, gt=0)

    @model_validator(mode="after")
    def _gqa_divides(self) -> ModelSpec:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        return self

    @property
    def linear_params_per_layer(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2  # q, o + k, v
        mlp = 3 * h * self.intermediate_size  # SwiGLU: gate, up, down
        return attn + mlp

    @property
    def linear_params(self) -> int:
        return self.num_layers * self.linear_params_per_layer

    @property
    def weight_bytes(self) -> int:
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        return (self.linear_params + embeddings) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


MODEL_PRESETS: dict[str, ModelSpec] = {
    "llama3-8b": ModelSpec(
        name="llama3-8b", num_layers=32, hidden_size=4096, intermediate_size=14336,
        num_heads=32, num_kv_heads=8, head_dim=128, vocab_size=128256, max_context=131072,
    ),
    "lwm-7b-1m": ModelSpec(
        name="lwm-7b-1m", num_layers=32, hidden_size=4096, intermediate_size=11008,
        num_heads=32, num_kv_heads=32, head_dim=128, vocab_size=32000, max_context=1048576,
    ),
    "qwen2.5-7b-1m": ModelSpec(
        name="qwen2.5-7b-1m", num_layers=28, hidden_size=3584, intermediate_size=18944,
        num_heads=28, num_kv_heads=4, head_dim=128, vocab_size=152064, max_context=1010000,
    ),
    "smollm2-135m": ModelSpec(
        name="smollm2-135m", num_layers=30, hidden_size=576, intermediate_size=1536,
        num_heads=9, num_kv_heads=3, head_dim=64, vocab_size=49152, max_context=8192,
        tie_embeddings=True,
    ),
}


def model_spec_of(config: LlamaConfig) -> ModelSpec:
    """The cost model's view of a parsed checkpoint config (`tetris.models.config` parses and
    validates config.json, once, for both the model and the planners)."""
    return ModelSpec(
        name=config.name or config.model_type, num_layers=config.num_layers,
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
        vocab_size=config.vocab_size, max_context=config.max_position_embeddings,
        tie_embeddings=config.tie_word_embeddings,
    )


def load_model_spec(name_or_path: str) -> ModelSpec:
    """A preset name, an HF `config.json`, or a directory holding one."""
    key = name_or_path.lower()
    if key in MODEL_PRESETS:
        return MODEL_PRESETS[key]
    path = Path(name_or_path)
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if (path / "config.json").is_file():
        return model_spec_of(read_config(path))
    raise ValueError(
        f"unknown model {name_or_path!r}: use one of {', '.join(sorted(MODEL_PRESETS))}, "
        "an HF config.json, or a checkpoint directory"
    )
