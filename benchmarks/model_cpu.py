"""CPU prefill speed of our Llama vs HF transformers, and SP=2 vs SP=1 chunk time; JSON on stdout.

Same prompt (a real paragraph repeated to ~1,500 tokens), same weights (the embedded
SmolLM2-135M-Instruct unless --model is given), one torch thread per process, best of --repeats.
Usage: python benchmarks/model_cpu.py [--model smollm2|DIR] [--repeats 3] [--tokens 1500]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

PARAGRAPH = (
    "The history of astronomy is the story of how people came to understand the sky. Early "
    "observers tracked the motions of the Sun, the Moon and the planets, and built calendars "
    "around them. "
)


def best_of(repeats: int, fn: object) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=1500)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import transformers

    from tetris.models.fetch import resolve_model
    from tetris.models.kv_cache import KVCache, LocalAttend
    from tetris.models.tokenizer import Tokenizer
    from tetris.models.weights import load_model
    from tetris.runtime.chunking import parse_chunks
    from tetris.runtime.generate import prefill_prompt
    from tetris.runtime.local_group import GroupConfig, LocalSPGroup
    from tetris.runtime.sampling import SamplingParams
    from tetris.runtime.worker_group import Call

    model_dir = resolve_model(args.model)
    tokenizer = Tokenizer.from_dir(model_dir)
    ids = tokenizer.encode(PARAGRAPH * (args.tokens // 30 + 1))[: args.tokens]
    n = len(ids)
    token_ids = torch.tensor(ids)
    positions = torch.arange(n)

    ours = load_model(model_dir)
    mc = ours.config

    def ours_prefill() -> None:
        cache = KVCache(mc.num_layers, mc.num_kv_heads, mc.head_dim, torch.float32, "cpu", n)
        cache.allocate("r", n)
        with torch.inference_mode():
            ours.logits(ours(token_ids, positions, LocalAttend(cache, "r"))[-1:])

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def hf_prefill() -> None:
        with torch.inference_mode():
            hf(token_ids[None], logits_to_keep=1)

    ours_s = best_of(args.repeats, ours_prefill)
    hf_s = best_of(args.repeats, hf_prefill)
    sp_seconds = {}
    # Only prefill is timed, so the group needs no decode rank.
    with LocalSPGroup(GroupConfig(model_dir, prefill_ranks=2, decode_ranks=0)) as group:
        for sp in (1, 2):
            chunks = parse_chunks(f"rest:{sp}", n)
            times = []
            for i in range(args.repeats):
                rid = f"sp{sp}-{i}"
                _, runs = prefill_prompt(group, rid, ids, chunks, SamplingParams(max_tokens=1))
                group.run([Call(r, "free", (rid,)) for r in range(sp)])
                times.append(runs[0].seconds)
            sp_seconds[sp] = min(times)
    print(json.dumps({
        "benchmark": "model_cpu",
        "model": model_dir.name,
        "prompt_tokens": n,
        "threads_per_process": 1,
        "ours_prefill_s": round(ours_s, 4),
        "hf_prefill_s": round(hf_s, 4),
        "ours_s_per_token": ours_s / n,
        "hf_s_per_token": hf_s / n,
        "ours_vs_hf": round(ours_s / hf_s, 3),
        "sp1_chunk_s": round(sp_seconds[1], 4),
        "sp2_chunk_s": round(sp_seconds[2], 4),
        "sp2_speedup": round(sp_seconds[1] / sp_seconds[2], 3),
        "note": "SP ranks are processes on this machine's cores, gloo over loopback",
    }, indent=2))


if __name__ == "__main__":
    main()
