"""Fit the prefill cost coefficients of `cost_model.CostModel` to measured chunk times.

A measured row is one chunk: `tokens` new tokens after a `prefix` on an SP group of `sp`
instances, over intra- or cross-node links, taking `seconds`. Without ring overlap
(`CostCoefficients.ring_overlap` False, the runtime's gather-then-attend) `chunk_seconds` is
linear in its seven prefill coefficients, with the feature vector (x = cross-node link, i.e.
cross_node and s > 1):

    [1, (s−1)·[¬x], (s−1)·[x], c/s, (c·p + c(c+1)/2)/s, (p+c)(s−1)/s·[¬x], (p+c)(s−1)/s·[x]]

for (fixed_s, step_intra_s, step_inter_s, lin_s_per_token, attn_s_per_pair,
comm_intra_s_per_token, comm_inter_s_per_token). With ring overlap T = max(T_compute,
T_transfer), each linear in the coefficients: the compute-bound row has no link columns, the
transfer-bound one divides the attention column by s once more (`chunk_features` with a
`regime`). The fit alternates: assign each row the regime its current coefficients put it in,
fit, reassign, until no row changes regime (a few rounds; started from the base and from
all-compute / all-transfer, the lowest error kept).

Times span orders of magnitude, so each fit minimises the *relative* squared error
Σ ((f·θ − t) / t)² subject to θ ≥ 0 (the coefficients are physical rates): non-negative least
squares (Lawson–Hanson) on the rows scaled by 1/t.

Coefficients that the data cannot identify keep the value of `base` and are listed in
`FitReport.fixed_from_base`: a feature column that is all zero (e.g. no cross-node rows, or every
SP row compute-bound so no transfer shows), or one that is a linear combination of columns
fitted before it (e.g. every SP row has the same s, so (s−1) is a multiple of the constant
column). Columns are considered in the order fixed, lin, attn, comm_intra, step_intra,
comm_inter, step_inter; the contribution of a kept base value is subtracted from the measured
time before the fit. Decode coefficients and `ring_overlap` are copied from `base` (they are
not measured by prefill rows).

The report gives the in-sample mean and max absolute percentage error, R² on seconds, and the
leave-one-out MAPE (each row predicted by a fit on the others) when there are more rows than
fitted coefficients: the honest estimate of how well the model predicts an unseen chunk.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tetris.solver.cost_model import CostCoefficients
from tetris.solver.input_files import (
    InputFileError,
    cut,
    describe_validation,
    read_json_object,
    read_text,
    shown,
)

FloatArray = npt.NDArray[np.float64]

#: The prefill coefficients, in the order of `chunk_features`.
PREFILL_COEFFICIENTS: tuple[str, ...] = (
    "fixed_s",
    "step_intra_s",
    "step_inter_s",
    "lin_s_per_token",
    "attn_s_per_pair",
    "comm_intra_s_per_token",
    "comm_inter_s_per_token",
)
# Which column is tried first when deciding identifiability (indices into PREFILL_COEFFICIENTS):
# the big terms before the small link terms.
_PRIORITY = (0, 3, 4, 5, 1, 6, 2)

CSV_COLUMNS = ("tokens", "prefix", "sp", "seconds")
#: Largest coefficient a calibration file may hold (seconds per unit): a fitted one is < 1.
MAX_COEFFICIENT = 1e3
#: Rounds of regime reassignment before the best fit so far is kept.
MAX_REGIME_ROUNDS = 12
_TRUE = {"1", "true", "yes", "y", "t"}

Regime = Literal["additive", "compute", "transfer"]
_FALSE = {"0", "false", "no", "n", "f", ""}


@dataclass(frozen=True, slots=True)
class Measurement:
    """One measured chunk: `tokens` after `prefix` on `sp` instances took `seconds`."""

    tokens: int
    prefix: int
    sp: int
    seconds: float
    cross_node: bool = False


def chunk_features(tokens: int, prefix: int, sp: int, cross_node: bool = False,
                   regime: Regime = "additive") -> list[float]:
    """The feature vector f with T == f · prefill coefficients: T without ring overlap
    ("additive"), or T_compute / T_transfer of the overlap rule (T is their maximum)."""
    inter = cross_node and sp > 1
    pairs = tokens * prefix + tokens * (tokens + 1) / 2
    if regime == "compute" or sp == 1:
        return [1.0, 0.0, 0.0, tokens / sp, pairs / sp, 0.0, 0.0]
    ring = (prefix + tokens) * (sp - 1) / sp
    steps = float(sp - 1)
    return [
        1.0,
        0.0 if inter else steps,
        steps if inter else 0.0,
        tokens / sp,
        pairs / sp if regime == "additive" else pairs / (sp * sp),
        0.0 if inter else ring,
        ring if inter else 0.0,
    ]


def row_regime(theta: Sequence[float] | FloatArray, row: Measurement, overlap: bool) -> Regime:
    """Which linear piece of T the coefficients `theta` put the row on."""
    if not overlap:
        return "additive"
    args = (row.tokens, row.prefix, row.sp, row.cross_node)
    compute = float(np.dot(chunk_features(*args, regime="compute"), theta))
    transfer = float(np.dot(chunk_features(*args, regime="transfer"), theta))
    return "compute" if compute >= transfer else "transfer"


class FitReport(BaseModel):
    """How well the fitted T(c, p, s) reproduces the measured rows."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_rows: int = Field(ge=0)
    mean_abs_pct_error: float = Field(ge=0, description="in-sample MAPE, percent")
    max_abs_pct_error: float = Field(ge=0, description="in-sample worst row, percent")
    r_squared: float = Field(description="1 − SS_res/SS_tot on seconds (1.0 if both are 0)")
    loo_mean_abs_pct_error: float | None = Field(
        default=None,
        description="leave-one-out MAPE, percent; None unless rows > fitted coefficients",
    )
    fitted: list[str] = Field(default_factory=list, description="coefficients fitted")
    fixed_from_base: list[str] = Field(
        default_factory=list,
        description="prefill coefficients the rows cannot identify: kept from the base",
    )


class Calibration(BaseModel):
    """Fitted coefficients for one (model, hardware), as `tetris profile` writes them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    hardware: str
    coefficients: CostCoefficients
    report: FitReport

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a saved calibration; an InputFileError (a ValueError) naming the file, and the
        line or field, if it cannot be read or is not one."""
        data = read_json_object(path)
        try:
            calibration = cls.model_validate(data)
        except ValidationError as err:
            raise InputFileError(path, None, "not a calibration file: "
                                 f"{describe_validation(err)}") from None
        # JSON has no inf, but 1e308 × a token count does: keep every duration finite.
        for name, value in calibration.coefficients.model_dump().items():
            if not value < MAX_COEFFICIENT:
                raise InputFileError(path, None, f"not a calibration file: coefficients.{name} "
                                     f"must be < {MAX_COEFFICIENT:g}, got {value}")
        return calibration


# -- non-negative least squares ---------------------------------------------------------------
def nnls(a: FloatArray, b: FloatArray, max_iter: int | None = None) -> FloatArray:
    """argmin ‖a·x − b‖₂ subject to x ≥ 0 (Lawson & Hanson 1974, active-set method).

    The passive set P holds the free variables; each outer step frees the variable whose
    gradient −aᵀ(b − a·x) most wants it to grow, then the inner loop moves toward the
    unconstrained solution on P and drops variables that would turn negative. After `max_iter`
    outer steps (default 3n; only reached on degenerate, rank-deficient input) the current
    feasible x is returned."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    m, n = a.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    col_sum = float(np.abs(a).sum(axis=0).max(initial=0.0))
    tol = 10 * float(np.finfo(np.float64).eps) * max(m, n) * max(1.0, col_sum)
    limit = 3 * n if max_iter is None else max_iter
    w = a.T @ (b - a @ x)
    for _ in range(limit):
        if passive.all() or np.max(w[~passive]) <= tol:
            break
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if np.all(z[passive] > 0):
                break
            # Walk from x toward z until the first passive variable reaches zero.
            hit = passive & (z <= 0)
            gap = x[hit] - z[hit]  # ≥ 0: x ≥ 0 ≥ z on `hit`
            alpha = float(np.min(np.divide(x[hit], gap, out=np.zeros_like(gap), where=gap > 0)))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
            if not passive.any():
                z = np.zeros(n)
                break
        x = z
        w = a.T @ (b - a @ x)
    return np.maximum(x, 0.0)


# -- fitting ----------------------------------------------------------------------------------
def _check_rows(rows: Sequence[Measurement]) -> None:
    if len(rows) < 2:
        raise ValueError(f"need at least 2 measured rows to fit, got {len(rows)}")
    for i, r in enumerate(rows):
        if not (math.isfinite(r.seconds) and r.seconds > 0):
            raise ValueError(f"row {i} ({r}): seconds must be a positive finite number")
        if r.tokens < 1 or r.prefix < 0 or r.sp < 1:
            raise ValueError(f"row {i} ({r}): need tokens ≥ 1, prefix ≥ 0 and sp ≥ 1")


def _identifiable(weighted: FloatArray) -> list[int]:
    """Columns (in priority order) each adding rank to those before it."""
    norms = np.linalg.norm(weighted, axis=0)
    chosen: list[int] = []
    for j in _PRIORITY:
        if norms[j] == 0:
            continue
        trial = [*chosen, j]
        sub = weighted[:, trial] / norms[trial]
        if np.linalg.matrix_rank(sub) == len(trial):
            chosen.append(j)
    return sorted(chosen)


def _solve(features: FloatArray, target: FloatArray, seconds: FloatArray) -> FloatArray:
    """Relative-error NNLS: rows scaled by 1/seconds, columns to unit norm (scale-free)."""
    a = features / seconds[:, None]
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    theta: FloatArray = nnls(a / scale, target / seconds) / scale
    return theta


@dataclass(frozen=True, slots=True)
class _Fit:
    theta: FloatArray
    cols: list[int]
    predicted: FloatArray
    error: float  # Σ relative squared error


def _predict(theta: FloatArray, rows: Sequence[Measurement], overlap: bool) -> FloatArray:
    return np.array([float(np.dot(chunk_features(r.tokens, r.prefix, r.sp, r.cross_node,
                                                 row_regime(theta, r, overlap)), theta))
                     for r in rows], dtype=np.float64)


def _fit_regimes(rows: Sequence[Measurement], regimes: Sequence[Regime], base_theta: FloatArray,
                 seconds: FloatArray, overlap: bool) -> _Fit:
    """One linear fit with every row on its given piece of T."""
    feats = np.array([chunk_features(r.tokens, r.prefix, r.sp, r.cross_node, g)
                      for r, g in zip(rows, regimes, strict=True)], dtype=np.float64)
    cols = _identifiable(feats / seconds[:, None])
    kept = [j for j in range(len(PREFILL_COEFFICIENTS)) if j not in cols]
    # Remove what the kept base values explain; fit the remainder with the free columns.
    target = seconds - feats[:, kept] @ base_theta[kept]
    theta = base_theta.copy()
    if cols:
        theta[cols] = _solve(feats[:, cols], target, seconds)
    predicted = _predict(theta, rows, overlap)
    return _Fit(theta, cols, predicted, float(np.sum(((predicted - seconds) / seconds) ** 2)))


def _fit(rows: Sequence[Measurement], base_theta: FloatArray, overlap: bool) -> _Fit:
    """The fit of T to `rows`: one linear fit without overlap; with it, alternate regime
    assignment and fitting from a few starts, keeping the lowest error."""
    seconds = np.array([r.seconds for r in rows], dtype=np.float64)
    if not overlap:
        return _fit_regimes(rows, ["additive"] * len(rows), base_theta, seconds, False)
    starts: list[list[Regime]] = [
        [row_regime(base_theta, r, True) for r in rows],
        ["compute"] * len(rows),
        ["transfer"] * len(rows),
    ]
    best: _Fit | None = None
    for regimes in starts:
        for _ in range(MAX_REGIME_ROUNDS):
            fit = _fit_regimes(rows, regimes, base_theta, seconds, True)
            if best is None or fit.error < best.error:
                best = fit
            again = [row_regime(fit.theta, r, True) for r in rows]
            if again == regimes:
                break
            regimes = again
    assert best is not None
    return best


def fit_coefficients(
    rows: Sequence[Measurement], base: CostCoefficients
) -> tuple[CostCoefficients, FitReport]:
    """Fit the prefill coefficients to `rows`; the rest (and unidentifiable ones) from `base`."""
    _check_rows(rows)
    overlap = base.ring_overlap
    seconds = np.array([r.seconds for r in rows], dtype=np.float64)
    base_theta = np.array([getattr(base, k) for k in PREFILL_COEFFICIENTS], dtype=np.float64)
    fit = _fit(rows, base_theta, overlap)
    theta, cols, predicted = fit.theta, fit.cols, fit.predicted
    kept = [j for j in range(len(PREFILL_COEFFICIENTS)) if j not in cols]

    pct = 100.0 * np.abs(predicted - seconds) / seconds
    ss_res = float(np.sum((predicted - seconds) ** 2))
    ss_tot = float(np.sum((seconds - seconds.mean()) ** 2))
    # All rows equally long: R² is 1 for a perfect fit, else 0 (no variance to explain).
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float(ss_res == 0)

    loo: float | None = None
    n = len(rows)
    if cols and n > len(cols):
        errors = np.empty(n)
        for i in range(n):
            rest = [r for j, r in enumerate(rows) if j != i]
            t = _fit(rest, base_theta, overlap).theta
            errors[i] = abs(float(_predict(t, [rows[i]], overlap)[0]) - seconds[i]) / seconds[i]
        loo = 100.0 * float(errors.mean())

    values = {k: float(v) for k, v in zip(PREFILL_COEFFICIENTS, theta, strict=True)}
    coefficients = CostCoefficients.model_validate({**base.model_dump(), **values})
    report = FitReport(
        num_rows=n,
        mean_abs_pct_error=float(pct.mean()),
        max_abs_pct_error=float(pct.max()),
        r_squared=r2,
        loo_mean_abs_pct_error=loo,
        fitted=[PREFILL_COEFFICIENTS[j] for j in cols],
        fixed_from_base=[PREFILL_COEFFICIENTS[j] for j in kept],
    )
    return coefficients, report


# -- CSV --------------------------------------------------------------------------------------
def _parse_bool(text: str) -> bool:
    key = text.strip().lower()
    if key in _TRUE:
        return True
    if key in _FALSE:
        return False
    raise ValueError(f"cross_node must be true/false/1/0, got {shown(text)}")


def read_measurements_csv(path: str | Path) -> list[Measurement]:
    """Rows of a CSV with header tokens,prefix,sp,seconds[,cross_node] (any order; other
    columns ignored; blank lines skipped). ValueError naming the file and line of a bad row."""
    rows: list[Measurement] = []
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    try:
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"{path}:1: header {cut(','.join(header)) or '(empty)'} lacks "
                f"{','.join(missing)} (expected {','.join(CSV_COLUMNS)}[,cross_node])"
            )
        reader.fieldnames = header
        for record in reader:
            line = reader.line_num
            values = [v for k, v in record.items() if k is not None]
            if all((v or "").strip() == "" for v in values):
                continue
            try:
                rows.append(_measurement(record, len(header)))
            except ValueError as err:
                raise ValueError(f"{path}:{line}: bad row {cut(str(values))}: {err}") from None
    except csv.Error as err:  # a field over csv's size limit, a quote left open at the end
        raise InputFileError(path, reader.line_num or 1, f"not CSV: {err}") from None
    return rows


def _measurement(record: dict[str | None, Any], fields: int) -> Measurement:
    if None in record or any(record.get(c) is None for c in CSV_COLUMNS):
        raise ValueError(f"expected {fields} fields")
    tokens, prefix, sp = (int(_cell(record, c, int)) for c in ("tokens", "prefix", "sp"))
    seconds = float(_cell(record, "seconds", float))
    cross = _parse_bool(record.get("cross_node") or "")
    if tokens < 1 or prefix < 0 or sp < 1:
        raise ValueError("need tokens ≥ 1, prefix ≥ 0 and sp ≥ 1")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError("seconds must be a positive finite number")
    return Measurement(tokens, prefix, sp, seconds, cross)


def _cell(record: dict[str | None, Any], column: str, kind: type[int] | type[float]
          ) -> int | float:
    text = record[column] or ""
    try:
        return kind(text)
    except ValueError:  # int() and float() quote the whole cell, however long
        raise ValueError(f"{column} must be {'an integer' if kind is int else 'a number'}, "
                         f"got {shown(text)}") from None
