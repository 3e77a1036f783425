"""The compute side of the cost model against a real device: measured chunk prefill time
T(c, p, 1) of a Llama-shaped model vs the hardware preset's prediction; JSON on stdout.

The project's own model (`tetris.models.llama`) and attention backend run with random weights
(bf16 on CUDA: torch's flash SDPA with LSE when flash-attn is absent) over a (chunk, prefix)
grid. For each point: one warm-up, then the median of `--repeats` timed runs (CUDA-synchronised);
the prefix's KV is random, already in the cache, as a request's earlier chunks would leave it.
Beside each prediction, the point's physical limit: max(FLOPs / peak, weight bytes / HBM
bandwidth). Exit status 1 when the mean relative error exceeds `--tolerance`.

GPU:  python benchmarks/gpu/cost_model_check.py --hardware h200 > cost_model_check.json
Tiny (any device, what the tests run):
      python benchmarks/gpu/cost_model_check.py --shape tiny --chunks 16,32 --prefixes 0,32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from tetris.kernels.attention import available_backends
from tetris.models.config import LlamaConfig, named_config
from tetris.models.kv_cache import KVCache, LocalAttend
from tetris.models.llama import LlamaModel, rope_inv_freq
from tetris.solver.cluster import ClusterSpec
from tetris.solver.cost_model import CostModel
from tetris.solver.hardware import load_hardware
from tetris.solver.model_spec import model_spec_of

# Llama-3-8B's shapes (meta-llama/Meta-Llama-3-8B config.json); the weights are random.
LLAMA3_8B = LlamaConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=131072, dtype="bfloat16", name="llama3-8b")
SHAPES = {"llama3-8b": LLAMA3_8B, "tiny": named_config("tiny")}


@dataclass(frozen=True)
class Point:
    chunk: int
    prefix: int
    measured_s: float
    predicted_s: float
    limit_s: float

    @property
    def rel_error(self) -> float:
        return (self.predicted_s - self.measured_s) / self.measured_s

    def row(self) -> dict[str, Any]:
        return {"chunk": self.chunk, "prefix": self.prefix, "measured_s": self.measured_s,
                "predicted_s": self.predicted_s, "limit_s": self.limit_s,
                "rel_error": self.rel_error,
                "share_of_limit": self.limit_s / self.measured_s}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_chunk(model: LlamaModel, device: torch.device, dtype: torch.dtype, chunk: int,
               prefix: int, repeats: int) -> float:
    """Median seconds of one chunk of `chunk` tokens after `prefix` cached ones."""
    c = model.config
    times = []
    for run in range(repeats + 1):  # the first run warms up kernels and allocator
        cache = KVCache(c.num_layers, c.num_kv_heads, c.head_dim, dtype, device,
                        prefix + chunk)
        cache.allocate("r", prefix + chunk)
        if prefix:
            k = torch.randn(prefix, c.num_kv_heads, c.head_dim, dtype=dtype, device=device)
            positions = torch.arange(prefix, device=device)
            for layer in range(c.num_layers):
                cache.append("r", layer, k, k, positions)
        ids = torch.randint(0, c.vocab_size, (chunk,), device=device)
        positions = torch.arange(prefix, prefix + chunk, device=device)
        sync(device)
        started = time.perf_counter()
        model(ids, positions, LocalAttend(cache, "r"))
        sync(device)
        if run:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def physical_limit_s(cost_model: CostModel, chunk: int, prefix: int) -> float:
    """No device does it faster: all FLOPs at peak, or one read of the weights."""
    m, hw = cost_model.model, cost_model.hardware
    pairs = chunk * prefix + chunk * (chunk + 1) / 2
    flops = 2 * m.linear_params * chunk + 4 * m.num_layers * m.num_heads * m.head_dim * pairs
    return max(flops / hw.peak_flops, m.weight_bytes / hw.hbm_bandwidth)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--hardware", default="h100", help="the preset to check (h100, h200, "
                        "a100) or a HardwareSpec JSON")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--chunks", default="512,2048,8192")
    parser.add_argument("--prefixes", default="0,8192,32768")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.15)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)
    config = SHAPES[args.shape]
    chunks = [int(x) for x in args.chunks.split(",")]
    prefixes = [int(x) for x in args.prefixes.split(",")]
    if min(chunks) < 1 or min(prefixes) < 0 or args.repeats < 1:
        parser.error("chunks must be >= 1, prefixes >= 0, repeats >= 1")
    spec = model_spec_of(config)
    cost_model = CostModel(spec, load_hardware(args.hardware), ClusterSpec(prefill_instances=1))
    model = random_model(config, device, dtype)
    started = time.perf_counter()
    points = [Point(c, p, time_chunk(model, device, dtype, c, p, args.repeats),
                    cost_model.chunk_seconds(c, p, 1), physical_limit_s(cost_model, c, p))
              for p in prefixes for c in chunks]
    errors = [abs(pt.rel_error) for pt in points]
    report = {
        "command": " ".join(["python", "benchmarks/gpu/cost_model_check.py", *sys.argv[1:]])
        if argv is None else " ".join(argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "shape": args.shape,
        "hardware_preset": cost_model.hardware.model_dump(),
        "coefficients": cost_model.coefficients.model_dump(),
        "attention_backend": attention_backend_name(device, dtype, config.head_dim),
        "points": [pt.row() for pt in points],
        "mean_abs_rel_error": statistics.fmean(errors),
        "max_abs_rel_error": max(errors),
        "tolerance": args.tolerance,
        "wall_s": time.perf_counter() - started,
    }
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0 if report["mean_abs_rel_error"] <= args.tolerance else 1


def random_model(config: LlamaConfig, device: torch.device, dtype: torch.dtype) -> LlamaModel:
    """The model with random weights made directly in `dtype` on `device` (8B parameters in
    fp32 first would take twice the memory); RoPE's table stays fp32, as the loader keeps it."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaModel(config)
    model = model.to_empty(device=device)
    for name, param in model.named_parameters():
        param.data = (torch.ones(param.shape, dtype=dtype, device=device) if "norm" in name
                      else torch.randn(param.shape, dtype=dtype, device=device) * 0.02)
    model.register_buffer("inv_freq", rope_inv_freq(config).to(device), persistent=False)
    return model.eval().requires_grad_(False)


def attention_backend_name(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The backend `attention` picks for these inputs."""
    return available_backends(device, dtype, head_dim)[0]


if __name__ == "__main__":
    sys.exit(main())
