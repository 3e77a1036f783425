"""LlamaModel with explicit positions matches HF transformers: random tiny models and SmolLM2."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tetris.models.config import CONFIGS, LlamaConfig
from tetris.models.kv_cache import KVCache, KVCacheFullError, LocalAttend
from tetris.models.llama import LlamaModel, rope_inv_freq
from tetris.models.tokenizer import Tokenizer
from tetris.models.weights import load_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY_NAMES = ["tiny", "tiny-mha", "tiny-tied", "tiny-qwen2", "tiny-llama3", "tiny-linear"]
PROMPT_TOKENS = 40
CHUNK_BOUNDS = [5, 13, PROMPT_TOKENS]  # chunks [0, 5), [5, 13), [13, T)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                        q_positions: torch.Tensor,
                        k_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-by-position GQA attention in float64: the kernel's contract, written plainly."""
    group = q.shape[1] // k.shape[1]
    scores = torch.einsum("thd,shd->hts", q.double(),
                          k.double().repeat_interleave(group, dim=1)) * q.shape[-1] ** -0.5
    visible = k_positions[None, :] <= q_positions[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [H, Tq]
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("hts,shd->thd", probs, v.double().repeat_interleave(group, dim=1))
    return out.to(q.dtype), lse.T.float()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def new_cache(config: LlamaConfig, max_tokens: int) -> KVCache:
    return KVCache(config.num_layers, config.num_kv_heads, config.head_dim, torch.float32,
                   "cpu", max_tokens)


@torch.inference_mode()
def prefill(model: LlamaModel, cache: KVCache, request_id: str, prompt: Sequence[int],
            bounds: Iterable[int]) -> torch.Tensor:
    """Prefill chunk by chunk ([prev, end) for each end in bounds); logits of every token."""
    logits, start = [], 0
    for end in bounds:
        cache.allocate(request_id, end - start)
        ids = torch.tensor(prompt[start:end], dtype=torch.int64)
        hidden = model(ids, torch.arange(start, end), LocalAttend(cache, request_id))
        logits.append(model.logits(hidden))
        start = end
    return torch.cat(logits)


@torch.inference_mode()
def greedy(model: LlamaModel, prompt: Sequence[int], new_tokens: int,
           eos_ids: Iterable[int] = (), bounds: Iterable[int] | None = None,
           ) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens (stopping after an eos) and the first token's logits."""
    cache = new_cache(model.config, len(prompt) + new_tokens)
    first_logits = prefill(model, cache, "r", prompt, bounds or [len(prompt)])[-1]
    tokens, stop = [int(first_logits.argmax())], set(eos_ids)
    while len(tokens) < new_tokens and tokens[-1] not in stop:
        # The token just sampled sits at position len(prompt) + len(tokens) - 1.
        position = len(prompt) + len(tokens) - 1
        cache.allocate("r", 1)
        step = torch.tensor([tokens[-1]]), torch.tensor([position])
        hidden = model(*step, LocalAttend(cache, "r"))
        tokens.append(int(model.logits(hidden)[0].argmax()))
    return tokens, first_logits


@torch.inference_mode()
def hf_greedy(hf: Any, prompt: Sequence[int], new_tokens: int,
              eos_ids: Iterable[int] = ()) -> tuple[list[int], torch.Tensor]:
    ids = torch.tensor([list(prompt)])
    eos = sorted(eos_ids)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                      do_sample=False, eos_token_id=eos or None, pad_token_id=0,
                      output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), out.logits[0][0].float()


def random_hf_model(config: LlamaConfig, seed: int) -> Any:
    """An HF model of `config` with every weight random (norms and biases too, so a swapped
    name cannot hide) and large enough that greedy choices are far from ties."""
    torch.manual_seed(seed)
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_dict())
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    # No eos: both sides generate all the tokens asked for.
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.2)
    return hf


@pytest.fixture(scope="module", params=TINY_NAMES)
def tiny(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> tuple[LlamaModel, Any]:
    """(our model, HF model) on the same random weights, ours loaded from HF's saved dir."""
    config = CONFIGS[request.param]
    hf = random_hf_model(config, seed=TINY_NAMES.index(request.param))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return load_model(path), hf


def random_prompt(config: LlamaConfig, n: int = PROMPT_TOKENS) -> list[int]:
    return torch.randint(3, config.vocab_size, (n,), generator=torch.Generator().manual_seed(7)
                         ).tolist()


# -- random tiny models against HF ---------------------------------------------------------
def test_full_prompt_logits_match_hf(tiny: tuple[LlamaModel, Any]) -> None:
    """One-pass prefill logits of every prompt token equal HF's within 1e-4 relative."""
    model, hf = tiny
    prompt = random_prompt(model.config)
    ours = prefill(model, new_cache(model.config, PROMPT_TOKENS), "r", prompt, [PROMPT_TOKENS])
    with torch.inference_mode():
        reference = hf(torch.tensor([prompt])).logits[0].float()
    assert ours.dtype == torch.float32 and ours.shape == reference.shape
    assert relative_error(ours, reference) < 1e-4


def test_chunked_prefill_matches_one_pass(tiny: tuple[LlamaModel, Any]) -> None:
    """Chunks [0,5), [5,13), [13,T) with explicit positions give one pass's logits and KV."""
    model, _ = tiny
    prompt = random_prompt(model.config)
    whole_cache, chunked_cache = (new_cache(model.config, PROMPT_TOKENS) for _ in range(2))
    whole = prefill(model, whole_cache, "r", prompt, [PROMPT_TOKENS])
    chunked = prefill(model, chunked_cache, "r", prompt, CHUNK_BOUNDS)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    for layer in range(model.config.num_layers):
        for a, b in zip(chunked_cache.get("r", layer), whole_cache.get("r", layer), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_permuted_tokens_with_their_positions_give_same_logits(
        tiny: tuple[LlamaModel, Any]) -> None:
    """Order of tokens inside a step does not matter, only their positions (as under SP)."""
    model, _ = tiny
    prompt = random_prompt(model.config)
    order = torch.randperm(PROMPT_TOKENS, generator=torch.Generator().manual_seed(3))
    cache = new_cache(model.config, PROMPT_TOKENS)
    cache.allocate("r", PROMPT_TOKENS)
    with torch.inference_mode():
        hidden = model(torch.tensor(prompt)[order], order, LocalAttend(cache, "r"))
        permuted = model.logits(hidden)
    whole = prefill(model, new_cache(model.config, PROMPT_TOKENS), "r", prompt, [PROMPT_TOKENS])
    torch.testing.assert_close(permuted, whole[order], rtol=1e-5, atol=1e-5)


def test_greedy_decode_matches_hf_generate(tiny: tuple[LlamaModel, Any]) -> None:
    """16 greedy tokens after a chunked prefill equal HF generate(do_sample=False)."""
    model, hf = tiny
    prompt = random_prompt(model.config)
    ours, _ = greedy(model, prompt, 16, bounds=CHUNK_BOUNDS)
    reference, _ = hf_greedy(hf, prompt, 16)
    assert len(ours) == 16
    assert ours == reference


def test_empty_step_returns_empty(tiny: tuple[LlamaModel, Any]) -> None:
    """T=0 works, before and after the request holds KV (an SP rank with no tokens)."""
    model, _ = tiny
    cache = new_cache(model.config, PROMPT_TOKENS)
    empty = torch.empty(0, dtype=torch.int64)
    with torch.inference_mode():
        assert model(empty, empty, LocalAttend(cache, "r")).shape == (0, model.config.hidden_size)
        prefill(model, cache, "r", random_prompt(model.config), [PROMPT_TOKENS])
        hidden = model(empty, empty, LocalAttend(cache, "r"))
    assert model.logits(hidden).shape == (0, model.config.vocab_size)
    assert cache.num_tokens("r") == PROMPT_TOKENS


def test_rope_scaling_presets_really_scale() -> None:
    """The llama3 and linear presets slow most frequencies (else their HF match is vacuous)."""
    for name in ("tiny-llama3", "tiny-linear"):
        scaled = rope_inv_freq(CONFIGS[name])
        base = rope_inv_freq(dataclasses.replace(CONFIGS[name], rope_scaling=None))
        assert scaled.shape == (CONFIGS[name].head_dim // 2,)
        assert (scaled < base).sum() >= 4, name


# -- KV cache --------------------------------------------------------------------------------
def test_kv_cache_check_act_allocation() -> None:
    """can_allocate/allocate account tokens across requests; full and overrun raise clearly."""
    cache = KVCache(2, 2, 4, torch.float32, "cpu", max_tokens=10)
    assert cache.can_allocate(10) and not cache.can_allocate(11)
    cache.allocate("a", 6)
    cache.allocate("b", 3)
    assert cache.num_free_tokens == 1 and not cache.can_allocate(2)
    with pytest.raises(KVCacheFullError, match="2 tokens requested for 'a', 1 of 10 free"):
        cache.allocate("a", 2)
    k = torch.randn(4, 2, 4)
    with pytest.raises(KVCacheFullError, match="exceeds its allocation of 3"):
        cache.append("b", 0, k, k, torch.arange(4))
    cache.free("a")
    cache.free("never-seen")
    assert cache.num_free_tokens == 7 and cache.request_ids() == ["b"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=12), st.integers(0, 2**31))
def test_kv_cache_returns_appends_in_order(sizes: list[int], seed: int) -> None:
    """Whatever the append sizes and positions, get returns them concatenated in order."""
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache(3, 2, 4, torch.float32, "cpu", max_tokens=sum(sizes))
    ks, positions = [], []
    for n in sizes:
        cache.allocate("r", n)
        k = torch.randn(n, 2, 4, generator=gen)
        pos = torch.randint(0, 1000, (n,), generator=gen)
        for layer in range(3):
            cache.append("r", layer, k + layer, -k, pos)
        ks.append(k)
        positions.append(pos)
    for layer in range(3):
        k, v, pos = cache.get("r", layer)
        torch.testing.assert_close(k, torch.cat(ks) + layer, rtol=0, atol=0)
        torch.testing.assert_close(v, -torch.cat(ks), rtol=0, atol=0)
        assert pos.tolist() == torch.cat(positions).tolist()
    assert cache.get("other", 0)[0].shape == (0, 2, 4)


def test_local_attend_equals_float64_attention() -> None:
    """LocalAttend over cached non-contiguous positions equals float64 reference attention."""
    gen = torch.Generator().manual_seed(0)
    cache = KVCache(1, 2, 8, torch.float32, "cpu", max_tokens=12)
    attend = LocalAttend(cache, "r")
    k_all, v_all = torch.randn(12, 2, 8, generator=gen), torch.randn(12, 2, 8, generator=gen)
    pos_all = torch.tensor([0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11])
    for lo, hi in ((0, 6), (6, 12)):
        cache.allocate("r", hi - lo)
        q = torch.randn(hi - lo, 4, 8, generator=gen)
        out = attend(0, q, k_all[lo:hi], v_all[lo:hi], pos_all[lo:hi])
        want, _ = reference_attention(q, k_all[:hi], v_all[:hi], q_positions=pos_all[lo:hi],
                                      k_positions=pos_all[:hi])
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# -- the real SmolLM2-135M-Instruct --------------------------------------------------------
# A public-domain paragraph (Dickens, A Tale of Two Cities), repeated into a long prompt.
PARAGRAPH = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope, it was the winter "
    "of despair, we had everything before us, we had nothing before us, we were all going direct "
    "to Heaven, we were all going direct the other way - in short, the period was so far like the "
    "present period, that some of its noisiest authorities insisted on its being received, for "
    "good or for evil, in the superlative degree of comparison only. There were a king with a "
    "large jaw and a queen with a plain face, on the throne of England; there were a king with a "
    "large jaw and a queen with a fair face, on the throne of France."
)
LONG_PROMPT_MIN_TOKENS = 1500
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path) -> tuple[LlamaModel, Any, Tokenizer]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    return load_model(smollm2_dir), hf.eval(), Tokenizer.from_dir(smollm2_dir)


def smollm2_prompts(tok: Tokenizer) -> dict[str, list[int]]:
    long_text = "\n\n".join([PARAGRAPH] * 8)
    return {
        "chat": tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}]),
        "plain": tok.encode("The three primary colors are"),
        "long": tok.encode_chat([{"role": "user", "content":
                                  long_text + "\n\nWho wrote the text above? Answer briefly."}]),
    }


@pytest.mark.parametrize("name", ["chat", "plain", "long"])
def test_smollm2_greedy_matches_hf(smollm2: tuple[LlamaModel, Any, Tokenizer], name: str) -> None:
    """SmolLM2 greedy tokens (chunked prefill) and first-token logits equal HF's."""
    model, hf, tok = smollm2
    prompt = smollm2_prompts(tok)[name]
    if name == "long":
        assert len(prompt) >= LONG_PROMPT_MIN_TOKENS
    bounds = [len(prompt) // 3, len(prompt) // 2, len(prompt)]
    started = time.perf_counter()
    ours, first = greedy(model, prompt, NEW_TOKENS, tok.eos_ids, bounds=bounds)
    ours_s = time.perf_counter() - started
    reference, reference_first = hf_greedy(hf, prompt, NEW_TOKENS, tok.eos_ids)
    assert relative_error(first, reference_first) < 1e-3
    assert ours == reference, (tok.decode(ours), tok.decode(reference))
    print(f"{name}: {len(prompt)} prompt tokens, {len(ours)} generated in {ours_s:.2f} s: "
          f"{tok.decode(ours)!r}")


def test_smollm2_chat_encoding_and_eos(smollm2: tuple[LlamaModel, Any, Tokenizer]) -> None:
    """encode_chat equals apply_chat_template(add_generation_prompt=True); <|im_end|> stops."""
    _, _, tok = smollm2
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there!"}]
    reference = tok.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(reference, list):
        reference = reference["input_ids"]  # transformers 5 returns a BatchEncoding
    assert tok.encode_chat(messages) == list(reference)
    assert tok.hf.convert_tokens_to_ids("<|im_end|>") in tok.eos_ids
    text = "Hello, world! Ünïcödé."
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text)[0] != tok.bos_id  # SmolLM2's tokenizer adds no BOS of its own
