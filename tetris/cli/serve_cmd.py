"""`tetris serve`: the OpenAI-compatible daemon over a Ray cluster of prefill and decode
instances (default: a private local Ray on 127.0.0.1, the embedded SmolLM2-135M-Instruct, 2
prefill + 1 decode instances, http://127.0.0.1:8000).

`--demo` starts it, sends one real chat request over HTTP (a question about a ~2,000-token
document, so its prefill is cut into chunks over the prefill instances), prints the answer and
the chunk plan it ran, and stops.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tetris.cli.serve_options import add_deployment_flags, serve_config


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible serving daemon",
                              description=__doc__)
    add_deployment_flags(p, serving=True)
    p.add_argument("--demo", action="store_true",
                   help="send one chat request, print the answer and its chunk plan, stop")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from tetris.runtime.deployment import deploy
    from tetris.runtime.server.runner import ServerThread, serve_forever

    config = serve_config(args)
    print(f"tetris serve: starting {config.prefill_instances} prefill + "
          f"{config.decode_instances} decode instances of {config.model} ...", file=sys.stderr,
          flush=True)
    deployment = deploy(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    where = f"http://{config.host}:{config.port}"
    if not args.demo:
        print(f"tetris serve: model {deployment.engine.model_name!r} on {deployment.device}, "
              f"listening on {where} (Ctrl-C stops)", file=sys.stderr, flush=True)
        serve_forever(deployment, args.log_level)
        return 0
    from tetris.runtime.server.demo import run_demo

    try:
        with ServerThread(deployment) as url:
            print(f"tetris serve: listening on {url}; sending one chat request",
                  file=sys.stderr, flush=True)
            run_demo(url, deployment.engine.model_name)
    finally:
        deployment.shutdown()
    return 0
