"""`tetris trace`: the public traces by name.

`tetris trace fetch NAME` downloads the upstream file at its pinned commit, verifies its sha256
and caches it (`$TETRIS_CACHE_DIR/traces/`, default `~/.cache/tetris/traces/`); it prints the
cached path. `tetris trace list` shows every known trace and whether it is cached. Once fetched,
`--trace NAME` works in `simulate` and `whatif` (a lengths-only trace as `paired=NAME`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tetris.cli.errors import UsageError
from tetris.cli.model_cmd import fetch_failed
from tetris.evaluation.trace_catalog import (
    CATALOG,
    RAW_BASE_URL,
    TraceFetchError,
    cached_path,
    fetch_trace,
    is_fetched,
    public_trace,
)


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    p = subparsers.add_parser("trace", help="fetch public traces by name",
                              description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = p.add_subparsers(dest="trace_command", metavar="ACTION", required=True)
    fetch = sub.add_parser("fetch", help="download, verify and cache a trace; print its path")
    fetch.add_argument("name", metavar="NAME", help=f"one of: {', '.join(CATALOG)}")
    fetch.add_argument("--base-url", default=RAW_BASE_URL, metavar="URL",
                       help="where OWNER/REPO/COMMIT/PATH is served (default %(default)s; "
                       "a mirror serving the same files works)")
    fetch.add_argument("--timeout-s", type=float, default=60.0, metavar="S",
                       help="network timeout (default %(default)s)")
    fetch.set_defaults(handler=run_fetch)
    listing = sub.add_parser("list", help="known traces as JSON, and whether each is cached")
    listing.set_defaults(handler=run_list)


def run_fetch(args: argparse.Namespace) -> int:
    trace = public_trace(args.name)
    if trace is None:
        raise UsageError(f"unknown trace {args.name!r} (known: {', '.join(CATALOG)})")
    if not args.base_url.startswith(("https://", "http://")):
        raise UsageError(f"--base-url: expected an http(s) URL, got {args.base_url!r}")
    try:
        path = fetch_trace(trace, base_url=args.base_url, timeout_s=args.timeout_s)
    except TraceFetchError as err:
        return fetch_failed(err)
    print(path)
    return 0


def run_list(args: argparse.Namespace) -> int:
    del args
    rows = [{"name": t.name, "kind": t.kind, "source": f"github:{t.repo}@{t.commit}:{t.path}",
             "sha256": t.sha256, "bytes": t.size, "cached": is_fetched(t),
             "path": str(cached_path(t)), "description": t.description}
            for t in CATALOG.values()]
    json.dump(rows, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
