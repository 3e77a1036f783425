"""KV transfer between two Ray actors on this machine: gloo point-to-point vs Ray's object store.

For each size, one actor holds a request's KV (every layer's K and V, SmolLM2-135M's shape: 30
layers × 3 KV heads × 64, fp32, 46 KB per token) and hands it to the other:
- "gloo_p2p": one packed tensor sent with torch.distributed send/recv (gloo over loopback);
- "object_store": the sender returns the packed tensor, the receiver gets its ObjectRef
  (shared memory on one node; zero-copy read).
Prints JSON: median seconds over the repeats and GB/s per size and path.

    .venv/bin/python benchmarks/kv_transfer_cpu.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

from tetris.ray_session import init_ray
from tetris.runtime.ports import free_port

BYTES_PER_TOKEN = 30 * 3 * 64 * 2 * 4


class Peer:
    def __init__(self, rank: int, port: int) -> None:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
        self.rank = rank
        self.held: torch.Tensor | None = None

    def setup(self) -> None:
        torch.distributed.init_process_group("gloo", rank=self.rank, world_size=2)

    def make(self, tokens: int) -> None:
        self.held = torch.randn(tokens * BYTES_PER_TOKEN // 4)

    def send(self) -> None:
        assert self.held is not None
        torch.distributed.send(self.held, 1)

    def recv(self, tokens: int) -> float:
        buf = torch.empty(tokens * BYTES_PER_TOKEN // 4)
        torch.distributed.recv(buf, 0)
        return float(buf[0])

    def export(self) -> torch.Tensor:
        assert self.held is not None
        return self.held

    def take(self, kv: torch.Tensor) -> float:
        # A copy into the receiver's own cache, as the runtime does.
        return float(kv.clone()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ray = init_ray()
    port = free_port()
    actor = ray.remote(num_cpus=0)(Peer)
    a, b = actor.remote(0, port), actor.remote(1, port)
    ray.get([a.setup.remote(), b.setup.remote()])
    rows: list[dict[str, Any]] = []
    for tokens in args.tokens:
        ray.get(a.make.remote(tokens))
        for path in ("gloo_p2p", "object_store"):
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                if path == "gloo_p2p":
                    ray.get([a.send.remote(), b.recv.remote(tokens)])
                else:
                    ray.get(b.take.remote(a.export.remote()))
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            mb = tokens * BYTES_PER_TOKEN / 1e6
            rows.append({"tokens": tokens, "megabytes": round(mb, 2), "path": path,
                         "median_s": round(med, 5), "gb_per_s": round(mb / 1e3 / med, 3)})
            print(rows[-1], file=sys.stderr)
    json.dump({"bytes_per_token": BYTES_PER_TOKEN, "repeats": args.repeats, "rows": rows},
              sys.stdout, indent=2)
    sys.stdout.write("\n")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
