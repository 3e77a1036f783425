"""Llama-family decoder with explicit positions and pluggable attention; weight loading.

- `config`: `LlamaConfig` (from an HF config.json or a named preset in `CONFIGS`).
- `llama`: `LlamaModel.forward(token_ids [T], positions [T], attend) -> hidden [T, hidden]`;
  `attend(layer, q, k, v, positions) -> out` owns KV storage and attention (the SP hook).
- `kv_cache`: `KVCache` (token ranges of several requests, check/act allocation) and
  `LocalAttend`, the single-process `attend`.
- `weights`: `load_model(hf_dir)`, `convert_gguf(file, out_dir)`.
- `tokenizer`: `Tokenizer.from_dir(hf_dir)`: encode, encode_chat, decode, eos_ids.
- `fetch`: `fetch_model("smollm2")`, `resolve_model(name_or_path) -> Path`, the cache root.

Torch-backed names load on first use, so `tetris` subcommands that only need a config or a
cached path stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from tetris.models.config import CONFIGS, LlamaConfig, named_config, read_config

_LAZY = {
    "Attend": "llama", "LlamaModel": "llama",
    "KVCache": "kv_cache", "KVCacheFullError": "kv_cache", "LocalAttend": "kv_cache",
    "WeightsError": "weights", "convert_gguf": "weights", "load_model": "weights",
    "Tokenizer": "tokenizer",
    "FetchError": "fetch", "cache_root": "fetch", "fetch_model": "fetch",
    "resolve_model": "fetch",
}

__all__ = ["CONFIGS", "LlamaConfig", "named_config", "read_config", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"tetris.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tetris.models' has no attribute {name!r}")
