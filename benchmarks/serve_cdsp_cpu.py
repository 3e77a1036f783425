"""What chunking buys on the live runtime: a short request arriving behind a long one.

For each setting, `tetris serve` (embedded SmolLM2, 2 prefill + 1 decode actors) gets a long
prompt and, `--gap` seconds later, a short one; both greedy, `--max-tokens` each. Settings:
- "cdsp": the default (chunks time-sliced at the quantum, SP chosen per chunk);
- "one-chunk": every prompt prefilled as one chunk (`max_chunks=1`, no time slicing), the
  static-SP behaviour.
Prints JSON: each request's TTFT and the chunks it ran, per setting.

    .venv/bin/python benchmarks/serve_cdsp_cpu.py
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.request
from typing import Any

from tetris.runtime.deployment import deploy
from tetris.runtime.ports import free_port
from tetris.runtime.serve_config import SERVE_POLICY, ServeConfig
from tetris.runtime.server.runner import ServerThread

SETTINGS: dict[str, dict[str, Any]] = {
    "cdsp": {},
    "one-chunk": {"policy": SERVE_POLICY.model_copy(
        update={"max_chunks": 1, "quantum_s": None})},
}


def ask(url: str, words: int, max_tokens: int, out: dict[str, Any]) -> None:
    prompt = " ".join(("river", "valley", "harbour", "market")[i % 4] for i in range(words))
    body = json.dumps({"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=600) as reply:
        for raw in reply:
            line = raw.decode().strip()
            if line.startswith("data: {") and "ttft_s" not in out:
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                    out["ttft_s"] = time.monotonic() - started
    out["e2e_s"] = time.monotonic() - started


def run_setting(extra: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    deployment = deploy(ServeConfig(port=free_port(), **extra))
    try:
        with ServerThread(deployment) as url:
            ask(url, 16, 2, {})  # warm-up
            long: dict[str, Any] = {"prompt_words": args.long}
            short: dict[str, Any] = {"prompt_words": args.short}
            first = threading.Thread(target=ask, args=(url, args.long, args.max_tokens, long))
            first.start()
            time.sleep(args.gap)
            ask(url, args.short, args.max_tokens, short)
            first.join()
            with urllib.request.urlopen(f"{url}/metrics", timeout=30) as reply:
                chunks = [line for line in reply.read().decode().splitlines()
                          if line.startswith("tetris:prefill_chunks_total{")]
    finally:
        deployment.shutdown()
    return {"long": long, "short": short, "chunk_counters": chunks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--long", type=int, default=3000, help="words (≈ tokens) of the long")
    parser.add_argument("--short", type=int, default=64)
    parser.add_argument("--gap", type=float, default=0.5, help="seconds between the two")
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    results = {name: run_setting(extra, args) for name, extra in SETTINGS.items()}
    json.dump({"config": vars(args), "results": results}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
