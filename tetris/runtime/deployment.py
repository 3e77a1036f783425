"""Bring a serving deployment up and down: Ray, the instance actors, the engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tetris.models.config import LlamaConfig, read_config
from tetris.models.fetch import embedded_model, fetch_model
from tetris.models.tokenizer import Tokenizer
from tetris.ray_session import init_ray
from tetris.runtime.actors import WorkerPool
from tetris.runtime.engine import Engine, EngineOptions
from tetris.runtime.metrics import ServingMetrics
from tetris.runtime.profile import QUICK_GRID, Progress, calibrate, zero_coefficients
from tetris.runtime.ray_instances import RayInstances
from tetris.runtime.serve_config import (
    ServeConfig,
    configured_coefficients,
    serving_cost_model,
)
from tetris.solver.model_spec import ModelSpec, model_spec_of


@dataclass
class Deployment:
    config: ServeConfig
    model_dir: Path
    device: str
    ray: Any
    pool: WorkerPool
    engine: Engine
    metrics: ServingMetrics
    tokenizer: Tokenizer

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


@dataclass(frozen=True)
class ServedModel:
    """The checkpoint to serve: its directory and its config.json, parsed once for the model
    and for the planners' cost model."""

    model_dir: Path
    config: LlamaConfig
    spec: ModelSpec

    @classmethod
    def resolve(cls, model: str) -> ServedModel:
        model_dir = resolve_model_dir(model)
        config = read_config(model_dir)
        return cls(model_dir, config, model_spec_of(config))


@dataclass
class Workers:
    model: ServedModel
    device: str
    ray: Any
    pool: WorkerPool


def start_workers(config: ServeConfig, model: ServedModel | None = None) -> Workers:
    """Start (or join) Ray and place one set-up actor per instance."""
    model = model or ServedModel.resolve(config.model)
    model_dir = model.model_dir
    device = resolve_device(config.device)
    ray = init_ray(config.ray_address)
    pool = WorkerPool.start(ray, model_dir, config.prefill_instances, config.decode_instances,
                            prefill_kv_tokens=config.kv_tokens_per_instance,
                            decode_kv_tokens=config.decode_kv_tokens, device=device,
                            dtype=config.dtype_on(device), threads=config.threads_per_instance,
                            local=config.ray_address in (None, "local"),
                            gpus_per_instance=config.gpus_per_instance,
                            collective_timeout_s=config.collective_timeout_s,
                            spread=config.placement == "spread", elastic=config.elastic)
    return Workers(model, device, ray, pool)


def deploy(config: ServeConfig, metrics: ServingMetrics | None = None,
           progress: Progress = lambda _: None) -> Deployment:
    """Workers plus the engine (not started: `await deployment.engine.start()` in the serving
    event loop)."""
    model = ServedModel.resolve(config.model)
    model_dir, spec = model.model_dir, model.spec
    device = resolve_device(config.device)
    # A bad calibration file or model fails before any actor starts.
    coefficients = configured_coefficients(config, spec, device)
    tokenizer = Tokenizer.from_dir(model_dir)
    workers = start_workers(config, model)
    try:
        if coefficients is None and device == "cpu":
            progress(f"no calibration for {spec.name} on this host: measuring a quick one "
                     "(`tetris profile` writes a fuller one)")
            calibration, _, _ = calibrate(workers.ray, workers.pool, spec, "cpu",
                                          zero_coefficients(), QUICK_GRID, progress)
            coefficients = calibration.coefficients
        cost_model = serving_cost_model(config, spec, device, coefficients, workers.pool.nodes)
    except BaseException:
        workers.pool.shutdown(workers.ray)
        raise
    metrics = metrics or ServingMetrics()
    options = EngineOptions(max_queue=config.max_queue,
                            default_max_tokens=config.default_max_tokens,
                            policy=config.policy_name, settings=config.policy, slo=config.slo,
                            request_timeout_s=config.request_timeout_s)
    name = config.served_model_name or (config.model if embedded_model(config.model)
                                        else model_dir.name)
    engine = Engine(RayInstances(workers.ray, workers.pool), tokenizer, name,
                    model.config.max_position_embeddings, model.config.vocab_size, cost_model,
                    options, metrics)
    return Deployment(config, model_dir, device, workers.ray, workers.pool, engine, metrics,
                      tokenizer)
