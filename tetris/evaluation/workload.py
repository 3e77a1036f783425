"""Workloads for the simulator: timed requests from real traces or synthetic generators.

A `Workload` is an immutable, arrival-sorted tuple of `TraceRequest`s whose first arrival is at
0 s, plus `notes`: a human-readable record of everything done to the source (bucket spreading,
re-basing, time scaling, truncation), so results can say exactly what they were run on.

Spec strings (`load_workload`) are parsed in `workload_spec.py`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
_T = TypeVar("_T")

#: Most tokens a request may have in or out: far beyond any model's context, and small enough
#: that token sums over a whole trace stay inside numpy's int64.
MAX_TOKENS = 2**31 - 1


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request as a trace gives it: when it arrives and how many tokens in and out."""

    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        # Checked here, not only in the loaders, because synthetic and hand-built workloads
        # feed the simulator too, and a zero-length request silently breaks its token math.
        if not math.isfinite(self.arrival_s):
            raise ValueError(f"request {self.request_id}: arrival_s must be finite, "
                             f"got {self.arrival_s}")
        for name in ("prompt_tokens", "output_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or \
                    not 0 < value <= MAX_TOKENS:
                raise ValueError(f"request {self.request_id}: {name} must be an int in "
                                 f"[1, {MAX_TOKENS}], got {value!r}")


@dataclass(frozen=True, eq=False)
class LengthSamples:
    """Empirical (prompt, output) token-count pairs, row-aligned; e.g. the vidur arXiv file.

    The arrays are made read-only: samples are shared between workloads and must not drift.
    """

    prompt: IntArray
    output: IntArray
    source: str

    def __post_init__(self) -> None:
        if self.prompt.shape != self.output.shape or self.prompt.ndim != 1:
            raise ValueError(f"{self.source}: prompt and output must be 1-D arrays of one "
                             f"length, got shapes {self.prompt.shape} and {self.output.shape}")
        if len(self.prompt) == 0:
            raise ValueError(f"{self.source}: no length samples")
        if int(min(self.prompt.min(), self.output.min())) <= 0 or \
                int(max(self.prompt.max(), self.output.max())) > MAX_TOKENS:
            raise ValueError(f"{self.source}: token counts must be in [1, {MAX_TOKENS}]")
        self.prompt.flags.writeable = False
        self.output.flags.writeable = False

    def __len__(self) -> int:
        return len(self.prompt)

    @classmethod
    def from_workload(cls, workload: Workload) -> LengthSamples:
        """The (prompt, output) pairs of a trace, without its arrival times."""
        prompt = np.fromiter((r.prompt_tokens for r in workload.requests), np.int64,
                             len(workload.requests))
        output = np.fromiter((r.output_tokens for r in workload.requests), np.int64,
                             len(workload.requests))
        return cls(prompt, output, workload.name)


@dataclass(frozen=True)
class Workload:
    """Requests sorted by arrival (stable), first arrival at 0 s; `notes` say how they were made.

    Build one with `Workload.from_requests`, which sorts and re-bases; the constructor only
    checks those invariants (so a hand-made workload cannot be silently shifted).
    """

    name: str
    requests: tuple[TraceRequest, ...]
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        requests = self.requests
        if requests and requests[0].arrival_s != 0.0:
            raise ValueError(f"workload {self.name}: first arrival must be 0 s, got "
                             f"{requests[0].arrival_s} (use Workload.from_requests to re-base)")
        for previous, current in itertools.pairwise(requests):
            if current.arrival_s < previous.arrival_s:
                raise ValueError(f"workload {self.name}: request {current.request_id} arrives "
                                 f"before {previous.request_id} (use Workload.from_requests)")
        if len({r.request_id for r in requests}) != len(requests):
            raise ValueError(f"workload {self.name}: request ids are not unique")

    @classmethod
    def from_requests(cls, name: str, requests: Iterable[TraceRequest],
                      notes: Sequence[str] = ()) -> Workload:
        """Sort stably by arrival and shift so the first arrival is 0; a shift is noted."""
        ordered = sorted(requests, key=lambda r: r.arrival_s)
        all_notes = list(notes)
        if ordered and ordered[0].arrival_s != 0.0:
            shift = ordered[0].arrival_s
            ordered = [_at(r, r.arrival_s - shift) for r in ordered]
            all_notes.append(f"re-based: arrivals shifted by {-shift:+.6g} s so the first is at 0")
        return cls(name, tuple(ordered), tuple(all_notes))

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration_s(self) -> float:
        """Last arrival minus first arrival (0 for fewer than 2 requests)."""
        if not self.requests:
            return 0.0
        return self.requests[-1].arrival_s - self.requests[0].arrival_s

    @property
    def mean_rate_rps(self) -> float:
        """Requests divided by duration (the traces README's definition).

        Raises ValueError for fewer than 2 requests or zero duration: there is no rate, and an
        `inf` would flow silently into scaling factors.
        """
        duration = self.duration_s
        if len(self.requests) < 2 or duration <= 0.0:
            raise ValueError(f"workload {self.name}: mean rate undefined for "
                             f"{len(self.requests)} requests over {duration} s")
        return len(self.requests) / duration

    def arrivals(self) -> FloatArray:
        """Arrival times as a float64 array (a copy)."""
        return np.fromiter((r.arrival_s for r in self.requests), np.float64, len(self.requests))

    def summary(self) -> dict[str, float]:
        """Counts, span, rate and token statistics (numpy's default percentiles)."""
        out: dict[str, float] = {"requests": float(len(self.requests)),
                                 "duration_s": self.duration_s}
        if len(self.requests) >= 2 and self.duration_s > 0:
            out["mean_rate_rps"] = self.mean_rate_rps
        if self.requests:
            lengths = LengthSamples.from_workload(self)
            for label, values in (("prompt", lengths.prompt), ("output", lengths.output)):
                out[f"{label}_mean"] = float(values.mean())
                for q in (50, 90, 99):
                    out[f"{label}_p{q}"] = float(np.percentile(values, q))
                out[f"{label}_max"] = float(values.max())
        return out

    def _derived(self, requests: Iterable[TraceRequest], note: str) -> Workload:
        return Workload(self.name, tuple(requests), (*self.notes, note))

    def scaled_to_rate(self, rate_rps: float) -> Workload:
        """Stretch or compress time so the mean rate is `rate_rps` (order and lengths kept)."""
        if not (math.isfinite(rate_rps) and rate_rps > 0):
            raise ValueError(f"rate_rps must be a finite number > 0, got {rate_rps}")
        current = self.mean_rate_rps
        factor = current / rate_rps
        return self._derived((_at(r, r.arrival_s * factor) for r in self.requests),
                             f"time-scaled ×{factor:.6g} to {rate_rps:g} req/s "
                             f"(was {current:.6g} req/s)")

    def time_scaled(self, factor: float) -> Workload:
        """Multiply every arrival time by `factor` (> 1 slows the workload down)."""
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"time-scaling factor must be a finite number > 0, got {factor}")
        return self._derived((_at(r, r.arrival_s * factor) for r in self.requests),
                             f"time-scaled ×{factor:.6g}")

    def head(self, n: int) -> Workload:
        """The first `n` requests (by arrival); the workload itself when it has no more."""
        if n < 0:
            raise ValueError(f"head: n must be >= 0, got {n}")
        if n >= len(self.requests):
            return self
        return self._derived(self.requests[:n],
                             f"truncated to the first {n} of {len(self.requests)} requests")

    def window(self, start_s: float, end_s: float) -> Workload:
        """Requests arriving in [start_s, end_s), re-based so the first of them is at 0."""
        if not (math.isfinite(start_s) and math.isfinite(end_s)) or end_s < start_s:
            raise ValueError(f"window: need finite start_s <= end_s, got [{start_s}, {end_s})")
        kept = [r for r in self.requests if start_s <= r.arrival_s < end_s]
        shift = kept[0].arrival_s if kept else 0.0
        return self._derived((_at(r, r.arrival_s - shift) for r in kept),
                             f"window [{start_s:g}, {end_s:g}) s: {len(kept)} of "
                             f"{len(self.requests)} requests, re-based by {-shift:+.6g} s")


def _at(request: TraceRequest, arrival_s: float) -> TraceRequest:
    # Direct construction instead of dataclasses.replace: replace() goes through
    # fields() and is measurably slower on 10^4-request traces.
    return TraceRequest(request.request_id, arrival_s, request.prompt_tokens,
                        request.output_tokens)
