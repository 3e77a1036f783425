"""Trace files: Mooncake JSONL, Azure CSV, length files — small exact files and the real traces."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from tests.trace_files import (
    ARXIV,
    AZURE,
    AZURE_HEADER,
    LENGTH_HEADER,
    MOONCAKE,
    mooncake_line,
    small_mooncake,
    write_file,
)
from tetris.evaluation.trace_formats import (
    TraceFormatError,
    load_azure,
    load_lengths,
    load_mooncake,
    parse_azure_timestamp,
    spread_bucket_times,
)

# --------------------------------------------------------------------------------------------
# Mooncake JSONL



def test_spread_bucket_times_stays_in_buckets() -> None:
    """Spread times lie in [t_i, t_(i+1)) (last bucket: median gap), sorted, seed-determined."""
    stamps = np.array([0.0, 0.0, 0.0, 3.0, 3.0, 6.0, 6.0, 6.0, 6.0])
    spread = spread_bucket_times(stamps, np.random.default_rng(5))
    upper = np.array([3.0] * 3 + [6.0] * 2 + [9.0] * 4)
    assert np.all(spread >= stamps) and np.all(spread < upper)
    assert np.all(np.diff(spread) >= 0)
    again = spread_bucket_times(stamps, np.random.default_rng(5))
    assert np.array_equal(spread, again)
    assert not np.array_equal(spread, spread_bucket_times(stamps, np.random.default_rng(6)))


def test_load_mooncake_spread(tmp_path: Path) -> None:
    """Spread Mooncake arrivals land in their 3 s bucket, sorted, re-based, deterministic."""
    path = small_mooncake(tmp_path)
    w = load_mooncake(path, seed=1)
    expected = spread_bucket_times(np.array([0.0, 0.0, 3.0]), np.random.default_rng(1))
    assert [r.arrival_s for r in w.requests] == pytest.approx(list(expected - expected[0]))
    assert [r.request_id for r in w.requests] == ["mooncake-0", "mooncake-1", "mooncake-2"]
    assert [(r.prompt_tokens, r.output_tokens) for r in w.requests] == [
        (100, 10), (200, 20), (300, 30)]
    assert 0.0 <= expected[0] <= expected[1] < 3.0 <= expected[2] < 6.0
    assert any("spread buckets" in n and "default_rng(1)" in n for n in w.notes)
    assert load_mooncake(path, seed=1) == w
    assert load_mooncake(path, seed=2) != w


def test_load_mooncake_batches_kept(tmp_path: Path) -> None:
    """spread_buckets=False keeps the ms timestamps and says so in a note."""
    w = load_mooncake(small_mooncake(tmp_path), spread_buckets=False)
    assert [r.arrival_s for r in w.requests] == [0.0, 0.0, 3.0]
    assert any("kept as 3 s batches" in n for n in w.notes)
    assert w.name == "mooncake:m"


def test_load_mooncake_unsorted_is_sorted_with_note(tmp_path: Path) -> None:
    """Out-of-order timestamps are sorted stably and the first offending line is noted."""
    path = write_file(tmp_path, "m.jsonl", mooncake_line(3000, 1, 1) + mooncake_line(0, 2, 2)
                  + mooncake_line(3000, 3, 3))
    w = load_mooncake(path, spread_buckets=False)
    assert [r.request_id for r in w.requests] == ["mooncake-1", "mooncake-0", "mooncake-2"]
    assert any("first at line 2" in n for n in w.notes)


@pytest.mark.parametrize(("text", "line", "match"), [
    (mooncake_line(0, 5, 1) + mooncake_line(0, 5, 0), 2, "output_length must be"),
    (mooncake_line(0, 0, 1), 1, "input_length must be"),
    (mooncake_line(0, 5, 1) + mooncake_line(-1, 5, 1), 2, "timestamp must be"),
    (mooncake_line(0, 5, 1) * 2 + '{"timestamp": 1, "input_length": 5}\n', 3,
     "missing field 'output_length'"),
    ('{"timestamp": 1.5, "input_length": 5, "output_length": 1}\n', 1, "timestamp must be"),
    ('{"timestamp": 0, "input_length": true, "output_length": 1}\n', 1, "input_length"),
    (mooncake_line(0, 5, 1) + "{not json\n", 2, "not valid JSON"),
    ("[1, 2]\n", 1, "JSON object"),
    (mooncake_line(0, 5, 1) + "\n" + mooncake_line(0, 5, 1), 2, "blank line"),
])
def test_load_mooncake_errors(tmp_path: Path, text: str, line: int, match: str) -> None:
    """Each malformed Mooncake line gives TraceFormatError with PATH:LINE."""
    path = write_file(tmp_path, "bad.jsonl", text)
    with pytest.raises(TraceFormatError, match=match) as info:
        load_mooncake(path)
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert info.value.line == line


def test_load_mooncake_empty(tmp_path: Path) -> None:
    """A file without records is an error."""
    with pytest.raises(TraceFormatError, match="no records"):
        load_mooncake(write_file(tmp_path, "e.jsonl", "\n"))


def test_trace_format_error_pickles() -> None:
    """TraceFormatError survives pickling (sweep workers send errors across processes)."""
    error = pickle.loads(pickle.dumps(TraceFormatError("f.csv", 3, "bad")))
    assert str(error) == "f.csv:3: bad" and error.line == 3


# --------------------------------------------------------------------------------------------
# Azure CSV


def test_parse_azure_timestamp_exact() -> None:
    """7-digit fractions parse to exact 100 ns; calendar errors are rejected."""
    a = parse_azure_timestamp("2023-11-16 18:15:46.6805900")
    b = parse_azure_timestamp("2023-11-16 18:15:50.9951690")
    assert b - a == 4_314_579_000
    midnight = parse_azure_timestamp("2023-11-17 00:00:00.0000001")
    assert midnight - parse_azure_timestamp("2023-11-16 23:59:59.9999999") == 200
    assert parse_azure_timestamp("2023-11-16 18:15:46") == a - 680_590_000
    for bad in ("2023-13-01 00:00:00.0", "2023-11-16", "16/11/2023 18:15:46"):
        with pytest.raises(ValueError):
            parse_azure_timestamp(bad)


def test_load_azure_small(tmp_path: Path) -> None:
    """Azure rows become seconds since the first row; no trailing newline is fine."""
    path = write_file(tmp_path, "a.csv", AZURE_HEADER + "2023-11-16 18:15:46.6805900,374,44\n"
                  "2023-11-16 18:15:50.9951690,396,109\n2023-11-16 18:15:50.9951691,2,7")
    w = load_azure(path)
    assert [r.arrival_s for r in w.requests] == [0.0, 4.314579, 4.3145791]
    assert [r.request_id for r in w.requests] == ["azure-0", "azure-1", "azure-2"]
    assert [(r.prompt_tokens, r.output_tokens) for r in w.requests] == [
        (374, 44), (396, 109), (2, 7)]
    assert w.name == "azure:a"


def test_load_azure_unsorted_is_sorted_with_note(tmp_path: Path) -> None:
    """Azure rows going back in time are sorted stably, re-based, and the line is noted."""
    path = write_file(tmp_path, "a.csv", AZURE_HEADER + "2023-11-16 18:00:10.0,1,1\n"
                  "2023-11-16 18:00:05.5,2,2\n2023-11-16 18:00:10.0,3,3\n")
    w = load_azure(path)
    assert [r.request_id for r in w.requests] == ["azure-1", "azure-0", "azure-2"]
    assert [r.arrival_s for r in w.requests] == [0.0, 4.5, 4.5]
    assert any("first at line 3" in n and "4.5 s back" in n for n in w.notes)


@pytest.mark.parametrize(("text", "line", "match"), [
    ("TIMESTAMP,Context,GeneratedTokens\n", 1, "lacks ContextTokens"),
    ("", 1, "empty file"),
    (AZURE_HEADER + "2023-11-16 18:15:46.6,1,1\n2023-11-16 18:15:47.6,1\n", 3, "expected 3"),
    (AZURE_HEADER + "2023-11-16 18:15:46.6,abc,1\n", 2, "ContextTokens must be an integer"),
    (AZURE_HEADER + "2023-11-16 18:15:46.6,5,-1\n", 2, "GeneratedTokens must be > 0"),
    (AZURE_HEADER + "2023-11-16 18:15:46.6,0,3\n", 2, "ContextTokens must be > 0"),
    (AZURE_HEADER + "2023-11-16 18:15:46.6,5,1\nyesterday,5,1\n", 3, "timestamp"),
    (AZURE_HEADER + "2023-02-30 18:15:46.6,5,1\n", 2, "day is out of range"),
    (AZURE_HEADER + "2023-11-16 18:15:46.6,5,1\n\n2023-11-16 18:15:47.6,5,1\n", 3, "blank"),
])
def test_load_azure_errors(tmp_path: Path, text: str, line: int, match: str) -> None:
    """Each malformed Azure CSV gives TraceFormatError with PATH:LINE."""
    path = write_file(tmp_path, "bad.csv", text)
    with pytest.raises(TraceFormatError, match=match) as info:
        load_azure(path)
    assert str(info.value).startswith(f"{path}:{line}: ")


# --------------------------------------------------------------------------------------------
# Length files


def test_load_lengths_small(tmp_path: Path) -> None:
    """A vidur-style length CSV loads its prefill/decode columns as aligned pairs."""
    path = write_file(tmp_path, "l.csv", LENGTH_HEADER + "3772,54,3826,69.8\n1,5,6,0.2\n")
    samples = load_lengths(path)
    assert samples.prompt.tolist() == [3772, 1] and samples.output.tolist() == [54, 5]
    assert len(samples) == 2
    with pytest.raises(ValueError):
        samples.prompt[0] = 7  # read-only: shared between workloads


@pytest.mark.parametrize(("text", "line", "match"), [
    ("a,b\n1,2\n", 1, "no column 'num_prefill_tokens', 'num_decode_tokens'"),
    (LENGTH_HEADER + "3772,54,3826,69.8\n0,5,5,0\n", 3, "num_prefill_tokens must be > 0"),
    (LENGTH_HEADER + "3772,x,3826,69.8\n", 2, "num_decode_tokens must be an integer"),
    (LENGTH_HEADER + "3772,54\n", 2, "expected 4 fields"),
])
def test_load_lengths_errors(tmp_path: Path, text: str, line: int, match: str) -> None:
    """Each malformed length-file row gives TraceFormatError with PATH:LINE."""
    path = write_file(tmp_path, "bad.csv", text)
    with pytest.raises(TraceFormatError, match=match) as info:
        load_lengths(path)
    assert str(info.value).startswith(f"{path}:{line}: ")


# --------------------------------------------------------------------------------------------
# The real traces (skipped where shared/traces is absent)

needs_mooncake = pytest.mark.skipif(not MOONCAKE.is_file(), reason="Mooncake trace absent")
needs_azure = pytest.mark.skipif(not AZURE.is_file(), reason="Azure trace absent")


@needs_mooncake
def test_real_mooncake() -> None:
    """The Mooncake trace loads cleanly in < 1 s with the README's statistics."""
    started = time.perf_counter()
    spread = load_mooncake(MOONCAKE)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0
    batched = load_mooncake(MOONCAKE, spread_buckets=False)
    for w in (spread, batched):
        assert len(w) == 12_031
        assert w.summary()["prompt_mean"] == pytest.approx(12_035.1, abs=0.05)
    assert batched.duration_s == pytest.approx(3536.999, abs=1e-9)
    assert abs(spread.duration_s - 3536.999) < 3.003
    assert spread.scaled_to_rate(10.0).mean_rate_rps == pytest.approx(10.0, rel=1e-12)


@needs_azure
def test_real_azure() -> None:
    """The Azure trace loads cleanly with the README's count, span and mean input."""
    w = load_azure(AZURE)
    assert len(w) == 19_366
    assert w.duration_s == pytest.approx(3501.722, abs=1e-3)
    assert w.summary()["prompt_mean"] == pytest.approx(1154.7, abs=0.05)
    assert min(r.prompt_tokens for r in w.requests) == 2


@pytest.mark.skipif(not ARXIV.is_file(), reason="arXiv length file absent")
def test_real_arxiv_lengths() -> None:
    """The vidur arXiv length file has 28,257 valid rows."""
    samples = load_lengths(ARXIV)
    assert len(samples) == 28_257
    assert int(samples.prompt.min()) == 1
    assert int((samples.prompt + samples.output).max()) == 4096
