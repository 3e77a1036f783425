"""User-input errors and their one-line rendering (`tetris: error: <message>`, exit status 2)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

from tetris.solver.input_files import describe_validation

T = TypeVar("T")
EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad user input; the message names the option, file line or request at fault."""


def one_line(exc: BaseException) -> str:
    """A readable single line: pydantic's multi-line report reduced to `field: reason; ...`."""
    if isinstance(exc, ValidationError):
        text = describe_validation(exc)
    elif isinstance(exc, OSError) and exc.strerror:
        # str() of an OSError is "[Errno 2] No such file or directory: 'x'"; say it plainly.
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def for_option(option: str, func: Callable[..., T], *args: object) -> T:
    """Call `func`, turning its ValueError / ValidationError into a UsageError naming `option`
    (a file error already names its file, so it keeps its own words after the option)."""
    try:
        return func(*args)
    except (ValueError, ValidationError) as exc:
        raise UsageError(f"{option}: {one_line(exc)}") from None
    except OSError as exc:
        raise UsageError(f"{option}: {one_line(exc)}") from None


def check_output_path(path: Path | None, option: str) -> None:
    """Fail before a long run, not after it, when `path` cannot be written."""
    if path is None:
        return
    if path.is_dir():
        raise UsageError(f"{option}: {path} is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{option}: directory {parent} does not exist")

