"""Chunked SP prefill, the KV moved to separate decode processes and decode there, driven as the
engine drives its workers, match HF transformers token for token (a random-weight Llama: fast,
and any bug in positions or KV placement shows)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tetris.runtime.chunking import parse_chunks
from tetris.runtime.generate import generate
from tetris.runtime.local_group import GroupConfig, LocalSPGroup
from tetris.runtime.sampling import SamplingParams
from tetris.runtime.worker_group import Call

transformers = pytest.importorskip("transformers")

TINY_PROMPT_TOKENS = 50
TINY_NEW_TOKENS = 16
PREFILL_RANKS, DECODE_RANKS = 4, 2
# (chunk plan, decode SP, free KV room of the non-lead decode rank): one chunk SP 1; one chunk
# SP 2; SP growing 1→2→3 and 1→2→4; uneven chunks; a last chunk (2 tokens) smaller than its SP
# (4); SP 1→2 with the KV split over 2 decode ranks (20 tokens fit on the non-lead, so rank 0's
# KV goes to both); 4 prefill ranks' KV gathered onto 2 decode ranks.
TINY_PLANS = [
    ("rest:1", 1, None),
    ("rest:2", 1, None),
    ("16:1,16:2,rest:3", 1, None),
    ("7:1,29:2,rest:4", 1, None),
    ("48:2,rest:4", 1, None),
    ("20:1,rest:2", 2, 20),
    ("10:2,rest:4", 2, None),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Llama (GQA 4/2, 3 layers) saved as an HF checkpoint directory."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=10000.0, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_group(tiny_dir: Path) -> Iterator[LocalSPGroup]:
    with LocalSPGroup(GroupConfig(tiny_dir, PREFILL_RANKS, DECODE_RANKS)) as group:
        yield group


def hf_greedy(model_dir: Path, prompt: list[int], new_tokens: int,
              eos: int | None) -> tuple[list[int], torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        first_logits = model(ids).logits[0, -1]
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos if eos is not None else 0)
    return out[0, len(prompt):].tolist(), first_logits


@pytest.fixture(scope="module")
def tiny_reference(tiny_dir: Path,
                   torch_one_thread: None) -> tuple[list[int], list[int], torch.Tensor]:
    seeded = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 256, (TINY_PROMPT_TOKENS,), generator=seeded)
    tokens, logits = hf_greedy(tiny_dir, prompt.tolist(), TINY_NEW_TOKENS, eos=None)
    return prompt.tolist(), tokens, logits


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize(("plan", "decode_sp", "non_lead_room"), TINY_PLANS)
def test_tiny_model_any_plan_matches_hf(
    tiny_group: LocalSPGroup, tiny_reference: tuple[list[int], list[int], torch.Tensor],
    plan: str, decode_sp: int, non_lead_room: int | None,
) -> None:
    """Random-weight Llama: every chunking / SP plan and decode split generates HF's greedy
    tokens exactly, and leaves every rank's KV free."""
    prompt, expected, expected_logits = tiny_reference
    rooms = None if non_lead_room is None else (1 << 16, non_lead_room)
    result = generate(tiny_group, prompt, parse_chunks(plan, len(prompt)),
                      SamplingParams(max_tokens=TINY_NEW_TOKENS), eos_ids=(), decode_sp=decode_sp,
                      rooms=rooms)
    assert result.token_ids == expected
    assert rel_error(result.first_logits, expected_logits) < 1e-4
    assert result.decode_ranks == tuple(range(PREFILL_RANKS, PREFILL_RANKS + decode_sp))
    free = tiny_group.run([Call(r, "free_tokens") for r in range(tiny_group.world_size)])
    assert free == [tiny_group.config.kv_tokens_per_rank] * tiny_group.world_size


@pytest.mark.parametrize("strategy", ["gather_kv", "pass_q"])
def test_both_attention_strategies_match_hf(
    tiny_group: LocalSPGroup, tiny_reference: tuple[list[int], list[int], torch.Tensor],
    strategy: str,
) -> None:
    """Gathering KV and passing queries in prefill are both exact over a 1→2→3 plan (decode
    over 2 decode ranks)."""
    prompt, expected, _ = tiny_reference
    result = generate(tiny_group, prompt, parse_chunks("12:1,20:2,rest:3", len(prompt)),
                      SamplingParams(max_tokens=TINY_NEW_TOKENS), eos_ids=(), decode_sp=2,
                      strategy=strategy)
    assert result.token_ids == expected
