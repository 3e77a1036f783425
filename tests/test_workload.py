"""Workload type, synthetic generators and spec strings: small exact cases and properties."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.trace_files import (
    AZURE_HEADER,
    LENGTH_HEADER,
    small_mooncake,
    write_file,
)
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
    load_azure,
    load_mooncake,
)
from tetris.evaluation.workload import LengthSamples, TraceRequest, Workload
from tetris.evaluation.workload_spec import WorkloadSpecError, load_workload, parse_length


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
    moon = small_mooncake(tmp_path)
    azure = write_file(tmp_path, "a.csv", AZURE_HEADER + "2023-11-16 18:15:46.6805900,374,44\n")
    assert load_workload(str(moon), spread_buckets=False).name == "mooncake:m"
    assert load_workload(f"mooncake:{moon}", seed=4) == load_mooncake(moon, seed=4)
    assert load_workload(str(azure)) == load_workload(f"azure:{azure}") == load_azure(azure)
    lengths = write_file(tmp_path, "l.csv", LENGTH_HEADER + "3,4,7,0.75\n")
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
    lengths = write_file(tmp_path, "l.csv", LENGTH_HEADER + "100,7,107,14.3\n200,9,209,22.2\n")
    w = load_workload(f"synthetic:n=40,rate=1,prompt=empirical({lengths}),"
                      f"output=empirical({lengths};column=num_total_tokens)")
    assert {r.prompt_tokens for r in w.requests} <= {100, 200}
    assert {r.output_tokens for r in w.requests} <= {107, 209}
    paired = load_workload(f"synthetic:n=40,rate=1,paired={lengths}")
    assert {(r.prompt_tokens, r.output_tokens) for r in paired.requests} <= {(100, 7), (200, 9)}
    moon = small_mooncake(tmp_path)
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
