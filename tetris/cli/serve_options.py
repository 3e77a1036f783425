"""Flags shared by `tetris serve` and `tetris profile`: one `ServeConfig`, from flags and/or a
JSON `--config` file (flags given on the command line win over the file)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tetris.cli.spec_files import (
    calibration_option,
    check_limits,
    config_file,
    hardware_option,
    validated,
)
from tetris.runtime.serve_config import SERVE_POLICY, ServeConfig

# flag dest -> ServeConfig field
FLAGS = {
    "model": "model", "served_model_name": "served_model_name", "host": "host", "port": "port",
    "ray_address": "ray_address", "prefill_instances": "prefill_instances",
    "decode_instances": "decode_instances", "device": "device",
    "kv_tokens": "kv_tokens_per_instance", "max_queue": "max_queue",
    "solver": "solver", "calibration": "calibration", "hardware": "hardware",
    "request_timeout_s": "request_timeout_s", "collective_timeout_s": "collective_timeout_s",
    "placement": "placement",
}
# flag dest -> ServeConfig.policy field
POLICY_FLAGS = {"roles": "roles", "role_interval_s": "role_interval_s"}


def add_deployment_flags(p: argparse.ArgumentParser, *, serving: bool) -> None:
    g = p.add_argument_group("deployment (defaults: ServeConfig)")
    g.add_argument("--config", type=Path, help="ServeConfig JSON file")
    g.add_argument("--model", help="embedded model (smollm2, the default) or an HF "
                   "Llama-family checkpoint directory")
    g.add_argument("--ray-address", help="join this Ray cluster (default: a private local "
                   "one on 127.0.0.1)")
    g.add_argument("--placement", choices=["pack", "spread"], help="where Ray places the "
                   "actors: its default packing, or spread over the nodes (the planner "
                   "learns each actor's node either way)")
    g.add_argument("--prefill-instances", type=int, help="default 2")
    g.add_argument("--decode-instances", type=int, help="default 1")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"])
    g.add_argument("--kv-tokens", type=int, help="KV cache tokens per instance")
    g.add_argument("--hardware", help="GPU preset or HardwareSpec JSON (GPU only)")
    g.add_argument("--calibration", help="calibration JSON from `tetris profile`")
    g.add_argument("--collective-timeout-s", type=float, help="how long a rank waits for a "
                   "peer in a collective before the call fails (default 10)")
    if serving:
        g.add_argument("--served-model-name", help="the model name clients send")
        g.add_argument("--host", help="default 127.0.0.1")
        g.add_argument("--port", type=int, help="default 8000")
        g.add_argument("--max-queue", type=int,
                       help="bound on admitted, unfinished requests; beyond it 429")
        g.add_argument("--solver", choices=["greedy", "cp", "milp"])
        g.add_argument("--request-timeout-s", type=float, help="stop a request not done this "
                       "long after it arrived (504; default: no limit)")
        g.add_argument("--roles", choices=["fixed", "threshold", "optimizer"],
                       help="fixed: the prefill/decode split as given; threshold or optimizer: "
                       "every GPU serves either role, re-decided as the load moves "
                       "(--prefill-instances and --decode-instances both give the GPU count)")
        g.add_argument("--role-interval-s", type=float,
                       help="how often elastic roles are re-decided (default 2)")


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The deployment's settings, every file they name read and checked before anything starts
    (a bad --calibration must not surface only once Ray and the workers are up)."""
    data: dict[str, Any] = {}
    if args.config is not None:
        data = config_file(args.config)
    for dest, name in FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            data[name] = value
    for dest, name in POLICY_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            policy = data.setdefault("policy", SERVE_POLICY.model_dump())
            policy[name] = value
    option = "--config/flags" if args.config is not None else "flags"
    config = validated(option, args.config, ServeConfig, data)
    check_limits(config.policy, f"--config {args.config}" if args.config is not None
                 else option)
    file = f"--config {args.config}: " if args.config is not None else "--"
    calibration_option(config.calibration, "--calibration" if args.calibration is not None
                       else f"{file}calibration")
    hardware_option(config.hardware, "--hardware" if args.hardware is not None
                    else f"{file}hardware")
    return config
