"""The embedded SmolLM2-135M-Instruct: chunked SP prefill, the KV moved to separate decode
processes and decode there (as the engine drives its workers) generate exactly HF transformers'
greedy tokens, for a prompt over 1,500 tokens and a chat one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tetris.runtime.chunking import parse_chunks
from tetris.runtime.generate import generate
from tetris.runtime.local_group import GroupConfig, LocalSPGroup
from tetris.runtime.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 32
PARAGRAPH = (
    "The history of astronomy is the story of how people came to understand the sky. Early "
    "observers tracked the motions of the Sun, the Moon and the planets, and built calendars "
    "around them. Later, careful measurements showed that the planets move on ellipses around "
    "the Sun, and the laws of motion explained why. Telescopes revealed moons around Jupiter, "
    "phases of Venus and countless faint stars in the Milky Way. "
)


@pytest.fixture(scope="module")
def group(smollm2_dir: Path) -> Iterator[LocalSPGroup]:
    with LocalSPGroup(GroupConfig(smollm2_dir, prefill_ranks=4, decode_ranks=2)) as g:
        yield g


@pytest.fixture(scope="module")
def hf_model(smollm2_dir: Path) -> object:
    torch.set_num_threads(1)
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> object:
    from tetris.models.tokenizer import Tokenizer

    return Tokenizer.from_dir(smollm2_dir)


def reference(
    hf_model: object, prompt: list[int], eos: list[int]
) -> tuple[list[int], torch.Tensor]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        first_logits = hf_model(ids).logits[0, -1]  # type: ignore[operator]
        out = hf_model.generate(  # type: ignore[attr-defined]
            ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos,
            pad_token_id=eos[0])
    return out[0, len(prompt):].tolist(), first_logits


def long_plans(n: int) -> list[tuple[str, int]]:
    """Six (plan, decode SP) over an n-token prompt (see test docstring)."""
    return [
        ("rest:1", 1),
        ("rest:2", 1),
        ("512:1,512:2,rest:3", 1),
        ("300:1,700:2,rest:4", 1),
        (f"{n - 3}:2,rest:4", 1),
        ("768:1,rest:2", 2),
    ]


def test_long_prompt_every_plan_matches_hf(group: LocalSPGroup, hf_model: object,
                                           tokenizer: object) -> None:
    """A 1,500+-token prompt through: one chunk SP 1; one chunk SP 2; SP 1→2→3; uneven chunks
    1→2→4; a last chunk of 3 tokens on SP 4; decode with the KV over 2 decode ranks (else 1).
    Greedy 32 tokens equal HF's and first-token logits agree within 1e-3 relative."""
    prompt = tokenizer.encode(PARAGRAPH * 19 + "\nSummarize the text above in one sentence:")  # type: ignore[attr-defined]
    assert len(prompt) >= 1500
    eos = sorted(tokenizer.eos_ids)  # type: ignore[attr-defined]
    expected, expected_logits = reference(hf_model, prompt, eos)
    for plan, decode_sp in long_plans(len(prompt)):
        result = generate(group, prompt, parse_chunks(plan, len(prompt)),
                          SamplingParams(max_tokens=NEW_TOKENS), eos, decode_sp=decode_sp)
        assert result.token_ids == expected, plan
        error = (result.first_logits - expected_logits).abs().max() / expected_logits.abs().max()
        assert float(error) < 1e-3, plan


@pytest.mark.parametrize(("kind", "plan", "decode_sp"),
                         [("chat", "half:1,rest:2", 2), ("plain", "2:1,rest:3", 1)])
def test_short_prompts_match_hf(group: LocalSPGroup, hf_model: object, tokenizer: object,
                                kind: str, plan: str, decode_sp: int) -> None:
    """A chat-templated prompt prefilled 1→2 and decoded over 2 decode ranks; a plain prompt
    whose 3-rank chunk is about as short as its group. Both equal HF's greedy tokens."""
    if kind == "chat":
        prompt = tokenizer.encode_chat(  # type: ignore[attr-defined]
            [{"role": "user", "content": "What is the capital of France? Answer briefly."}])
    else:
        prompt = tokenizer.encode("The three primary colors of light are")  # type: ignore[attr-defined]
    eos = sorted(tokenizer.eos_ids)  # type: ignore[attr-defined]
    expected, _ = reference(hf_model, prompt, eos)
    plan = plan.replace("half", str(len(prompt) // 2))
    result = generate(group, prompt, parse_chunks(plan, len(prompt)),
                      SamplingParams(max_tokens=NEW_TOKENS), eos, decode_sp=decode_sp)
    assert result.token_ids == expected
