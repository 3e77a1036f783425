"""Result plots: PNG and SVG files are written, bad suffixes are rejected before drawing."""

from __future__ import annotations

import re
from array import array
from pathlib import Path

import pytest

from tetris.evaluation.plots import plot_attainment_vs_rate, plot_cdfs, plot_sweep
from tetris.simulator.records import RequestRecord, SimRequest


def run(scale: float) -> list[RequestRecord]:
    """A few requests with spread-out TTFTs and gaps, one never started, one with a 0 s gap."""
    records = []
    for i in range(20):
        arrival = 0.5 * i
        first = arrival + scale * (0.1 + 0.05 * i)
        times = [first + scale * 0.01 * k * (1 + i % 3) for k in range(8)]
        records.append(RequestRecord(SimRequest(f"r{i}", arrival, 512, 8, 1.0, 0.03),
                                     token_times=array("d", times)))
    records.append(RequestRecord(SimRequest("late", 11.0, 512, 4, 1.0, 0.03),
                                 token_times=array("d", [11.5, 11.5, 11.6])))
    records.append(RequestRecord(SimRequest("never", 12.0, 512, 4, 1.0, 0.03)))
    return records


def test_cdfs_png(tmp_path: Path) -> None:
    """Two policies' TTFT/TBT CDFs are written as a real PNG."""
    out = tmp_path / "cdf.png"
    plot_cdfs({"tetris": run(1.0), "loongserve": run(2.5)}, out, title="CDFs")
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_cdfs_svg_with_an_empty_run(tmp_path: Path) -> None:
    """An SVG (uppercase suffix, str path) is written even when one policy has no records."""
    out = tmp_path / "cdf.SVG"
    plot_cdfs({"tetris": run(1.0), "empty": []}, str(out))
    text = out.read_text()
    assert "<svg" in text[:2000] and "tetris" in text


def test_attainment_vs_rate(tmp_path: Path) -> None:
    """Attainment curves (unsorted points) with the target line give a non-empty PNG."""
    out = tmp_path / "att.png"
    plot_attainment_vs_rate({"tetris": [(4.0, 0.7), (1.0, 1.0), (2.0, 0.95)],
                             "vllm": [(1.0, 0.9), (2.0, 0.6)]}, out, target=0.9)
    assert out.stat().st_size > 5_000


def test_sweep_with_gaps(tmp_path: Path) -> None:
    """A sweep with an undefined (None) value, log axes and a reference line writes an SVG."""
    out = tmp_path / "sweep.svg"
    plot_sweep({"a": [(1, 2.0), (2, None), (4, 3.0)], "b": [(1, 1.0), (2, 1.5), (4, 2.5)]},
               out, xlabel="instances", ylabel="p90 TTFT (s)", logx=True, logy=True, hline=2.5)
    assert "<svg" in out.read_text()[:2000]


@pytest.mark.parametrize("name", ["plot.pdf", "plot", "plot.png.txt"])
def test_bad_suffix_rejected(tmp_path: Path, name: str) -> None:
    """Every plot function raises ValueError naming the suffix, and writes nothing."""
    path = tmp_path / name
    suffix = re.escape(repr(path.suffix))
    with pytest.raises(ValueError, match=suffix):
        plot_cdfs({"x": run(1.0)}, path)
    with pytest.raises(ValueError, match=suffix):
        plot_attainment_vs_rate({"x": [(1.0, 1.0)]}, path)
    with pytest.raises(ValueError, match=suffix):
        plot_sweep({"x": [(1.0, 1.0)]}, path, xlabel="x", ylabel="y")
    assert not path.exists()
