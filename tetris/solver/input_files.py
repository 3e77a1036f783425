"""Reading user-supplied files with errors that name the file, the line and the field.

Every loader of a user's file (trace files, `--requests` JSONL, `--config` JSON, calibration
JSON) reads through here, so a bad file is one `InputFileError` — "PATH:LINE: what is wrong",
a ValueError — and never an OSError, UnicodeDecodeError, RecursionError or a number that
overflows later. JSON is parsed strictly: NaN, Infinity and numbers beyond float range are
errors at their line (Python's json module would accept them as non-finite floats).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

from pydantic import ValidationError

StrPath = str | PathLike[str]
#: Longest quoted input in an error message: a 10 kB garbage field must not become the message.
SHOWN_CHARS = 40


class InputFileError(ValueError):
    """A user's file that cannot be used: "PATH:LINE: what is wrong" (LINE 1-based, optional)."""

    def __init__(self, path: StrPath, line: int | None, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[type[InputFileError], tuple[str, int | None, str]]:
        # The default pickling re-calls __init__ with the formatted message only.
        return (type(self), (self.path, self.line, self.problem))


def cut(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text`, cut to `limit` characters."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def shown(value: object) -> str:
    """`repr(value)`, cut to SHOWN_CHARS characters."""
    return cut(repr(value))


def _strerror(err: OSError) -> str:
    return err.strerror or type(err).__name__


def read_bytes(path: StrPath, error: type[InputFileError] = InputFileError) -> bytes:
    """The file's bytes; a directory, a missing or unreadable file is an `error`."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise error(path, None, f"cannot read: {_strerror(err)}") from None
    except ValueError:  # a NUL in the name: no such file can exist
        raise error(path, None, "cannot read: the name holds a NUL character") from None


def decode_text(data: bytes, path: StrPath, error: type[InputFileError] = InputFileError,
                encoding: str = "utf-8") -> str:
    """`data` as text; invalid UTF-8 is an `error` at the line of the first bad byte."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise error(path, line, f"not UTF-8 text (byte 0x{data[err.start]:02x} at column "
                    f"{column})") from None


def read_text(path: StrPath, error: type[InputFileError] = InputFileError,
              encoding: str = "utf-8") -> str:
    """The file as text (`utf-8-sig` also drops a byte-order mark), errors naming file:line."""
    return decode_text(read_bytes(path, error), path, error, encoding)


#: Integers longer than this are refused while parsing: no count, time or seed of ours comes
#: close, and Python's int() refuses 4300 digits with a message naming no field.
MAX_INT_DIGITS = 100


class _NumberError(ValueError):
    def __init__(self, literal: str, problem: str) -> None:
        super().__init__(problem)
        self.literal = literal


def _reject_constant(name: str) -> Any:
    raise _NumberError(name, f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NumberError(text, f"number {cut(text, 20)} is out of float range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _NumberError(text, f"integer {cut(text, 20)} has more than {MAX_INT_DIGITS} digits")
    return int(text)


def parse_json(text: str, path: StrPath, line: int | None = None,
               error: type[InputFileError] = InputFileError) -> Any:
    """One JSON document, strictly (no NaN/Infinity, finite floats). `line`: where `text` starts
    in the file (a JSONL line); else the error's own line in `text`."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                          parse_int=_bounded_int)
    except json.JSONDecodeError as err:
        where = err.lineno if line is None else line
        raise error(path, where, f"not valid JSON: {err.msg} (column {err.colno})") from None
    except RecursionError:
        raise error(path, line, "not valid JSON: nested too deeply") from None
    except _NumberError as err:
        # The hooks are not told where the number is: its first occurrence is a good guess
        # (only a string holding the same characters earlier would mislead it).
        found = line
        if found is None and err.literal in text:
            found = text.count("\n", 0, text.index(err.literal)) + 1
        raise error(path, found, f"not valid JSON: {err}") from None


def read_json(path: StrPath, error: type[InputFileError] = InputFileError) -> Any:
    """A whole JSON file (UTF-8, an optional byte-order mark), parsed strictly."""
    return parse_json(read_text(path, error, "utf-8-sig"), path, None, error)


def read_json_object(path: StrPath, error: type[InputFileError] = InputFileError
                     ) -> dict[str, Any]:
    """A JSON file that must hold one object."""
    data = read_json(path, error)
    if not isinstance(data, dict):
        raise error(path, None, f"expected a JSON object, got {json_type(data)}")
    return data


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _location(loc: Sequence[int | str]) -> str:
    return ".".join(str(part) for part in loc)


def describe_validation(err: ValidationError) -> str:
    """pydantic's multi-line report as one line, `field.sub: reason; ...`."""
    parts = []
    for item in err.errors(include_url=False):
        message = str(item["msg"])
        # A validator's own ValueError reads "Value error, <its message>": keep the message.
        for prefix in ("Value error, ", "Assertion failed, "):
            message = message.removeprefix(prefix)
        where = _location(item["loc"])
        parts.append(f"{where}: {message}" if where else message)
    return " ".join(("; ".join(parts) or str(err)).split())
