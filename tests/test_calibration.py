"""Fitting the prefill cost coefficients to measured chunk times (tetris.solver.calibration)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tetris.solver.calibration import (
    PREFILL_COEFFICIENTS,
    Calibration,
    FitReport,
    Measurement,
    chunk_features,
    fit_coefficients,
    nnls,
    read_measurements_csv,
    row_regime,
)
from tetris.solver.cluster import ClusterSpec
from tetris.solver.cost_model import CostCoefficients, CostModel
from tetris.solver.hardware import HARDWARE_PRESETS
from tetris.solver.model_spec import MODEL_PRESETS

MODEL = MODEL_PRESETS["llama3-8b"]
HW = HARDWARE_PRESETS["h100"]
CLUSTER = ClusterSpec(prefill_instances=16, gpus_per_node=8)
TRUE = CostModel(MODEL, HW, CLUSTER)

# A deliberately wrong starting point: every coefficient 1.0 (seconds per unit).
BASE = CostCoefficients(**{k: 1.0 for k in CostCoefficients.model_fields})

TOKENS = (1, 64, 512, 4096, 32768)
PREFIXES = (0, 1000, 16384, 131072)
# SP groups: intra-node up to 8 (gpus_per_node), cross-node from 2 up to all 16.
GROUPS = ((1, False), (2, False), (4, False), (8, False), (2, True), (4, True), (8, True),
          (16, True))


def grid_rows(cm: CostModel = TRUE) -> list[Measurement]:
    return [
        Measurement(c, p, s, cm.chunk_seconds(c, p, s, x), x)
        for c, p, (s, x) in itertools.product(TOKENS, PREFIXES, GROUPS)
    ]


def test_features_reproduce_chunk_seconds() -> None:
    """chunk_features · coefficients equals CostModel.chunk_seconds on the whole grid: the
    larger of the compute and transfer pieces with overlap, the additive row without."""
    co = TRUE.coefficients
    theta = np.array([getattr(co, k) for k in PREFILL_COEFFICIENTS])
    regimes = set()
    for r in grid_rows():
        args = (r.tokens, r.prefix, r.sp, r.cross_node)
        pieces = [float(np.array(chunk_features(*args, regime=g)) @ theta)
                  for g in ("compute", "transfer")]
        assert max(pieces) == pytest.approx(r.seconds, rel=1e-12)
        regime = row_regime(theta, r, True)
        regimes.add(regime if r.sp > 1 else "one")
        assert float(np.array(chunk_features(*args, regime=regime)) @ theta) == pytest.approx(
            r.seconds, rel=1e-12)
    assert regimes == {"one", "compute", "transfer"}  # the grid exercises both pieces
    additive = CostModel(MODEL, HW, CLUSTER, co.model_copy(update={"ring_overlap": False}))
    for r in grid_rows(additive):
        f = np.array(chunk_features(r.tokens, r.prefix, r.sp, r.cross_node))
        assert float(f @ theta) == pytest.approx(r.seconds, rel=1e-12)
    # sp == 1 uses the intra columns (all zero) even when flagged cross-node.
    assert chunk_features(10, 5, 1, True) == chunk_features(10, 5, 1, False)


def test_exact_rows_recover_coefficients() -> None:
    """Noise-free rows from a known model give back its coefficients to 1e-6 relative."""
    rows = grid_rows()
    fitted, report = fit_coefficients(rows, BASE)
    for k in PREFILL_COEFFICIENTS:
        assert getattr(fitted, k) == pytest.approx(getattr(TRUE.coefficients, k), rel=1e-6), k
    # Decode coefficients are not measured by prefill rows: copied from the base.
    assert fitted.decode_fixed_s == BASE.decode_fixed_s
    assert fitted.decode_kv_s_per_token == BASE.decode_kv_s_per_token
    assert report.num_rows == len(rows)
    assert report.mean_abs_pct_error < 1e-6
    assert report.max_abs_pct_error < 1e-6
    assert report.loo_mean_abs_pct_error is not None
    assert report.loo_mean_abs_pct_error < 1e-6
    assert report.r_squared == pytest.approx(1.0, abs=1e-12)
    assert report.fixed_from_base == []
    assert sorted(report.fitted) == sorted(PREFILL_COEFFICIENTS)


def test_noisy_rows_report_error_and_still_predict() -> None:
    """With 3% seeded multiplicative noise the report says so and predictions stay within 10%."""
    rng = np.random.default_rng(1234)
    rows = [
        Measurement(r.tokens, r.prefix, r.sp, r.seconds * float(np.exp(rng.normal(0, 0.03))),
                    r.cross_node)
        for r in grid_rows()
    ]
    fitted, report = fit_coefficients(rows, BASE)
    assert 0.5 < report.mean_abs_pct_error < 6
    assert report.max_abs_pct_error >= report.mean_abs_pct_error
    assert report.loo_mean_abs_pct_error is not None
    assert report.mean_abs_pct_error <= report.loo_mean_abs_pct_error < 10
    assert 0.9 < report.r_squared <= 1.0
    model = CostModel(MODEL, HW, CLUSTER, coefficients=fitted)
    for r in grid_rows():  # the noise-free truth
        got = model.chunk_seconds(r.tokens, r.prefix, r.sp, r.cross_node)
        assert got == pytest.approx(r.seconds, rel=0.10), r


def test_fitted_coefficients_build_a_cost_model() -> None:
    """A CostModel built from fitted coefficients reproduces the source model's times."""
    fitted, _ = fit_coefficients(grid_rows(), CostCoefficients.from_specs(MODEL, HW))
    model = CostModel(MODEL, HW, CLUSTER, coefficients=fitted)
    assert model.coefficients is fitted
    for c, p, s in ((100, 0, 1), (8192, 65536, 4), (50000, 200000, 16)):
        x = s > CLUSTER.gpus_per_node
        assert model.chunk_seconds(c, p, s, x) == pytest.approx(
            TRUE.chunk_seconds(c, p, s, x), rel=1e-9
        )
    assert model.best_isolated_ttft(65536) == pytest.approx(TRUE.best_isolated_ttft(65536),
                                                            rel=1e-9)


def test_no_cross_node_rows_keep_base_inter_coefficients() -> None:
    """Without cross-node rows the inter-node columns are all zero: base values, reported."""
    rows = [r for r in grid_rows() if not (r.cross_node and r.sp > 1)]
    fitted, report = fit_coefficients(rows, BASE)
    assert sorted(report.fixed_from_base) == ["comm_inter_s_per_token", "step_inter_s"]
    assert fitted.step_inter_s == BASE.step_inter_s
    assert fitted.comm_inter_s_per_token == BASE.comm_inter_s_per_token
    for k in ("fixed_s", "step_intra_s", "lin_s_per_token", "attn_s_per_pair",
              "comm_intra_s_per_token"):
        assert getattr(fitted, k) == pytest.approx(getattr(TRUE.coefficients, k), rel=1e-6), k
    assert report.mean_abs_pct_error < 1e-6


def test_collinear_column_is_kept_from_base() -> None:
    """Without overlap and with one SP size only, (s−1) is a multiple of the constant column:
    step kept from base. (With overlap it is 0 on compute-bound rows, so it is identified.)"""
    additive = TRUE.coefficients.model_copy(update={"ring_overlap": False})
    rows = [r for r in grid_rows(CostModel(MODEL, HW, CLUSTER, additive))
            if r.sp == 2 and not r.cross_node]
    base = additive.model_copy(update={"fixed_s": 1.0, "lin_s_per_token": 1.0,
                                       "attn_s_per_pair": 1.0,
                                       "comm_intra_s_per_token": 1.0})
    fitted, report = fit_coefficients(rows, base)
    assert "step_intra_s" in report.fixed_from_base
    assert "fixed_s" in report.fitted
    # The base step is the true one, so after subtracting it the rest is recovered exactly.
    for k in ("fixed_s", "lin_s_per_token", "attn_s_per_pair", "comm_intra_s_per_token"):
        assert getattr(fitted, k) == pytest.approx(getattr(TRUE.coefficients, k), rel=1e-6), k


def test_loo_is_none_without_spare_rows() -> None:
    """Leave-one-out needs more rows than fitted coefficients; otherwise it is None."""
    rows = [Measurement(c, 0, 1, TRUE.chunk_seconds(c, 0, 1)) for c in (100, 2000, 30000)]
    _, report = fit_coefficients(rows, BASE)  # fits fixed, lin, attn: 3 coefficients, 3 rows
    assert len(report.fitted) == 3
    assert report.loo_mean_abs_pct_error is None
    _, report = fit_coefficients([*rows, Measurement(7, 0, 1, TRUE.chunk_seconds(7, 0, 1))],
                                 BASE)
    assert report.loo_mean_abs_pct_error is not None


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([], "at least 2"),
        ([Measurement(10, 0, 1, 0.1)], "at least 2"),
        ([Measurement(10, 0, 1, 0.1), Measurement(20, 0, 1, 0.0)], "row 1.*positive"),
        ([Measurement(10, 0, 1, -0.1), Measurement(20, 0, 1, 0.2)], "row 0.*positive"),
        ([Measurement(10, 0, 1, float("nan")), Measurement(20, 0, 1, 0.2)], "row 0.*positive"),
        ([Measurement(10, 0, 0, 0.1), Measurement(20, 0, 1, 0.2)], "row 0.*sp"),
    ],
)
def test_fit_rejects_bad_input(rows: list[Measurement], match: str) -> None:
    """Too few rows or non-positive seconds raise a ValueError saying which."""
    with pytest.raises(ValueError, match=match):
        fit_coefficients(rows, BASE)


# -- NNLS ---------------------------------------------------------------------------------------
def test_nnls_hand_worked_example() -> None:
    """NNLS clamps the coefficient that unconstrained least squares makes negative."""
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = np.array([2.0, -1.0, 0.0])
    # Unconstrained: AᵀA = [[2, 1], [1, 2]], Aᵀb = [2, −1];
    #   x = (AᵀA)⁻¹Aᵀb = (1/3)·[[2, −1], [−1, 2]]·[2, −1] = (1/3)·[5, −4] = [5/3, −4/3] < 0.
    x_ls = np.linalg.lstsq(a, b, rcond=None)[0]
    np.testing.assert_allclose(x_ls, [5 / 3, -4 / 3], rtol=1e-12)
    # With x₂ = 0: minimise (x₁ − 2)² + (0 + 1)² + x₁² → 2(x₁ − 2) + 2x₁ = 0 → x₁ = 1.
    # KKT: residual r = b − A·[1, 0] = [1, −1, −1]; gradient for x₂: A[:,1]·r = −1 − 1 = −2 ≤ 0,
    # so raising x₂ from 0 only increases the error: [1, 0] is optimal.
    np.testing.assert_allclose(nnls(a, b), [1.0, 0.0], atol=1e-12)


def test_nnls_unconstrained_when_already_positive() -> None:
    """When the least-squares solution is non-negative NNLS returns it unchanged."""
    a = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    b = a @ np.array([0.5, 2.0])
    np.testing.assert_allclose(nnls(a, b), [0.5, 2.0], rtol=1e-12)
    np.testing.assert_allclose(nnls(a, -b), [0.0, 0.0], atol=1e-12)


def _brute_force_nnls(a: np.ndarray, b: np.ndarray) -> float:
    """Best residual over all supports whose least-squares solution is non-negative."""
    n = a.shape[1]
    best = float(np.sum(b**2))
    for k in range(1, n + 1):
        for support in itertools.combinations(range(n), k):
            z = np.linalg.lstsq(a[:, support], b, rcond=None)[0]
            if np.all(z >= 0):
                best = min(best, float(np.sum((a[:, support] @ z - b) ** 2)))
    return best


@settings(max_examples=150, deadline=None)
@given(
    st.integers(min_value=1, max_value=4).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.integers(min_value=n, max_value=8),
            st.integers(min_value=0, max_value=2**32 - 1),
        )
    )
)
def test_nnls_matches_brute_force(shape_seed: tuple[int, int, int]) -> None:
    """NNLS is feasible and as good as the best non-negative solution on any support."""
    n, m, seed = shape_seed
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(m, n))
    b = rng.normal(size=m)
    x = nnls(a, b)
    assert np.all(x >= 0)
    got = float(np.sum((a @ x - b) ** 2))
    assert got <= _brute_force_nnls(a, b) * (1 + 1e-9) + 1e-12


# -- files ----------------------------------------------------------------------------------------
def test_csv_round_trip(tmp_path: Path) -> None:
    """Rows written as CSV read back identically (cross_node optional, default false)."""
    rows = grid_rows()
    path = tmp_path / "rows.csv"
    lines = ["tokens,prefix,sp,seconds,cross_node"]
    lines += [f"{r.tokens},{r.prefix},{r.sp},{r.seconds!r},{str(r.cross_node).lower()}"
              for r in rows]
    path.write_text("\n".join(lines) + "\n")
    assert read_measurements_csv(path) == rows

    short = tmp_path / "short.csv"
    short.write_text("sp,tokens,seconds,prefix,note\n2,100,0.5,7,warm\n\n1,3,0.25,0,\n")
    assert read_measurements_csv(short) == [
        Measurement(100, 7, 2, 0.5, False), Measurement(3, 0, 1, 0.25, False)
    ]


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ("tokens,prefix,sp,seconds\n10,0,1,0.1\n20,0,x,0.2\n", ":3:"),
        ("tokens,prefix,sp,seconds\n10,0,1,0.1\n\n20,0,1,-2\n", ":4:"),
        ("tokens,prefix,sp,seconds,cross_node\n10,0,2,0.1,maybe\n", ":2:"),
        ("tokens,prefix,sp,seconds\n10,0,1\n", ":2:"),
        ("tokens,prefix,sp,seconds\n10,0,1,0.1,9\n", ":2:"),
        ("tokens,prefix,seconds\n10,0,0.1\n", ":1:.*lacks sp"),
    ],
)
def test_csv_bad_line_is_named(tmp_path: Path, body: str, where: str) -> None:
    """A malformed CSV row raises ValueError naming the file and its line number."""
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(ValueError, match=rf"bad\.csv{where}"):
        read_measurements_csv(path)


def test_calibration_save_load_round_trip(tmp_path: Path) -> None:
    """A saved Calibration loads back equal, and its coefficients drive a CostModel."""
    fitted, report = fit_coefficients(grid_rows(), BASE)
    cal = Calibration(model=MODEL.name, hardware=HW.name, coefficients=fitted, report=report)
    path = tmp_path / "cal.json"
    cal.save(path)
    loaded = Calibration.load(path)
    assert loaded == cal
    assert isinstance(loaded.report, FitReport)
    CostModel(MODEL, HW, CLUSTER, coefficients=loaded.coefficients)
    assert json.loads(path.read_text())["model"] == "llama3-8b"


@pytest.mark.parametrize(
    "content",
    ["{not json", '{"model": "x"}', "[]", '{"model": "m", "hardware": "h", "coefficients": {},'
     ' "report": {}}'],
)
def test_calibration_load_bad_file_names_it(tmp_path: Path, content: str) -> None:
    """Loading a file that is not a calibration raises ValueError naming the file."""
    path = tmp_path / "broken-cal.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"broken-cal\.json"):
        Calibration.load(path)
