"""`tetris model`: fetch the embedded model into the local cache, show a model's config.

`tetris model fetch [NAME]` prints the cached checkpoint dir (downloading it the first time);
`tetris model info NAME|PATH` prints the config summary as one JSON object. NAME is an embedded
model (fetched on demand) or a named config preset (shapes only, no weights).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tetris.cli.errors import UsageError, one_line


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    p = subparsers.add_parser("model", help="fetch and inspect models",
                              description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    fetch = sub.add_parser("fetch", help="download and cache an embedded model; print its dir")
    fetch.add_argument("name", nargs="?", default="smollm2", metavar="NAME",
                       help="embedded model (default: smollm2)")
    fetch.set_defaults(handler=run_fetch)
    info = sub.add_parser("info", help="print a model's config as JSON")
    info.add_argument("model", metavar="NAME|PATH",
                      help="embedded model, config preset, HF checkpoint dir or .gguf file")
    info.set_defaults(handler=run_info)


def fetch_failed(err: Exception) -> int:
    # A download failure is not bad input (exit 1), but still one line, not a traceback.
    print(f"tetris: error: {one_line(err)}", file=sys.stderr)
    return 1


def run_fetch(args: argparse.Namespace) -> int:
    from tetris.models.fetch import FetchError, embedded_model, fetch_model, is_fetched

    model = embedded_model(args.name)
    if model is None:
        from tetris.models.fetch import EMBEDDED_MODELS

        raise UsageError(f"unknown model {args.name!r} (embedded: {', '.join(EMBEDDED_MODELS)})")
    if not is_fetched(model.name):
        print(f"fetching {model.description} ...", file=sys.stderr)
    try:
        path = fetch_model(model.name)
    except (FetchError, OSError) as err:
        return fetch_failed(err)
    print(path)
    return 0


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def run_info(args: argparse.Namespace) -> int:
    from tetris.models.config import CONFIGS, read_config
    from tetris.models.fetch import FetchError, resolve_model

    name: str = args.model
    path: Path | None = None
    if name in CONFIGS:
        config = CONFIGS[name]
    else:
        try:
            path = resolve_model(name)  # its ValueError is already one line naming `name`
        except (FetchError, OSError) as err:
            return fetch_failed(err)
        config = read_config(path)
    summary: dict[str, Any] = {
        "name": config.name or name,
        "path": None if path is None else str(path),
        "num_parameters": config.num_parameters(),
        "disk_bytes": None if path is None else _dir_bytes(path),
        "config": config.to_dict(),
    }
    print(json.dumps(summary, indent=2))
    return 0

