"""Bring a serving deployment up and down: Ray, the instance actors, the engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tetris.models.config import read_config
from tetris.models.fetch import embedded_model, fetch_model
from tetris.models.tokenizer import Tokenizer
from tetris.ray_session import init_ray
from tetris.runtime.actors import WorkerPool
from tetris.runtime.engine import Engine, EngineOptions
from tetris.runtime.metrics import ServingMetrics
from tetris.runtime.profile import QUICK_GRID, Progress, calibrate, zero_coefficients
from tetris.runtime.serve_config import (
    ServeConfig,
    configured_coefficients,
    serving_cost_model,
)
from tetris.solver.model_spec import ModelSpec, load_model_spec


@dataclass
class Deployment:
    config: ServeConfig
    model_dir: Path
    device: str
    ray: Any
    pool: WorkerPool
    engine: Engine
    metrics: ServingMetrics

    def shutdown(self) -> None:
        self.pool.shutdown(self.ray)


def resolve_model_dir(model: str) -> Path:
    """An embedded model's cached dir (fetched on first use) or a checkpoint directory."""
    if embedded_model(model) is not None:
        return fetch_model(model)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {model!r}: not an embedded model and not a checkpoint "
                         "directory with a config.json")
    return path


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Workers:
    model_dir: Path
    device: str
    spec: ModelSpec
    ray: Any
    pool: WorkerPool


def start_workers(config: ServeConfig) -> Workers:
    """Start (or join) Ray and place one set-up actor per instance."""
    model_dir = resolve_model_dir(config.model)
    device = resolve_device(config.device)
    spec = load_model_spec(str(model_dir))
    ray = init_ray(config.ray_address)
    pool = WorkerPool.start(ray, model_dir, config.prefill_instances, config.decode_instances,
                            prefill_kv_tokens=config.kv_tokens_per_instance,
                            decode_kv_tokens=config.decode_kv_tokens, device=device,
                            dtype=config.dtype_on(device), threads=config.threads_per_instance,
                            local=config.ray_address in (None, "local"),
                            gpus_per_instance=config.gpus_per_instance)
    return Workers(model_dir, device, spec, ray, pool)


def deploy(config: ServeConfig, metrics: ServingMetrics | None = None,
           progress: Progress = lambda _: None) -> Deployment:
    """Workers plus the engine (not started: `await deployment.engine.start()` in the serving
    event loop)."""
    model_dir = resolve_model_dir(config.model)
    device = resolve_device(config.device)
    spec = load_model_spec(str(model_dir))
    # A bad calibration file or model fails before any actor starts.
    coefficients = configured_coefficients(config, spec, device)
    tokenizer = Tokenizer.from_dir(model_dir)
    model_config = read_config(model_dir)
    workers = start_workers(config)
    try:
        if coefficients is None and device == "cpu":
            progress(f"no calibration for {spec.name} on this host: measuring a quick one "
                     "(`tetris profile` writes a fuller one)")
            calibration, _, _ = calibrate(workers.ray, workers.pool, spec, "cpu",
                                          zero_coefficients(), QUICK_GRID, progress)
            coefficients = calibration.coefficients
        cost_model = serving_cost_model(config, spec, device, coefficients)
    except BaseException:
        workers.pool.shutdown(workers.ray)
        raise
    metrics = metrics or ServingMetrics()
    options = EngineOptions(
        max_queue=config.max_queue, default_max_tokens=config.default_max_tokens,
        decode_max_batch=config.decode_max_batch,
        decode_max_sp=config.decode_max_sp, solver=config.solver,
        time_limit_ms=config.time_limit_ms, quantum_s=config.quantum_s,
        block_tokens=config.block_tokens, max_chunks=config.max_chunks, max_sp=config.max_sp,
        slo=config.slo)
    name = config.served_model_name or (config.model if embedded_model(config.model)
                                        else model_dir.name)
    engine = Engine(workers.pool, tokenizer, name, model_config.max_position_embeddings,
                    model_config.vocab_size, cost_model, options, metrics)
    return Deployment(config, model_dir, device, workers.ray, workers.pool, engine, metrics)
