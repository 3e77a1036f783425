"""`LlamaConfig`: a Llama-family decoder's shape, from an HF config.json or a named preset.

One dataclass covers Llama 2/3, Qwen2, Mistral and SmolLM2: they differ only in sizes, RoPE
parameters, qkv bias (Qwen2) and whether the lm_head is tied to the embedding.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# RoPE types whose frequencies depend only on the config (not on the running sequence length, as
# "dynamic" NTK does), so a cached key's rotation never changes: that is what a KV cache needs.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Defaults of the matching transformers config classes, for keys a config.json leaves out.
_MAX_POSITIONS_DEFAULT = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768}


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or {"rope_type": "linear"|"llama3", "factor": ..., ...} as in HF configs.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2), never on o_proj
    dtype: str = "float32"  # the checkpoint's dtype; the loader may cast
    model_type: str = "llama"
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{f} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError("rms_norm_eps and rope_theta must be positive")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
            # Our own copy, so that no caller's dict can change a frozen config later.
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else str(self.rope_scaling["rope_type"])

    def num_parameters(self) -> int:
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.attention_bias else 0)
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * layer + h + head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "") -> LlamaConfig:
        """From the dict of an HF config.json (transformers 4.x or 5.x layout)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported (supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in hf:
                raise ValueError(f"config has no {key!r}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        if hf.get("mlp_bias"):
            raise ValueError("mlp_bias=true is not supported")
        max_positions = hf.get("max_position_embeddings", _MAX_POSITIONS_DEFAULT[model_type])
        _reject_sliding_window(hf, model_type, max_positions)
        num_heads = hf["num_attention_heads"]
        theta, scaling = _rope_from_hf(hf)
        eos = hf.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            # Qwen2 always has q/k/v bias and its config does not say so.
            attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
            model_type=model_type,
            name=name,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF config.json dict (rope in the 4.x layout, which transformers 5 also reads)."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        out: dict[str, Any] = {
            "architectures": [arch], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            # A copy: transformers fills in keys of the rope dict it is given, in place.
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1
            else self.eos_token_ids[0],
            "torch_dtype": self.dtype,
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.attention_bias
        elif self.attention_bias != (self.model_type == "qwen2"):
            raise ValueError(f"{self.model_type} cannot have attention_bias={self.attention_bias}")
        return out


def read_config(model_dir: str | Path) -> LlamaConfig:
    """The `LlamaConfig` of an HF checkpoint dir (its config.json), with errors naming the file."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model directory {model_dir} does not exist")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{model_dir} has no config.json (not an HF checkpoint directory)")
    try:
        hf = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read it as JSON: {err}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object")
    try:
        return LlamaConfig.from_hf(hf, name=model_dir.name)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {err}") from None


def _check_rope_scaling(scaling: dict[str, Any]) -> None:
    kind = scaling.get("rope_type")
    if kind not in SUPPORTED_ROPE_TYPES or kind == "default":
        raise ValueError(
            f"rope scaling type {kind!r} is not supported (supported: linear, llama3; "
            "dynamic NTK would re-rotate cached keys as the sequence grows)"
        )
    needed = ["factor"]
    if kind == "llama3":
        needed += ["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
    missing = [k for k in needed if k not in scaling]
    if missing:
        raise ValueError(f"rope scaling {kind!r} lacks {', '.join(missing)}")


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from `rope_theta` + `rope_scaling` (4.x) or `rope_parameters` (5.x)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    # Old configs spell the key "type"; transformers 5 fills llama3's original length this way.
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind == "default":
        return theta, None
    scaling = {"rope_type": kind, **params}
    if kind == "llama3":
        scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    _check_rope_scaling(scaling)
    return theta, scaling


def _reject_sliding_window(hf: dict[str, Any], model_type: str, max_positions: int) -> None:
    window = hf.get("sliding_window")
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        return
    if window is not None and window < max_positions:
        raise ValueError(
            f"sliding-window attention (sliding_window={window}) is not supported; "
            "outputs would diverge past the window"
        )


def _tiny(**overrides: Any) -> LlamaConfig:
    base: dict[str, Any] = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=512,
        bos_token_id=1, eos_token_ids=(2,),
    )
    return LlamaConfig(**{**base, **overrides})


# Named configs: tiny ones for tests (random weights), real shapes for `tetris model info`.
CONFIGS: dict[str, LlamaConfig] = {
    "tiny": _tiny(name="tiny"),
    "tiny-mha": _tiny(name="tiny-mha", num_kv_heads=4),
    "tiny-mqa": _tiny(name="tiny-mqa", num_kv_heads=1),
    "tiny-qwen2": _tiny(name="tiny-qwen2", model_type="qwen2", attention_bias=True,
                        rope_theta=1e6),
    "tiny-tied": _tiny(name="tiny-tied", tie_word_embeddings=True),
    "tiny-llama3": _tiny(
        name="tiny-llama3", rope_theta=500000.0,
        # A short original length so that the scaling reaches most of the 8 frequencies.
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "tiny-linear": _tiny(name="tiny-linear", rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "smollm2-135m": LlamaConfig(
        name="smollm2-135m", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=1, eos_token_ids=(2,), dtype="bfloat16",
    ),
    "llama3.1-8b": LlamaConfig(
        name="llama3.1-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009), dtype="bfloat16",
    ),
    "qwen2.5-7b": LlamaConfig(
        name="qwen2.5-7b", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1e6,
        max_position_embeddings=32768, bos_token_id=151643, eos_token_ids=(151645,),
        attention_bias=True, dtype="bfloat16", model_type="qwen2",
    ),
}


def named_config(name: str) -> LlamaConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(
            f"unknown config {name!r} (known: {', '.join(CONFIGS)})"
        ) from None
