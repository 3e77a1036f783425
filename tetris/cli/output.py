"""Command output shared by the subcommands: one JSON document on stdout, or a table."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any


def emit(out: dict[str, Any], fmt: str, print_table: Callable[[dict[str, Any]], None]) -> None:
    """`--format json` prints `out` as the whole of stdout; otherwise `print_table(out)`."""
    if fmt == "json":
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_table(out)


def number(value: Any, digits: int = 4) -> str:
    """A table cell: floats to `digits` significant digits, None as '-'."""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "-" if value is None else str(value)
