"""Synthetic workloads: arrival processes and token-length distributions.

Arrivals are renewal processes whose inter-arrival gaps have mean 1/rate: exponential (Poisson),
gamma with a given coefficient of variation (cv > 1 is burstier than Poisson, cv < 1 smoother),
or constant. Lengths come from a `LengthDistribution`, or jointly from empirical (prompt,
output) pairs so that their correlation is kept.

Arrivals, prompt lengths and output lengths draw from independent child streams of one
`numpy.random.SeedSequence(seed)`: changing the length distribution does not move the arrivals,
so sweeps over one factor keep the others fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from tetris.evaluation.workload import (
    MAX_TOKENS,
    FloatArray,
    IntArray,
    LengthSamples,
    TraceRequest,
    Workload,
)

ARRIVALS = ("poisson", "gamma", "constant")
#: Most requests one synthetic workload may have (each is a Python object: ~10^7 is GBs).
MAX_REQUESTS = 10**7
#: Gamma coefficients of variation allowed: outside, shape 1/cv² or the gap scale under- or
#: overflows a float (cv = 1e-300 divides by zero).
CV_RANGE = (1e-3, 1e3)

#: Largest [min, max] range Zipf tabulates (its pmf is one float per integer in the range).
ZIPF_MAX_RANGE = 1 << 22


@runtime_checkable
class LengthDistribution(Protocol):
    """Token counts >= 1; `spec()` is the distribution in `load_workload`'s LENGTH grammar."""

    def sample(self, rng: np.random.Generator, n: int) -> IntArray: ...

    def spec(self) -> str: ...


def _check_bounds(name: str, low: int, high: int | None) -> None:
    if not 1 <= low <= MAX_TOKENS:
        raise ValueError(f"{name}: min must be in [1, {MAX_TOKENS}], got {low}")
    if high is not None and not low <= high <= MAX_TOKENS:
        raise ValueError(f"{name}: max must be in [min ({low}), {MAX_TOKENS}], got {high}")


@dataclass(frozen=True, slots=True)
class Fixed:
    """Every request has `tokens` tokens."""

    tokens: int

    def __post_init__(self) -> None:
        if not 1 <= self.tokens <= MAX_TOKENS:
            raise ValueError(f"fixed: tokens must be in [1, {MAX_TOKENS}], got {self.tokens}")

    def sample(self, rng: np.random.Generator, n: int) -> IntArray:
        return np.full(n, self.tokens, dtype=np.int64)

    def spec(self) -> str:
        return f"fixed({self.tokens})"


@dataclass(frozen=True, slots=True)
class Uniform:
    """Integers uniform on [lo, hi], both included."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not 1 <= self.lo <= self.hi <= MAX_TOKENS:
            raise ValueError(f"uniform: need 1 <= lo <= hi <= {MAX_TOKENS}, got lo={self.lo}, "
                             f"hi={self.hi}")

    def sample(self, rng: np.random.Generator, n: int) -> IntArray:
        values: IntArray = rng.integers(self.lo, self.hi, size=n, endpoint=True, dtype=np.int64)
        return values

    def spec(self) -> str:
        return f"uniform(lo={self.lo};hi={self.hi})"


@dataclass(frozen=True, slots=True)
class Zipf:
    """Truncated discrete power law: P(k) ∝ k^-a for integers k in [min, max].

    Sampled exactly by inverse CDF over the tabulated pmf (any a > 0 works, unlike
    numpy's zipf, which needs a > 1 and has no upper bound).
    """

    a: float
    min: int
    max: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.a) and self.a > 0):
            raise ValueError(f"zipf: a must be > 0, got {self.a}")
        _check_bounds("zipf", self.min, self.max)
        if self.max - self.min + 1 > ZIPF_MAX_RANGE:
            raise ValueError(f"zipf: range [{self.min}, {self.max}] has more than "
                             f"{ZIPF_MAX_RANGE} values")

    def sample(self, rng: np.random.Generator, n: int) -> IntArray:
        support = np.arange(self.min, self.max + 1, dtype=np.float64)
        # Powers relative to the smallest k: k^-a underflows for large k otherwise.
        weights = (support / self.min) ** -self.a
        cdf = np.cumsum(weights)
        index = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
        # side="right" cannot pass the last index for draws < cdf[-1]; clip guards rounding.
        values: IntArray = (self.min + np.minimum(index, len(cdf) - 1)).astype(np.int64)
        return values

    def spec(self) -> str:
        return f"zipf(a={self.a:g};min={self.min};max={self.max})"


@dataclass(frozen=True, slots=True)
class LogNormal:
    """exp(N(ln median, sigma²)) rounded to an integer, truncated to [min, max] by rejection
    (not clipped: clipping would pile the tail's mass onto max)."""

    median: float
    sigma: float
    min: int = 1
    max: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.median) and self.median > 0):
            raise ValueError(f"lognormal: median must be > 0, got {self.median}")
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"lognormal: sigma must be >= 0, got {self.sigma}")
        _check_bounds("lognormal", self.min, self.max)

    def sample(self, rng: np.random.Generator, n: int) -> IntArray:
        # Never above MAX_TOKENS: an unbounded draw can be inf, which has no int64.
        high = MAX_TOKENS if self.max is None else self.max
        out = np.empty(n, dtype=np.int64)
        filled = 0
        drawn = 0
        mu = math.log(self.median)
        while filled < n:
            # Oversample by the observed acceptance so tight bounds do not take many rounds.
            acceptance = filled / drawn if drawn else 1.0
            batch = int(1.2 * (n - filled) / max(acceptance, 1e-3)) + 64
            values = np.rint(rng.lognormal(mu, self.sigma, size=batch))
            kept = values[(values >= self.min) & (values <= high)]
            take = min(len(kept), n - filled)
            out[filled:filled + take] = kept[:take]
            filled += take
            drawn += batch
            if filled < n and drawn > 1000 * n + 100_000 and filled < drawn * 1e-3:
                raise ValueError(f"{self.spec()}: under 0.1 % of the mass lies in "
                                 f"[{self.min}, {high}]")
        return out

    def spec(self) -> str:
        bounds = f";min={self.min}" + ("" if self.max is None else f";max={self.max}")
        return f"lognormal(median={self.median:g};sigma={self.sigma:g}{bounds})"


@dataclass(frozen=True, eq=False)
class Empirical:
    """Resampling with replacement from observed token counts."""

    values: IntArray
    source: str = field(default="empirical")

    def __post_init__(self) -> None:
        if self.values.ndim != 1 or len(self.values) == 0:
            raise ValueError(f"{self.source}: needs a non-empty 1-D array of counts")
        if int(self.values.min()) < 1 or int(self.values.max()) > MAX_TOKENS:
            raise ValueError(f"{self.source}: counts must be in [1, {MAX_TOKENS}]")

    def sample(self, rng: np.random.Generator, n: int) -> IntArray:
        return rng.choice(self.values, size=n, replace=True).astype(np.int64)

    def spec(self) -> str:
        return self.source


# --------------------------------------------------------------------------------------------
# Arrival processes: every function returns n sorted times with the first at 0.


def _check_rate(n: int, rate_rps: float) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not (math.isfinite(rate_rps) and rate_rps > 0):
        raise ValueError(f"rate must be a finite number > 0 req/s, got {rate_rps}")
    # 100 × the mean span leaves room for the exponential tail of a Poisson draw.
    if not math.isfinite(100.0 * max(n, 1) / rate_rps):
        raise ValueError(f"rate {rate_rps} req/s is too low: {n} arrivals overflow float seconds")


def _from_gaps(gaps: FloatArray) -> FloatArray:
    return np.concatenate(([0.0], np.cumsum(gaps)))


def poisson_arrivals(n: int, rate_rps: float, rng: np.random.Generator) -> FloatArray:
    """n arrival times of a Poisson process of `rate_rps`: exponential gaps, first at 0."""
    _check_rate(n, rate_rps)
    if n == 0:
        return np.empty(0)
    return _from_gaps(rng.exponential(1.0 / rate_rps, size=n - 1))


def gamma_arrivals(n: int, rate_rps: float, cv: float, rng: np.random.Generator) -> FloatArray:
    """n arrival times with gamma gaps of mean 1/rate and coefficient of variation `cv`
    (shape 1/cv²; cv = 1 is Poisson), first at 0."""
    _check_rate(n, rate_rps)
    if not CV_RANGE[0] <= cv <= CV_RANGE[1]:
        raise ValueError(f"cv must be in [{CV_RANGE[0]:g}, {CV_RANGE[1]:g}], got {cv}")
    if n == 0:
        return np.empty(0)
    shape = 1.0 / (cv * cv)
    return _from_gaps(rng.gamma(shape, 1.0 / (rate_rps * shape), size=n - 1))


def constant_arrivals(n: int, rate_rps: float) -> FloatArray:
    """n arrivals exactly 1/rate apart, first at 0."""
    _check_rate(n, rate_rps)
    return np.arange(n, dtype=np.float64) / rate_rps


def synthetic_workload(
    n_requests: int,
    rate_rps: float,
    *,
    arrival: str = "poisson",
    cv: float = 1.0,
    prompt: LengthDistribution | None = None,
    output: LengthDistribution | None = None,
    seed: int = 0,
    paired: LengthSamples | None = None,
) -> Workload:
    """`n_requests` requests with ids `syn-<i>` (in arrival order).

    Lengths come from `prompt` and `output` independently, or, with `paired`, from whole
    (prompt, output) rows drawn with replacement (then `prompt`/`output` must be None). The
    realised mean rate differs from `rate_rps` by sampling noise; call `scaled_to_rate` for
    an exact one.
    """
    if not 1 <= n_requests <= MAX_REQUESTS:
        raise ValueError(f"n_requests must be in [1, {MAX_REQUESTS}], got {n_requests}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if paired is not None and (prompt is not None or output is not None):
        raise ValueError("give either paired or prompt and output, not both")
    if paired is None and (prompt is None or output is None):
        raise ValueError("need prompt and output length distributions (or paired samples)")
    arrival_rng, prompt_rng, output_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    if arrival == "poisson":
        times = poisson_arrivals(n_requests, rate_rps, arrival_rng)
        arrival_note = f"Poisson arrivals at {rate_rps:g} req/s"
    elif arrival == "gamma":
        times = gamma_arrivals(n_requests, rate_rps, cv, arrival_rng)
        arrival_note = f"gamma arrivals at {rate_rps:g} req/s, inter-arrival CV {cv:g}"
    elif arrival == "constant":
        times = constant_arrivals(n_requests, rate_rps)
        arrival_note = f"constant arrivals every {1 / rate_rps:g} s"
    else:
        raise ValueError(f"unknown arrival process {arrival!r} (use {', '.join(ARRIVALS)})")
    if paired is not None:
        rows = prompt_rng.integers(0, len(paired), size=n_requests)
        prompts, outputs = paired.prompt[rows], paired.output[rows]
        length_notes = [f"(prompt, output) rows drawn jointly with replacement from "
                        f"{paired.source} ({len(paired)} rows)"]
    else:
        assert prompt is not None and output is not None
        prompts = prompt.sample(prompt_rng, n_requests)
        outputs = output.sample(output_rng, n_requests)
        length_notes = [f"prompt lengths: {prompt.spec()}", f"output lengths: {output.spec()}"]
    requests = tuple(
        TraceRequest(f"syn-{i}", t, p, o)
        for i, (t, p, o) in enumerate(zip(times.tolist(), prompts.tolist(), outputs.tolist(),
                                          strict=True)))
    notes = (f"synthetic: {n_requests} requests, {arrival_note} (seed {seed})", *length_notes)
    return Workload(f"synthetic-{arrival}", requests, notes)
