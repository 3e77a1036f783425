"""A thin wrapper over `transformers.AutoTokenizer` for one checkpoint dir.

`encode` tokenizes text as-is (special tokens, such as a BOS, only where the tokenizer itself adds
them); `encode_chat` renders the model's chat template with the generation prompt, exactly as
`apply_chat_template(..., add_generation_prompt=True)` would. `eos_ids` is every id that ends a
reply: the tokenizer's EOS plus the eos ids of config.json and generation_config.json (chat models
often end turns with a token, like `<|im_end|>` or `<|eot_id|>`, named only in one of those).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _json_eos_ids(path: Path) -> list[int]:
    if not path.is_file():
        return []
    try:
        return _ids(json.loads(path.read_text()).get("eos_token_id"))
    except (OSError, ValueError, TypeError, AttributeError):
        return []  # a malformed optional file only loses its extra stop ids


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, extra_eos_ids: Iterable[int] = ()) -> None:
        self.hf = hf_tokenizer
        eos = set(_ids(hf_tokenizer.eos_token_id)) | set(extra_eos_ids)
        self.eos_ids: frozenset[int] = frozenset(eos)
        self.bos_id: int | None = hf_tokenizer.bos_token_id

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ValueError(f"model directory {model_dir} does not exist")
        hf = AutoTokenizer.from_pretrained(str(model_dir))
        extra = _json_eos_ids(model_dir / "config.json")
        extra += _json_eos_ids(model_dir / "generation_config.json")
        return cls(hf, extra)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text)["input_ids"])

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of the chat so far, ending with the assistant's generation prompt."""
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template")
        # Rendered then encoded without added special tokens: apply_chat_template does the
        # same, and its tokenize=True return type differs across transformers versions.
        text = self.hf.apply_chat_template(list(messages), tokenize=False,
                                           add_generation_prompt=True)
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return str(self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens))
