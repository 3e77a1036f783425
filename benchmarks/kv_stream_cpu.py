"""What KV streaming buys on the live runtime: the prompt's KV sent chunk by chunk while later
chunks compute, against the whole prompt moved after the last chunk.

The embedded SmolLM2 on 2 prefill + 1 decode actors; prompts of `--tokens` tokens, one at a
time, greedy, `--max-tokens` each, chunks time-sliced at `--quantum` seconds. For each setting
(`stream_kv` on and off) and prompt: TTFT, the gap from the first to the second token, the KV
handoff (last chunk's end → all KV on decode; `tetris:kv_handoff_seconds`), the prefill
chunks' seconds (does a transfer beside a chunk slow it?), and when each streamed batch landed.
Prints JSON.

    .venv/bin/python benchmarks/kv_stream_cpu.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from tetris.runtime.deployment import Deployment, deploy
from tetris.runtime.engine import Engine, EngineOptions
from tetris.runtime.engine_api import GenerationRequest
from tetris.runtime.metrics import ServingMetrics
from tetris.runtime.ports import free_port
from tetris.runtime.ray_instances import RayInstances
from tetris.runtime.sampling import SamplingParams
from tetris.runtime.serve_config import SERVE_POLICY, ServeConfig

WORDS = ("river", "valley", "harbour", "market", "lantern", "orchard")


def engine_for(d: Deployment, stream: bool, quantum: float) -> Engine:
    old = d.engine
    settings = old.options.settings.model_copy(update={"stream_kv": stream,
                                                       "quantum_s": quantum})
    options = EngineOptions(max_queue=8, policy=old.options.policy, settings=settings,
                            slo=old.options.slo)
    return Engine(RayInstances(d.ray, d.pool), old.tokenizer, old.model_name,
                  old.context_tokens, old.limits.vocab_size, old.cost_model, options,
                  ServingMetrics())


async def run_one(engine: Engine, prompt: list[int], max_tokens: int, rid: str
                  ) -> dict[str, Any]:
    started = time.monotonic()
    stream = await engine.submit(GenerationRequest(rid, prompt,
                                                   SamplingParams(max_tokens=max_tokens)))
    times: list[float] = []
    async for event in stream:
        times.extend([time.monotonic() - started] * len(event.token_ids))
    s = stream.summary
    handoff = (s.kv_landed[-1].after_s - s.prefilled_after_s
               if s.kv_landed and s.prefilled_after_s is not None else None)
    return {"tokens": len(prompt), "ttft_s": times[0], "second_token_gap_s": times[1] - times[0],
            "chunks": [[c.start_token, c.end_token, list(c.instances), round(c.seconds, 4)]
                       for c in s.chunks],
            "chunk_seconds": sum(c.seconds for c in s.chunks),
            "streamed_handoff_s": handoff,
            "landed": [[x.tokens, round(x.after_s, 4)] for x in s.kv_landed],
            "prefilled_after_s": s.prefilled_after_s, "token_ids": s.token_ids}


def handoff_mean(engine: Engine) -> float | None:
    body = engine.metrics.render()[0].decode()
    values = {line.split()[0]: float(line.split()[1]) for line in body.splitlines()
              if line.startswith("tetris:kv_handoff_seconds_")}
    count = values.get("tetris:kv_handoff_seconds_count", 0.0)
    return values["tetris:kv_handoff_seconds_sum"] / count if count else None


async def measure(d: Deployment, stream: bool, args: argparse.Namespace) -> dict[str, Any]:
    engine = engine_for(d, stream, args.quantum)
    await engine.start()
    try:
        runs = []
        for rep in range(args.repeats):
            for n in args.tokens:
                ids = d.engine.encode(" ".join(WORDS[(i * 7 + rep) % len(WORDS)]
                                               for i in range(n)))[:n]
                runs.append(await run_one(engine, ids, args.max_tokens, f"r{rep}-{n}"))
        return {"stream_kv": stream, "runs": runs, "kv_handoff_mean_s": handoff_mean(engine)}
    finally:
        await engine.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 3000])
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--quantum", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    config = ServeConfig(port=free_port(), prefill_instances=2, decode_instances=1,
                         kv_tokens_per_instance=8192, policy=SERVE_POLICY)
    d = deploy(config)
    try:
        results = [asyncio.run(measure(d, stream, args)) for stream in (True, False)]
    finally:
        d.shutdown()
    same = [a["token_ids"] == b["token_ids"]
            for a, b in zip(results[0]["runs"], results[1]["runs"], strict=True)]
    json.dump({"args": vars(args), "same_tokens": all(same), "settings": results},
              sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
