"""`tetris serve` under load on this machine: TTFT, inter-token time and throughput over HTTP.

Starts the daemon (embedded SmolLM2, 2 prefill + 1 decode Ray actors, one torch thread each),
sends `--requests` streaming completions with prompt lengths cycling through `--prompts`,
`--concurrency` at a time, and prints JSON: per-request TTFT / mean inter-token time / tokens,
their percentiles, requests and output tokens per second, and how the prefills were chunked
(chunks per SP size, from the daemon's /metrics).

    .venv/bin/python benchmarks/serve_cpu.py --requests 12 --concurrency 4
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
import time
import urllib.request
from typing import Any

from tetris.runtime.deployment import deploy
from tetris.runtime.ports import free_port
from tetris.runtime.serve_config import ServeConfig
from tetris.runtime.server.runner import ServerThread

WORDS = ("river", "mountain", "valley", "town", "bridge", "market", "harbour", "forest")


def prompt_text(tokens: int) -> str:
    # About one token per word for this vocabulary.
    return " ".join(WORDS[i % len(WORDS)] for i in range(tokens))


def one(url: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = json.dumps({"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    started = time.monotonic()
    times: list[float] = []
    usage: dict[str, int] = {}
    with urllib.request.urlopen(request, timeout=600) as reply:
        for raw in reply:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.monotonic() - started)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return {"prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "ttft_s": times[0] if times else None,
            "mean_itl_s": statistics.fmean(gaps) if gaps else None,
            "e2e_s": time.monotonic() - started}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def chunks_by_sp(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("tetris:prefill_chunks_total{"):
            sp = line.split('sp="')[1].split('"')[0]
            out[sp] = float(line.rsplit(" ", 1)[1])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--prompts", type=int, nargs="+", default=[128, 1024, 256, 2048])
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    deployment = deploy(ServeConfig(port=free_port(), max_queue=max(64, args.concurrency)))
    results: list[dict[str, Any]] = []
    lock = threading.Semaphore(args.concurrency)
    try:
        with ServerThread(deployment) as url:
            one(url, prompt_text(16), 2)  # warm-up: groups, caches
            started = time.monotonic()

            def run(i: int) -> None:
                with lock:
                    result = one(url, prompt_text(args.prompts[i % len(args.prompts)]),
                                 args.max_tokens)
                results.append(result)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(args.requests)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.monotonic() - started
            chunks = chunks_by_sp(url)
    finally:
        deployment.shutdown()
    ttfts = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    itls = [r["mean_itl_s"] for r in results if r["mean_itl_s"] is not None]
    tokens = sum(r["completion_tokens"] or 0 for r in results)
    json.dump({
        "config": vars(args), "wall_s": wall, "requests_per_s": len(results) / wall,
        "output_tokens_per_s": tokens / wall,
        "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p90_s": percentile(ttfts, 0.9),
        "itl_mean_s": statistics.fmean(itls) if itls else None,
        "prefill_chunks_by_sp": chunks, "per_request": results,
    }, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
