"""A thin wrapper over `transformers.AutoTokenizer` for one checkpoint dir.

`encode` tokenizes text as-is (special tokens, such as a BOS, only where the tokenizer itself adds
them); `encode_chat` renders the model's chat template with the generation prompt, exactly as
`apply_chat_template(..., add_generation_prompt=True)` would. `eos_ids` is every id that ends a
reply: the tokenizer's EOS plus the eos ids of config.json and generation_config.json (chat models
often end turns with a token, like `<|im_end|>` or `<|eot_id|>`, named only in one of those).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# Pre-tokenizers that keep every input character in some pre-token (BERT's whitespace splitting
# drops the spaces, so a text of spaces would be any length in no tokens at all).
_KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Digits", "Punctuation",
                                     "UnicodeScripts", "Split"})
# Canonical composition folds at most 4 code points into one (the longest canonical
# decomposition in Unicode is 4), so NFC/NFKC text is at least a quarter of its input length.
_COMPOSING = frozenset({"NFC", "NFKC"})
_LENGTH_KEEPING_NORMALIZERS = frozenset({"NFD", "NFKD", "Lowercase", "Prepend"})


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


def _normalizer_shrink(spec: dict[str, Any] | None) -> int | None:
    """How many input characters may become one normalized character (None: unbounded, e.g. a
    normalizer that deletes control characters, such as BERT's or SentencePiece's)."""
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1
        for part in spec.get("normalizers", []):
            shrink = _normalizer_shrink(part)
            if shrink is None:
                return None
            factor *= shrink
        return factor
    if kind in _COMPOSING:
        return 4
    if kind in _LENGTH_KEEPING_NORMALIZERS:
        return 1
    if kind == "Replace":
        pattern, content = spec.get("pattern", {}), spec.get("content", "")
        if "String" not in pattern or not content:
            return None  # a regex, or a deletion, may shrink a text without bound
        return math.ceil(len(pattern["String"]) / len(content))
    return None


def _pre_tokenizer_keeps_text(spec: dict[str, Any] | None) -> bool:
    if spec is None:
        return True
    if spec.get("type") == "Sequence":
        return all(_pre_tokenizer_keeps_text(p) for p in spec.get("pretokenizers", []))
    if spec.get("type") == "Split" and spec.get("behavior") == "Removed":
        return False
    return spec.get("type") in _KEEPING_PRE_TOKENIZERS


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

    @functools.cached_property
    def max_token_chars(self) -> int | None:
        """An upper bound on the input characters one token stands for, or None where this
        tokenizer has none. A text longer than context × this cannot fit in the context however
        it is tokenized, so the daemon refuses it without spending the time to tokenize it.

        The longest vocabulary entry bounds it: byte-level BPE spells each byte as one
        character, so an entry's length is its byte length, at least what it decodes to; other
        models spell the text itself, plus markers. Normalization that composes characters
        multiplies that; a normalizer or pre-tokenizer that deletes text, or an unknown token
        that may stand for any run of unknown characters, leaves no bound."""
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is None:
            return None  # a slow tokenizer: its normalization cannot be inspected
        config = json.loads(backend.to_str())
        model = config.get("model", {})
        if model.get("type") != "BPE" or (model.get("fuse_unk") and not model.get("byte_fallback")):
            return None
        shrink = _normalizer_shrink(config.get("normalizer"))
        if shrink is None or not _pre_tokenizer_keeps_text(config.get("pre_tokenizer")):
            return None
        return shrink * max(len(token) for token in self.hf.get_vocab())

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
