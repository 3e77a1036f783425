"""Loaders for the public trace files in shared/traces (see its README for provenance).

- Mooncake FAST'25 JSONL: `{"timestamp": ms, "input_length": .., "output_length": .., ...}`.
  Timestamps come in ~3 s buckets; by default each bucket's requests are spread uniformly over
  the bucket (seeded, sorted draws), and the workload's notes say so.
- Azure LLM inference CSV: `TIMESTAMP,ContextTokens,GeneratedTokens`, wall-clock timestamps
  with 7 fractional digits, parsed exactly (integer nanoseconds) into seconds from the first.
- Length files (e.g. vidur's arXiv-summarization CSV): (prompt, output) pairs, no arrivals.

Every malformed input raises `TraceFormatError` with "PATH:LINE: what is wrong" (1-based line).
Only the fields a workload needs are read (Mooncake's `hash_ids` are ignored).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tetris.evaluation.workload import (
    MAX_TOKENS,
    FloatArray,
    IntArray,
    LengthSamples,
    TraceRequest,
    Workload,
)
from tetris.solver.input_files import (
    InputFileError,
    StrPath,
    cut,
    parse_json,
    read_text,
    shown,
)

if TYPE_CHECKING:
    from _csv import Reader as _CsvReader

AZURE_HEADER = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length")
#: Latest Mooncake timestamp (ms): beyond 2^53 a float second no longer holds every ms.
MAX_TIMESTAMP_MS = 2**53
_INT64_MAX = 2**63 - 1


class TraceFormatError(InputFileError):
    """A trace file that does not match its format: "PATH:LINE: what is wrong"."""


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.6g} s"


# --------------------------------------------------------------------------------------------
# Mooncake JSONL


def load_mooncake(path: StrPath, *, spread_buckets: bool = True, seed: int = 0) -> Workload:
    """A Mooncake JSONL trace; request ids are `mooncake-<0-based record index>`.

    With `spread_buckets`, the requests sharing timestamp t_i get sorted uniform draws
    (numpy `default_rng(seed)`) over [t_i, t_(i+1)), t_(i+1) the next distinct timestamp; the
    last bucket is as wide as the median gap. Without it, the batches are kept as they are.
    """
    path = Path(path)
    times_ms: list[int] = []
    prompts: list[int] = []
    outputs: list[int] = []
    lines: list[int] = []
    blank_at: int | None = None
    # Only "\n" ends a JSONL line: str.splitlines() would also split at U+2028 inside strings.
    text = read_text(path, TraceFormatError)
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            blank_at = blank_at or number
            continue
        if blank_at is not None:
            raise TraceFormatError(path, blank_at, "blank line before more records")
        record = parse_json(line, path, number, TraceFormatError)
        if not isinstance(record, dict):
            raise TraceFormatError(path, number, "a record must be a JSON object")
        values = []
        for field, low, high in zip(MOONCAKE_FIELDS, (0, 1, 1),
                                    (MAX_TIMESTAMP_MS, MAX_TOKENS, MAX_TOKENS), strict=True):
            if field not in record:
                raise TraceFormatError(path, number, f"missing field {field!r}")
            value = record[field]
            # bool is an int subclass in Python; true/false is not a token count.
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise TraceFormatError(path, number, f"{field} must be an integer in "
                                       f"[{low}, {high}], got {shown(value)}")
            values.append(value)
        times_ms.append(values[0])
        prompts.append(values[1])
        outputs.append(values[2])
        lines.append(number)
    if not times_ms:
        raise TraceFormatError(path, None, "no records")

    notes = [f"Mooncake JSONL {path.name}: {len(times_ms)} requests"]
    order = _stable_order(times_ms, lines, path, notes, unit_s=1e-3)
    stamps = np.asarray(times_ms, dtype=np.int64)[order]
    # Exact ms arithmetic for the buckets; seconds only at the end.
    distinct = np.unique(stamps)
    gaps = np.diff(distinct)
    if len(distinct) < 2:
        arrivals_s = stamps / 1000.0
        notes.append(f"one distinct timestamp ({len(stamps)} requests): no gap to spread over, "
                     "kept as one batch")
    elif spread_buckets:
        # Spread in seconds, not ms: dividing afterwards could round a time up to t_(i+1).
        arrivals_s = spread_bucket_times(stamps / 1000.0, np.random.default_rng(seed))
        notes.append(
            f"spread buckets: the requests of each of the {len(distinct)} distinct timestamps "
            f"t_i got sorted uniform draws (numpy default_rng({seed})) over [t_i, t_(i+1)) "
            f"(t_(i+1): the next distinct timestamp, gaps {gaps.min() / 1000:g} to "
            f"{gaps.max() / 1000:g} s); the last bucket is one median gap "
            f"({float(np.median(gaps)) / 1000:g} s) wide")
    else:
        arrivals_s = stamps / 1000.0
        notes.append(f"timestamps kept as {float(np.median(gaps)) / 1000:g} s batches "
                     f"({len(distinct)} distinct values; not spread)")
    prompt_arr = np.asarray(prompts, dtype=np.int64)[order]
    output_arr = np.asarray(outputs, dtype=np.int64)[order]
    requests = [
        TraceRequest(f"mooncake-{i}", t, p, o)
        for i, t, p, o in zip(order.tolist(), arrivals_s.tolist(), prompt_arr.tolist(),
                              output_arr.tolist(), strict=True)
    ]
    return Workload.from_requests(f"mooncake:{path.stem}", requests, notes)


def spread_bucket_times(stamps: FloatArray, rng: np.random.Generator) -> FloatArray:
    """Spread batched timestamps (non-decreasing, >= 2 distinct values) over their buckets.

    The records with timestamp t_i get sorted uniform draws over [t_i, t_(i+1)), t_(i+1) the
    next distinct timestamp; the last bucket is one median gap wide. Returns floats in the
    unit of `stamps`; the order of the records is kept.
    """
    distinct, bucket = np.unique(stamps, return_inverse=True)
    if len(distinct) < 2 or np.any(np.diff(stamps) < 0):
        raise ValueError("spread_bucket_times needs non-decreasing stamps with >= 2 values")
    gaps = np.diff(distinct)
    widths = np.append(gaps, np.median(gaps)).astype(np.float64)
    draws = rng.random(len(stamps))
    # Sort the draws within each bucket: `bucket` is non-decreasing along the records, so
    # lexsort by (bucket, draw) lines the sorted draws up with the records.
    draws = draws[np.lexsort((draws, bucket))]
    spread: FloatArray = distinct[bucket] + widths[bucket] * draws
    # u < 1 can still round up to the next timestamp; keep each time inside its bucket.
    upper = distinct[bucket] + widths[bucket]
    clamped: FloatArray = np.minimum(spread, np.nextafter(upper, -np.inf))
    return clamped


def _stable_order(times: Sequence[int], lines: Sequence[int], path: Path, notes: list[str],
                  unit_s: float) -> IntArray:
    """Indices that sort `times` stably; a note names the first line that goes back in time."""
    array = np.asarray(times, dtype=np.int64)
    backwards = np.flatnonzero(array[1:] < array[:-1])
    if len(backwards) == 0:
        return np.arange(len(array), dtype=np.int64)
    first = int(backwards[0]) + 1
    notes.append(
        f"{path.name}: timestamps not sorted ({len(backwards)} steps back in time, first at "
        f"line {lines[first]}, {_fmt_s(float(array[first - 1] - array[first]) * unit_s)} "
        "back); requests sorted stably by arrival")
    return np.argsort(array, kind="stable").astype(np.int64)


# --------------------------------------------------------------------------------------------
# Azure CSV

_AZURE_TIME = re.compile(
    r"\s*(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?\s*")
_NS_PER_S = 1_000_000_000
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


def parse_azure_timestamp(text: str) -> int:
    """`YYYY-MM-DD HH:MM:SS[.fffffff]` as integer nanoseconds since 1970-01-01 (no time zone).

    Hand-parsed: Python 3.11's fromisoformat takes at most 6 fractional digits, and float
    seconds would lose the trace's 100 ns resolution.
    """
    match = _AZURE_TIME.fullmatch(text)
    if match is None:
        raise ValueError(f"timestamp {shown(text)} is not YYYY-MM-DD HH:MM:SS[.fraction]")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction = match.group(7) or ""
    # datetime validates the calendar (month 13, Feb 30, hour 25 are errors).
    moment = dt.datetime(year, month, day, hour, minute, second)
    days = moment.toordinal() - _EPOCH_ORDINAL
    whole_s = days * 86_400 + hour * 3600 + minute * 60 + second
    return whole_s * _NS_PER_S + int(fraction.ljust(9, "0") or "0")


def load_azure(path: StrPath) -> Workload:
    """An Azure LLM inference CSV; arrivals are seconds since the earliest timestamp and
    request ids are `azure-<0-based data row index>`."""
    path = Path(path)
    stamps: list[int] = []
    prompts: list[int] = []
    outputs: list[int] = []
    lines: list[int] = []
    expected = ",".join(AZURE_HEADER)
    rows = _csv_rows(path, AZURE_HEADER, empty=f"empty file (expected header {expected})",
                     missing=lambda names, absent: f"header {','.join(names)!r} lacks "
                     f"{', '.join(absent)} (expected {expected})")
    for number, (stamp, prompt, output) in rows:
        try:
            stamps.append(parse_azure_timestamp(stamp))
        except ValueError as error:
            raise TraceFormatError(path, number, str(error)) from None
        if abs(stamps[-1] - stamps[0]) > _INT64_MAX:
            # Sorting is done in int64 nanoseconds: ±292 years around the first row.
            raise TraceFormatError(path, number, f"timestamp {stamp.strip()!r} is more than "
                                   "292 years from the first row's")
        prompts.append(_positive_int(prompt, AZURE_HEADER[1], path, number))
        outputs.append(_positive_int(output, AZURE_HEADER[2], path, number))
        lines.append(number)
    if not stamps:
        raise TraceFormatError(path, None, "no data rows")
    notes = [f"Azure CSV {path.name}: {len(stamps)} requests"]
    # Relative to the first row before going to int64: keeps any calendar date in range.
    relative = [stamp - stamps[0] for stamp in stamps]
    order = _stable_order(relative, lines, path, notes, unit_s=1e-9)
    origin = min(relative)
    requests = [
        TraceRequest(f"azure-{i}", (relative[i] - origin) / _NS_PER_S, prompts[i], outputs[i])
        for i in order.tolist()
    ]
    return Workload.from_requests(f"azure:{path.stem}", requests, notes)


def _csv_rows(path: Path, columns: Sequence[str], *, empty: str,
              missing: Callable[[list[str], list[str]], str]) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, the cells of `columns`) for each data row of a headed CSV.

    Blank lines are allowed only at the end (a trailing newline or two), anywhere else they
    are an error at the first blank line; every row must have the header's field count."""
    reader = csv.reader(io.StringIO(read_text(path, TraceFormatError, "utf-8-sig"), newline=""))
    header = _next_row(reader, path)
    if header is None:
        raise TraceFormatError(path, 1, empty)
    names = [name.strip() for name in header]
    absent = [c for c in columns if c not in names]
    if absent:
        raise TraceFormatError(path, 1, missing([cut(n) for n in names[:20]], absent))
    at = [names.index(c) for c in columns]
    blank_at: int | None = None
    while (row := _next_row(reader, path)) is not None:
        number = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            blank_at = blank_at or number
            continue
        if blank_at is not None:
            raise TraceFormatError(path, blank_at, "blank line before more rows")
        if len(row) != len(names):
            raise TraceFormatError(path, number, f"expected {len(names)} fields, "
                                   f"got {len(row)}")
        yield number, [row[i] for i in at]


def _next_row(reader: _CsvReader, path: Path) -> list[str] | None:
    try:
        return next(reader, None)
    except csv.Error as error:  # e.g. a field over csv's size limit, an open quote at the end
        raise TraceFormatError(path, reader.line_num or 1, f"not CSV: {error}") from None


def _positive_int(text: str, column: str, path: Path, line: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise TraceFormatError(path, line, f"{column} must be an integer, got {shown(text)}"
                               ) from None
    if value <= 0:
        raise TraceFormatError(path, line, f"{column} must be > 0, got {value}")
    if value > MAX_TOKENS:
        raise TraceFormatError(path, line, f"{column} must be <= {MAX_TOKENS}, got "
                               f"{cut(text.strip())}")
    return value


# --------------------------------------------------------------------------------------------
# Length files


def load_columns(path: StrPath, columns: Sequence[str]) -> list[IntArray]:
    """Integer columns (> 0 each) of a headed CSV, by name."""
    path = Path(path)
    values: list[list[int]] = [[] for _ in columns]
    rows = _csv_rows(path, columns, empty="empty file (expected a header row)",
                     missing=lambda names, absent: f"no column {', '.join(map(repr, absent))} "
                     f"in header {','.join(names)!r}")
    for number, cells in rows:
        for target, cell, column in zip(values, cells, columns, strict=True):
            target.append(_positive_int(cell, column, path, number))
    if not values or not values[0]:
        raise TraceFormatError(path, None, "no data rows")
    return [np.asarray(v, dtype=np.int64) for v in values]


def load_column(path: StrPath, column: str) -> IntArray:
    """One integer column (> 0) of a headed CSV."""
    return load_columns(path, [column])[0]


def load_lengths(path: StrPath, prompt_column: str = "num_prefill_tokens",
                 output_column: str = "num_decode_tokens") -> LengthSamples:
    """Empirical (prompt, output) pairs from a headed CSV (default: vidur's column names)."""
    prompt, output = load_columns(path, [prompt_column, output_column])
    return LengthSamples(prompt, output, f"{Path(path).name}[{prompt_column},{output_column}]")
