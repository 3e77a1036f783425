"""Serving metrics on hand-worked records, per-request exports, and random-run properties.

The hand-worked run (TTFT SLO 1 s for all; TBT SLO 0.5 s except A's 0.7 s):

    A  arrival 0.0  5/5 tokens at 0.5 1.0 1.25 2.0 2.5   TTFT 0.5   gaps .5 .25 .75 .5
    B  arrival 1.0  3/3 tokens at 2.5 2.75 3.0           TTFT 1.5   gaps .25 .25   (TTFT miss)
    C  arrival 2.0  2/5 tokens at 2.25 2.5               TTFT 0.25  gaps .25       (unfinished)
    D  arrival 3.0  0/1 tokens                                                     (never started)
    E  arrival 0.5  1/1 token  at 1.0                    TTFT 0.5   no gaps
"""

from __future__ import annotations

import csv
import json
import math
from array import array
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tetris.evaluation.metrics import (
    ROW_FIELDS,
    compute_metrics,
    per_request_rows,
    write_request_csv,
    write_request_json,
)
from tetris.simulator.records import ChunkRecord, RequestRecord, SimRequest

A_GAPS = [0.5, 0.25, 0.75, 0.5]


def record(
    rid: str, arrival: float, output_tokens: int, times: list[float], *,
    ttft_slo: float = 1.0, tbt_slo: float = 0.5,
    chunks: list[ChunkRecord] | None = None, decode: tuple[int, ...] = (),
) -> RequestRecord:
    req = SimRequest(rid, arrival, 100, output_tokens, ttft_slo, tbt_slo)
    return RequestRecord(req, chunks=chunks or [], token_times=array("d", times),
                         decode_instances=decode)


def hand_run(a_tbt_slo: float = 0.7) -> list[RequestRecord]:
    chunks = [ChunkRecord(0, 60, (0, 1), 0.0, 0.3), ChunkRecord(60, 100, (0, 1, 2, 3), 0.3, 0.5)]
    return [
        record("A", 0.0, 5, [0.5, 1.0, 1.25, 2.0, 2.5], tbt_slo=a_tbt_slo, chunks=chunks,
               decode=(0, 3)),
        record("B", 1.0, 3, [2.5, 2.75, 3.0]),
        record("C", 2.0, 5, [2.25, 2.5]),
        record("D", 3.0, 1, []),
        record("E", 0.5, 1, [1.0]),
    ]


def test_counts_and_latency_statistics() -> None:
    """Counts, TTFT/TBT/TPOT/E2E/normalized-latency statistics match the hand-worked values."""
    m = compute_metrics(hand_run())
    assert (m.requests, m.started, m.finished) == (5, 4, 3)
    # TTFT over started requests: .25 .5 .5 1.5
    assert m.ttft_mean_s == pytest.approx(0.6875)
    assert m.ttft_p50_s == pytest.approx(0.5)
    assert m.ttft_p90_s == pytest.approx(1.2)  # position 2.7: .5 + .7·1.0
    assert m.ttft_p99_s == pytest.approx(1.47)
    # TBT over all 7 gaps of A, B, C (the unfinished C included): .25×4 .5 .5 .75
    assert m.tbt_mean_s == pytest.approx(2.75 / 7)
    assert m.tbt_p50_s == pytest.approx(0.25)
    assert m.tbt_p90_s == pytest.approx(0.6)  # position 5.4: .5 + .4·.25
    assert m.tbt_p99_s == pytest.approx(0.735)
    assert m.tpot_mean_s == pytest.approx((0.5 + 0.25 + 0.25) / 3)
    # E2E over finished A, B, E: 2.5, 2.0, 0.5
    assert m.e2e_mean_s == pytest.approx(5.0 / 3)
    assert m.e2e_p50_s == pytest.approx(2.0)
    assert m.e2e_p90_s == pytest.approx(2.4)
    assert m.e2e_p99_s == pytest.approx(2.49)
    # Normalized: 2.5/5, 2.0/3, 0.5/1
    assert m.normalized_latency_mean_s_per_token == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert m.normalized_latency_p50_s_per_token == pytest.approx(0.5)


def test_attainment_and_rates() -> None:
    """One TTFT miss, one unfinished and one unstarted request: shares and per-second rates."""
    m = compute_metrics(hand_run())
    assert m.ttft_attainment == pytest.approx(3 / 5)  # A, C, E
    assert m.tbt_attainment == pytest.approx(3 / 5)  # A (mean .5 ≤ .7), B, E (one token)
    assert m.slo_attainment == pytest.approx(2 / 5)  # A, E
    assert m.span_s == pytest.approx(3.0)  # first arrival 0 → last token / last arrival 3
    assert m.goodput_rps == pytest.approx(2 / 3)
    assert m.throughput_rps == pytest.approx(1.0)
    assert m.output_tokens_per_s == pytest.approx(11 / 3)


@pytest.mark.parametrize(
    ("criterion", "a_value"),
    [("mean", 0.5), ("p90", 0.675), ("p99", 0.7425), ("max", 0.75)],
)
def test_tbt_criterion_threshold(criterion: str, a_value: float) -> None:
    """Each TBT criterion judges A by the hand-computed value: met at it, missed just below."""
    exact = {"mean": float(np.mean(A_GAPS)), "max": max(A_GAPS),
             "p90": float(np.percentile(A_GAPS, 90)), "p99": float(np.percentile(A_GAPS, 99))}
    assert exact[criterion] == pytest.approx(a_value)
    met = compute_metrics(hand_run(exact[criterion]), tbt_criterion=criterion)
    missed = compute_metrics(hand_run(exact[criterion] - 1e-9), tbt_criterion=criterion)
    assert met.tbt_criterion == criterion
    assert met.tbt_attainment == pytest.approx(3 / 5)
    assert missed.tbt_attainment == pytest.approx(2 / 5)
    assert missed.slo_attainment == pytest.approx(1 / 5)  # only E is left


def test_default_slo_0_7_splits_criteria() -> None:
    """With A's TBT SLO 0.7 s, mean and p90 pass A while p99 and max fail it."""
    shares = {c: compute_metrics(hand_run(), tbt_criterion=c).tbt_attainment
              for c in ("mean", "p90", "p99", "max")}
    assert shares == pytest.approx({"mean": 0.6, "p90": 0.6, "p99": 0.4, "max": 0.4})


def test_unknown_criterion_is_rejected() -> None:
    """A TBT criterion outside mean/p90/p99/max raises ValueError."""
    with pytest.raises(ValueError, match="p95"):
        compute_metrics(hand_run(), tbt_criterion="p95")


def test_empty_run() -> None:
    """No records: zero counts, every statistic None, JSON-serialisable."""
    m = compute_metrics([])
    d = m.to_dict()
    assert (m.requests, m.started, m.finished) == (0, 0, 0)
    assert all(v is None for k, v in d.items()
               if k not in ("requests", "started", "finished", "tbt_criterion"))
    json.dumps(d)
    assert per_request_rows([]) == []


def test_run_without_tokens() -> None:
    """Requests that never started: attainment 0, latency statistics and rates None."""
    m = compute_metrics([record("x", 0.0, 3, []), record("y", 1.0, 2, [])])
    assert (m.started, m.finished) == (0, 0)
    assert m.slo_attainment == 0.0 and m.ttft_attainment == 0.0
    assert m.ttft_p50_s is None and m.tbt_p50_s is None and m.goodput_rps is None


def test_to_dict_is_plain_json() -> None:
    """to_dict gives Python ints/floats (no numpy scalars) and round-trips through JSON."""
    d = compute_metrics(hand_run()).to_dict()
    assert all(v is None or type(v) in (int, float, str) for v in d.values())
    assert json.loads(json.dumps(d)) == d


def test_per_request_rows() -> None:
    """Rows carry each request's latencies, verdicts, chunk count, widest SP and decode set."""
    rows = {r["request_id"]: r for r in per_request_rows(hand_run())}
    a, c, d, e = rows["A"], rows["C"], rows["D"], rows["E"]
    assert tuple(a) == ROW_FIELDS
    assert a["ttft_s"] == pytest.approx(0.5) and a["e2e_s"] == pytest.approx(2.5)
    assert a["tbt_mean_s"] == pytest.approx(0.5) and a["tbt_max_s"] == pytest.approx(0.75)
    assert (a["chunks"], a["max_sp"], a["decode_instances"]) == (2, 4, "0;3")
    assert (a["met_ttft"], a["met_tbt"], a["met_slo"]) == (True, True, True)
    assert rows["B"]["met_ttft"] is False and rows["B"]["met_tbt"] is True
    assert c["e2e_s"] is None and c["tbt_mean_s"] == pytest.approx(0.25)
    assert (c["met_ttft"], c["met_tbt"]) == (True, False)
    assert d["ttft_s"] is None and d["tbt_max_s"] is None and d["met_slo"] is False
    assert (d["chunks"], d["max_sp"], d["decode_instances"]) == (0, 0, "")
    assert e["tbt_mean_s"] is None and e["met_slo"] is True


def test_csv_and_json_exports(tmp_path: Path) -> None:
    """CSV (empty cells for undefined) and JSON (null) files hold one row per request."""
    write_request_csv(hand_run(), tmp_path / "r.csv")
    write_request_json(hand_run(), tmp_path / "r.json", tbt_criterion="max")
    with (tmp_path / "r.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["request_id"] for r in rows] == ["A", "B", "C", "D", "E"]
    assert tuple(rows[0]) == ROW_FIELDS
    assert rows[3]["ttft_s"] == "" and rows[0]["decode_instances"] == "0;3"
    assert float(rows[0]["tbt_max_s"]) == pytest.approx(0.75)
    data = json.loads((tmp_path / "r.json").read_text())
    assert len(data) == 5 and data[3]["ttft_s"] is None
    assert data[0]["met_tbt"] is False  # judged by its max gap .75 > .7


@st.composite
def runs(draw: st.DrawFn) -> list[RequestRecord]:
    """Random runs: some requests unstarted, some unfinished, gaps including zeros."""
    records = []
    for i in range(draw(st.integers(1, 12))):
        arrival = draw(st.floats(0.0, 50.0))
        output = draw(st.integers(1, 8))
        produced = draw(st.integers(0, output))
        times: list[float] = []
        if produced:
            t = arrival + draw(st.floats(0.0, 5.0))
            times.append(t)
            for gap in draw(st.lists(st.sampled_from([0.0, 0.01, 0.05, 0.2, 1.0]),
                                     min_size=produced - 1, max_size=produced - 1)):
                t += gap
                times.append(t)
        records.append(record(f"r{i}", arrival, output, times,
                              ttft_slo=draw(st.sampled_from([0.5, 2.0, 10.0])),
                              # Off-grid SLOs: no statistic of grid gaps can tie one, so float
                              # rounding cannot flip a verdict between the two computations.
                              tbt_slo=draw(st.sampled_from([0.0301, 0.1003, 0.4999]))))
    return records


@settings(max_examples=150, deadline=None)
@given(recs=runs(), criterion=st.sampled_from(["mean", "p90", "p99", "max"]))
def test_random_run_properties(recs: list[RequestRecord], criterion: str) -> None:
    """On random runs: joint ≤ each attainment, percentiles ordered, and per-request verdicts
    equal a plain per-record loop over np.diff / np.percentile."""
    m = compute_metrics(recs, tbt_criterion=criterion)
    assert m.slo_attainment is not None and m.ttft_attainment is not None
    assert m.tbt_attainment is not None
    assert m.slo_attainment <= min(m.ttft_attainment, m.tbt_attainment) + 1e-12
    assert m.finished <= m.started <= m.requests
    for prefix in ("ttft", "tbt", "e2e"):
        p50, p90, p99 = (getattr(m, f"{prefix}_p{q}_s") for q in (50, 90, 99))
        if p50 is not None:
            assert p50 <= p90 + 1e-12 and p90 <= p99 + 1e-12

    def stat(gaps: npt.NDArray[np.float64]) -> float:
        if criterion in ("mean", "max"):
            return float(np.mean(gaps) if criterion == "mean" else np.max(gaps))
        return float(np.percentile(gaps, 90 if criterion == "p90" else 99))

    all_gaps = [np.diff(np.asarray(r.token_times)) for r in recs]
    pooled = np.concatenate(all_gaps)
    if pooled.size:
        assert m.tbt_p90_s == pytest.approx(float(np.percentile(pooled, 90)))
    met = 0
    for r, gaps in zip(recs, all_gaps, strict=True):
        ok_ttft = r.ttft_s is not None and r.ttft_s <= r.request.ttft_slo_s
        ok_tbt = bool(r.token_times) and r.finished and (
            gaps.size == 0 or stat(gaps) <= r.request.tbt_slo_s)
        met += ok_ttft and ok_tbt
    assert m.slo_attainment == pytest.approx(met / len(recs))
    if m.span_s:
        assert m.goodput_rps == pytest.approx(met / m.span_s)
    assert not any(isinstance(v, float) and math.isnan(v) for v in m.to_dict().values())
