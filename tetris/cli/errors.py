"""User-input errors and their one-line rendering (`tetris: error: <message>`, exit status 2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from pydantic import ValidationError

T = TypeVar("T")
EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad user input; the message names the option, file line or request at fault."""


def one_line(exc: BaseException) -> str:
    """A readable single line: pydantic's multi-line report reduced to `field: reason; ...`."""
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors(include_url=False):
            where = ".".join(str(part) for part in err["loc"])
            parts.append(f"{where}: {err['msg']}" if where else str(err["msg"]))
        text = "; ".join(parts) or str(exc)
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def for_option(option: str, func: Callable[..., T], *args: object) -> T:
    """Call `func`, turning its ValueError / ValidationError into a UsageError naming `option`."""
    try:
        return func(*args)
    except (ValueError, ValidationError) as exc:
        raise UsageError(f"{option}: {one_line(exc)}") from None
