"""Workload layer: trace loaders, synthetic generators, time scaling and the spec dispatcher."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tetris.evaluation.synthetic import (
    Empirical,
    Fixed,
    LengthDistribution,
    LogNormal,
    Uniform,
    Zipf,
    constant_arrivals,
    gamma_arrivals,
    poisson_arrivals,
    synthetic_workload,
)
from tetris.evaluation.trace_formats import (
    TraceFormatError,
    load_azure,
    load_lengths,
    load_mooncake,
    parse_azure_timestamp,
    spread_bucket_times,
)
from tetris.evaluation.workload import (
    LengthSamples,
    TraceRequest,
    Workload,
    WorkloadSpecError,
    load_workload,
    parse_length,
)

TRACES = Path("/work/shared/traces")
MOONCAKE = TRACES / "mooncake_conversation_trace.jsonl"
AZURE = TRACES / "AzureLLMInferenceTrace_conv.csv"
ARXIV = TRACES / "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
LENGTH_HEADER = "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _mooncake_line(ts: int, inp: int, out: int) -> str:
    return (f'{{"timestamp": {ts}, "input_length": {inp}, "output_length": {out}, '
            f'"hash_ids": [0, 1]}}\n')


def _workload(arrivals: list[float], name: str = "w") -> Workload:
    return Workload.from_requests(
        name, [TraceRequest(f"r-{i}", t, 10 + i, 5) for i, t in enumerate(arrivals)])


# --------------------------------------------------------------------------------------------
# Workload data type


def test_trace_request_rejects_bad_values() -> None:
    """TraceRequest needs int token counts > 0 and a finite arrival."""
    with pytest.raises(ValueError, match="prompt_tokens"):
        TraceRequest("a", 0.0, 0, 1)
    with pytest.raises(ValueError, match="output_tokens"):
        TraceRequest("a", 0.0, 1, -3)
    with pytest.raises(ValueError, match="output_tokens"):
        TraceRequest("a", 0.0, 1, 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        TraceRequest("a", float("nan"), 1, 1)


def test_from_requests_sorts_stably_and_rebases() -> None:
    """from_requests sorts by arrival keeping ties in input order and shifts the first to 0."""
    w = Workload.from_requests("w", [TraceRequest("b", 7.0, 1, 1), TraceRequest("a", 5.0, 1, 1),
                                     TraceRequest("c", 5.0, 1, 1)])
    assert [r.request_id for r in w.requests] == ["a", "c", "b"]
    assert [r.arrival_s for r in w.requests] == [0.0, 0.0, 2.0]
    assert any("re-based" in note for note in w.notes)


def test_workload_constructor_checks_invariants() -> None:
    """The plain constructor rejects unsorted, un-rebased or duplicate-id request tuples."""
    a, b = TraceRequest("a", 0.0, 1, 1), TraceRequest("b", 1.0, 1, 1)
    with pytest.raises(ValueError, match="before"):
        Workload("w", (a, b, TraceRequest("c", 0.5, 1, 1)))
    with pytest.raises(ValueError, match="first arrival"):
        Workload("w", (b,))
    with pytest.raises(ValueError, match="unique"):
        Workload("w", (a, TraceRequest("a", 2.0, 1, 1)))
    assert len(Workload("w", (a, b))) == 2


def test_duration_and_mean_rate() -> None:
    """duration is last minus first arrival; mean rate is requests / duration."""
    w = _workload([0.0, 1.0, 4.0])
    assert w.duration_s == 4.0
    assert w.mean_rate_rps == 3 / 4


def test_mean_rate_undefined_raises() -> None:
    """mean_rate_rps raises for fewer than 2 requests or zero duration."""
    for w in (_workload([]), _workload([3.0]), _workload([1.0, 1.0])):
        with pytest.raises(ValueError, match="mean rate undefined"):
            _ = w.mean_rate_rps
    assert _workload([]).duration_s == 0.0


def test_scaled_to_rate_is_exact_and_noted() -> None:
    """scaled_to_rate hits the requested mean rate and records the factor in the notes."""
    w = _workload([0.0, 1.0, 4.0]).scaled_to_rate(1.5)
    assert w.mean_rate_rps == pytest.approx(1.5, rel=1e-12)
    assert [r.arrival_s for r in w.requests] == pytest.approx([0.0, 0.5, 2.0])
    assert w.notes[-1].startswith("time-scaled ×0.5 to 1.5 req/s")


@pytest.mark.parametrize("rate", [0.0, -1.0, float("inf"), float("nan")])
def test_scaled_to_rate_rejects_bad_rate(rate: float) -> None:
    """scaled_to_rate needs a finite rate > 0 and names the parameter."""
    with pytest.raises(ValueError, match="rate_rps"):
        _workload([0.0, 1.0]).scaled_to_rate(rate)


def test_time_scaled_head_window() -> None:
    """time_scaled multiplies arrivals; head truncates; window keeps [start, end) re-based."""
    w = _workload([0.0, 1.0, 2.0, 3.0, 4.0])
    assert [r.arrival_s for r in w.time_scaled(2.0).requests] == [0, 2, 4, 6, 8]
    with pytest.raises(ValueError, match="factor"):
        w.time_scaled(0.0)
    head = w.head(2)
    assert [r.request_id for r in head.requests] == ["r-0", "r-1"]
    assert "first 2 of 5" in head.notes[-1]
    assert w.head(9) is w
    win = w.window(1.0, 3.0)
    assert [r.request_id for r in win.requests] == ["r-1", "r-2"]
    assert [r.arrival_s for r in win.requests] == [0.0, 1.0]
    assert "window [1, 3) s: 2 of 5" in win.notes[-1]
    assert len(w.window(10.0, 20.0)) == 0
    with pytest.raises(ValueError, match="window"):
        w.window(3.0, 1.0)


_arrival_lists = st.lists(st.floats(0.0, 1e5, allow_nan=False), min_size=0, max_size=40)


@settings(max_examples=60, deadline=None)
@given(_arrival_lists, st.floats(1e-3, 1e3))
def test_scaled_to_rate_round_trip(arrivals: list[float], rate: float) -> None:
    """Property: scaling to a rate gives that rate, and scaling back restores the arrivals."""
    w = _workload(arrivals)
    assume(len(w) >= 2 and w.duration_s > 1e-6)
    scaled = w.scaled_to_rate(rate)
    assert scaled.mean_rate_rps == pytest.approx(rate, rel=1e-9)
    back = scaled.scaled_to_rate(w.mean_rate_rps)
    assert [r.arrival_s for r in back.requests] == pytest.approx(
        [r.arrival_s for r in w.requests], rel=1e-9, abs=1e-9)
    assert [r.request_id for r in back.requests] == [r.request_id for r in w.requests]


@settings(max_examples=60, deadline=None)
@given(_arrival_lists, st.floats(0.0, 1e5), st.floats(0.0, 1e5), st.integers(0, 50))
def test_window_and_head_invariants(arrivals: list[float], a: float, b: float, n: int) -> None:
    """Property: window keeps exactly the requests in [start, end), sorted, first at 0, with
    gaps preserved; head(n) is a prefix of length min(n, len)."""
    w = _workload(arrivals)
    start, end = min(a, b), max(a, b)
    win = w.window(start, end)
    inside = [r for r in w.requests if start <= r.arrival_s < end]
    assert [r.request_id for r in win.requests] == [r.request_id for r in inside]
    if inside:
        assert win.requests[0].arrival_s == 0.0
        shift = inside[0].arrival_s
        assert [r.arrival_s for r in win.requests] == [r.arrival_s - shift for r in inside]
    head = w.head(n)
    assert head.requests == w.requests[:n]


# --------------------------------------------------------------------------------------------
# Mooncake JSONL


def _small_mooncake(tmp_path: Path) -> Path:
    # Two buckets: 0 ms (two requests), 3000 ms (one request); trailing blank lines allowed.
    return _write(tmp_path, "m.jsonl", _mooncake_line(0, 100, 10) + _mooncake_line(0, 200, 20)
                  + _mooncake_line(3000, 300, 30) + "\n\n")


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
    path = _small_mooncake(tmp_path)
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
    w = load_mooncake(_small_mooncake(tmp_path), spread_buckets=False)
    assert [r.arrival_s for r in w.requests] == [0.0, 0.0, 3.0]
    assert any("kept as 3 s batches" in n for n in w.notes)
    assert w.name == "mooncake:m"


def test_load_mooncake_unsorted_is_sorted_with_note(tmp_path: Path) -> None:
    """Out-of-order timestamps are sorted stably and the first offending line is noted."""
    path = _write(tmp_path, "m.jsonl", _mooncake_line(3000, 1, 1) + _mooncake_line(0, 2, 2)
                  + _mooncake_line(3000, 3, 3))
    w = load_mooncake(path, spread_buckets=False)
    assert [r.request_id for r in w.requests] == ["mooncake-1", "mooncake-0", "mooncake-2"]
    assert any("first at line 2" in n for n in w.notes)


@pytest.mark.parametrize(("text", "line", "match"), [
    (_mooncake_line(0, 5, 1) + _mooncake_line(0, 5, 0), 2, "output_length must be"),
    (_mooncake_line(0, 0, 1), 1, "input_length must be"),
    (_mooncake_line(0, 5, 1) + _mooncake_line(-1, 5, 1), 2, "timestamp must be"),
    (_mooncake_line(0, 5, 1) * 2 + '{"timestamp": 1, "input_length": 5}\n', 3,
     "missing field 'output_length'"),
    ('{"timestamp": 1.5, "input_length": 5, "output_length": 1}\n', 1, "timestamp must be"),
    ('{"timestamp": 0, "input_length": true, "output_length": 1}\n', 1, "input_length"),
    (_mooncake_line(0, 5, 1) + "{not json\n", 2, "not JSON"),
    ("[1, 2]\n", 1, "JSON object"),
    (_mooncake_line(0, 5, 1) + "\n" + _mooncake_line(0, 5, 1), 2, "blank line"),
])
def test_load_mooncake_errors(tmp_path: Path, text: str, line: int, match: str) -> None:
    """Each malformed Mooncake line gives TraceFormatError with PATH:LINE."""
    path = _write(tmp_path, "bad.jsonl", text)
    with pytest.raises(TraceFormatError, match=match) as info:
        load_mooncake(path)
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert info.value.line == line


def test_load_mooncake_empty(tmp_path: Path) -> None:
    """A file without records is an error."""
    with pytest.raises(TraceFormatError, match="no records"):
        load_mooncake(_write(tmp_path, "e.jsonl", "\n"))


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
    path = _write(tmp_path, "a.csv", AZURE_HEADER + "2023-11-16 18:15:46.6805900,374,44\n"
                  "2023-11-16 18:15:50.9951690,396,109\n2023-11-16 18:15:50.9951691,2,7")
    w = load_azure(path)
    assert [r.arrival_s for r in w.requests] == [0.0, 4.314579, 4.3145791]
    assert [r.request_id for r in w.requests] == ["azure-0", "azure-1", "azure-2"]
    assert [(r.prompt_tokens, r.output_tokens) for r in w.requests] == [
        (374, 44), (396, 109), (2, 7)]
    assert w.name == "azure:a"


def test_load_azure_unsorted_is_sorted_with_note(tmp_path: Path) -> None:
    """Azure rows going back in time are sorted stably, re-based, and the line is noted."""
    path = _write(tmp_path, "a.csv", AZURE_HEADER + "2023-11-16 18:00:10.0,1,1\n"
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
    path = _write(tmp_path, "bad.csv", text)
    with pytest.raises(TraceFormatError, match=match) as info:
        load_azure(path)
    assert str(info.value).startswith(f"{path}:{line}: ")


# --------------------------------------------------------------------------------------------
# Length files


def test_load_lengths_small(tmp_path: Path) -> None:
    """A vidur-style length CSV loads its prefill/decode columns as aligned pairs."""
    path = _write(tmp_path, "l.csv", LENGTH_HEADER + "3772,54,3826,69.8\n1,5,6,0.2\n")
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
    path = _write(tmp_path, "bad.csv", text)
    with pytest.raises(TraceFormatError, match=match) as info:
        load_lengths(path)
    assert str(info.value).startswith(f"{path}:{line}: ")


# --------------------------------------------------------------------------------------------
# Synthetic arrivals and lengths


def _cv(arrivals: np.ndarray) -> float:
    gaps = np.diff(arrivals)
    return float(gaps.std() / gaps.mean())


def test_poisson_arrivals_rate() -> None:
    """Poisson arrivals over 20k requests have the mean rate within 3 % and CV ≈ 1."""
    times = poisson_arrivals(20_000, 4.0, np.random.default_rng(0))
    assert times[0] == 0.0 and np.all(np.diff(times) >= 0)
    assert len(times) / times[-1] == pytest.approx(4.0, rel=0.03)
    assert _cv(times) == pytest.approx(1.0, rel=0.05)


def test_gamma_arrivals_cv() -> None:
    """Gamma arrivals with cv=2 over 20k requests have CV within 5 % and the right rate."""
    times = gamma_arrivals(20_000, 3.0, 2.0, np.random.default_rng(0))
    assert _cv(times) == pytest.approx(2.0, rel=0.05)
    assert len(times) / times[-1] == pytest.approx(3.0, rel=0.05)
    with pytest.raises(ValueError, match="cv"):
        gamma_arrivals(5, 1.0, 0.0, np.random.default_rng(0))


def test_constant_arrivals_exact() -> None:
    """Constant arrivals are exactly 1/rate apart."""
    assert constant_arrivals(4, 2.0).tolist() == [0.0, 0.5, 1.0, 1.5]
    with pytest.raises(ValueError, match="rate"):
        constant_arrivals(4, 0.0)


@pytest.mark.parametrize("dist", [
    Zipf(1.2, 128, 4096), Zipf(0.5, 1, 10), LogNormal(8000, 1.0, 128, 131072),
    LogNormal(100, 2.0, 50, 60), Uniform(100, 500), Uniform(7, 7), Fixed(42),
])
def test_length_distributions_respect_bounds(dist: LengthDistribution) -> None:
    """Every distribution returns n int64 values inside its [min, max]."""
    values = dist.sample(np.random.default_rng(0), 5000)
    assert values.dtype == np.int64 and values.shape == (5000,)
    low, high = {Zipf: lambda d: (d.min, d.max), LogNormal: lambda d: (d.min, d.max),
                 Uniform: lambda d: (d.lo, d.hi),
                 Fixed: lambda d: (d.tokens, d.tokens)}[type(dist)](dist)
    assert values.min() >= low and values.max() <= high
    assert isinstance(dist, LengthDistribution)


def test_length_distribution_shapes() -> None:
    """Zipf follows k^-a, lognormal has its median, uniform hits both ends."""
    rng = np.random.default_rng(1)
    zipf = Zipf(1.0, 1, 100).sample(rng, 50_000)
    assert np.mean(zipf == 1) / np.mean(zipf == 2) == pytest.approx(2.0, rel=0.05)
    lognormal = LogNormal(8000, 0.5).sample(rng, 20_000)
    assert np.median(lognormal) == pytest.approx(8000, rel=0.03)
    uniform = Uniform(3, 5).sample(rng, 3000)
    assert set(uniform.tolist()) == {3, 4, 5}
    empirical = Empirical(np.array([5, 9], dtype=np.int64)).sample(rng, 100)
    assert set(empirical.tolist()) == {5, 9}


@pytest.mark.parametrize(("build", "match"), [
    (lambda: Zipf(0.0, 1, 10), "a must be"), (lambda: Zipf(1.0, 10, 5), "max"),
    (lambda: LogNormal(-1.0, 1.0), "median"), (lambda: LogNormal(10.0, 1.0, 0), "min"),
    (lambda: Uniform(0, 3), "lo"), (lambda: Fixed(0), "tokens"),
])
def test_length_distribution_validation(build: object, match: str) -> None:
    """Bad distribution parameters raise ValueError naming them."""
    with pytest.raises(ValueError, match=match):
        build()  # type: ignore[operator]


def test_lognormal_without_mass_in_bounds_raises() -> None:
    """A lognormal with (almost) no mass in [min, max] fails instead of looping."""
    with pytest.raises(ValueError, match="mass"):
        LogNormal(10, 0.1, 10_000, 20_000).sample(np.random.default_rng(0), 100)


def test_synthetic_workload_deterministic_and_independent_streams() -> None:
    """Same seed, same workload; changing a length distribution leaves arrivals unchanged."""
    a = synthetic_workload(200, 2.0, prompt=Uniform(1, 100), output=Fixed(5), seed=3)
    b = synthetic_workload(200, 2.0, prompt=Uniform(1, 100), output=Fixed(5), seed=3)
    c = synthetic_workload(200, 2.0, prompt=Fixed(9), output=Uniform(1, 9), seed=3)
    assert a == b
    assert [r.arrival_s for r in a.requests] == [r.arrival_s for r in c.requests]
    assert a.requests[0].request_id == "syn-0" and a.requests[0].arrival_s == 0.0
    assert "Poisson arrivals at 2 req/s (seed 3)" in a.notes[0]


def test_synthetic_paired_keeps_rows() -> None:
    """With paired samples, every request is one whole (prompt, output) row."""
    pairs = LengthSamples(np.array([10, 2000, 30], dtype=np.int64),
                          np.array([1, 2, 3], dtype=np.int64), "pairs")
    w = synthetic_workload(300, 5.0, arrival="gamma", cv=3.0, paired=pairs)
    rows = {(10, 1), (2000, 2), (30, 3)}
    assert {(r.prompt_tokens, r.output_tokens) for r in w.requests} == rows
    with pytest.raises(ValueError, match="either paired"):
        synthetic_workload(3, 1.0, paired=pairs, prompt=Fixed(1))
    with pytest.raises(ValueError, match="need prompt and output"):
        synthetic_workload(3, 1.0, prompt=Fixed(1))


# --------------------------------------------------------------------------------------------
# Spec strings


def test_load_workload_autodetects(tmp_path: Path) -> None:
    """A bare PATH is loaded by suffix/header; kind prefixes pick the loader explicitly."""
    moon = _small_mooncake(tmp_path)
    azure = _write(tmp_path, "a.csv", AZURE_HEADER + "2023-11-16 18:15:46.6805900,374,44\n")
    assert load_workload(str(moon), spread_buckets=False).name == "mooncake:m"
    assert load_workload(f"mooncake:{moon}", seed=4) == load_mooncake(moon, seed=4)
    assert load_workload(str(azure)) == load_workload(f"azure:{azure}") == load_azure(azure)
    lengths = _write(tmp_path, "l.csv", LENGTH_HEADER + "3,4,7,0.75\n")
    with pytest.raises(WorkloadSpecError, match="paired="):
        load_workload(str(lengths))
    with pytest.raises(WorkloadSpecError, match="unknown kind 'burstgpt'"):
        load_workload("burstgpt:x.csv")
    with pytest.raises(FileNotFoundError):
        load_workload(f"mooncake:{tmp_path / 'missing.jsonl'}")


def test_load_workload_synthetic_spec() -> None:
    """The documented example spec parses into the intended generator settings."""
    spec = ("synthetic:n=1000,rate=2,arrival=gamma,cv=2,prompt=lognormal(median=8000;sigma=1;"
            "min=128;max=131072),output=uniform(lo=100;hi=500),seed=3")
    w = load_workload(spec)
    direct = synthetic_workload(1000, 2.0, arrival="gamma", cv=2.0,
                                prompt=LogNormal(8000, 1.0, 128, 131072),
                                output=Uniform(100, 500), seed=3)
    assert w.requests == direct.requests
    assert w.notes[0] == f"spec: {spec}"
    assert all(128 <= r.prompt_tokens <= 131072 for r in w.requests)
    # The seed argument applies when the spec has none; commas work inside parentheses.
    plain = "synthetic:n=50,rate=1,prompt=zipf(a=1.2,min=10,max=99),output=fixed(3)"
    assert load_workload(plain, seed=7).requests == load_workload(plain + ",seed=7").requests
    assert load_workload(plain, seed=7).requests != load_workload(plain, seed=8).requests


def test_load_workload_empirical(tmp_path: Path) -> None:
    """empirical(PATH) picks the role's column; paired=PATH samples whole rows."""
    lengths = _write(tmp_path, "l.csv", LENGTH_HEADER + "100,7,107,14.3\n200,9,209,22.2\n")
    w = load_workload(f"synthetic:n=40,rate=1,prompt=empirical({lengths}),"
                      f"output=empirical({lengths};column=num_total_tokens)")
    assert {r.prompt_tokens for r in w.requests} <= {100, 200}
    assert {r.output_tokens for r in w.requests} <= {107, 209}
    paired = load_workload(f"synthetic:n=40,rate=1,paired={lengths}")
    assert {(r.prompt_tokens, r.output_tokens) for r in paired.requests} <= {(100, 7), (200, 9)}
    moon = _small_mooncake(tmp_path)
    dist = parse_length(f"empirical({moon})", "output")
    assert set(dist.sample(np.random.default_rng(0), 50).tolist()) <= {10, 20, 30}


@pytest.mark.parametrize(("spec", "match"), [
    ("synthetic:rate=1,prompt=fixed(1),output=fixed(1)", "missing n"),
    ("synthetic:n=5,rate=1,prompt=fixed(1)", "needs prompt= and output="),
    ("synthetic:n=5,rate=1,burst=3,prompt=fixed(1),output=fixed(1)", "unknown key 'burst'"),
    ("synthetic:n=5,rate=fast,prompt=fixed(1),output=fixed(1)", "rate=fast"),
    ("synthetic:n=5,rate=1,prompt=fixed(1),output=fixed(1),n=6", "'n' given twice"),
    ("synthetic:n=5,rate=1,arrival=weibull,prompt=fixed(1),output=fixed(1)", "weibull"),
    ("synthetic:n=5,rate=1,cv=2,prompt=fixed(1),output=fixed(1)", "cv applies"),
    ("synthetic:n=5,rate=1,prompt=pareto(a=1),output=fixed(1)", "unknown length.*'pareto'"),
    ("synthetic:n=5,rate=1,prompt=uniform(lo=5),output=fixed(1)", r"'uniform\(lo=5\)': missing"),
    ("synthetic:n=5,rate=1,prompt=uniform(lo=9;hi=2),output=fixed(1)", "uniform\\(lo=9;hi=2\\)"),
    ("synthetic:n=5,rate=1,prompt=zipf(a=1;max=9;b=2),output=fixed(1)", "unknown key 'b'"),
    ("synthetic:n=5,rate=1,prompt=lognormal(median=1;sigma=1,output=fixed(1)", "unbalanced"),
    ("synthetic:n=5,rate=-1,prompt=fixed(1),output=fixed(1)", "rate must be"),
    ("synthetic:n=5,rate=1,prompt,output=fixed(1)", "'prompt' is not KEY=VALUE"),
    ("synthetic:n=2.5,rate=1,prompt=fixed(1),output=fixed(1)", "not an integer"),
])
def test_load_workload_spec_errors(spec: str, match: str) -> None:
    """Bad synthetic specs raise WorkloadSpecError naming the offending part."""
    with pytest.raises(WorkloadSpecError, match=match):
        load_workload(spec)


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
