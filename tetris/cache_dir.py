"""Where fetched things live: `$TETRIS_CACHE_DIR`, default `~/.cache/tetris` (models under
`models/`, public traces under `traces/`)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "TETRIS_CACHE_DIR"


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tetris"
