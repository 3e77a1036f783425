"""The Gantt chart writer: PNG and SVG files, suffix checking."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import linear_cost_model, problem, request
from tetris.evaluation.gantt import draw_gantt
from tetris.solver.greedy import solve_greedy
from tetris.solver.plan_json import PlanReport, report_from_result


@pytest.fixture(scope="module")
def report() -> PlanReport:
    prob = problem(linear_cost_model(6, gpus_per_node=4), (0.0, 0.0, 2.0, 2.0, 5.0, 0.5),
                   request("long", 8192), request("short", 1024, arrival=0.4),
                   request("mid", 4096, arrival=1.0), now_s=0.0)
    rep = report_from_result(prob, solve_greedy(prob))
    assert any(len(p.chunks) > 1 for p in rep.plans)  # a Tetris shape is actually drawn
    return rep


def test_png_is_written(report: PlanReport, tmp_path: Path) -> None:
    """A .png path gives a real PNG file of non-trivial size."""
    out = tmp_path / "plan.png"
    draw_gantt(report, out, title="test plan", gpus_per_node=4)
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000


def test_svg_is_written(report: PlanReport, tmp_path: Path) -> None:
    """A .svg path (given as str) gives an SVG document naming the requests."""
    out = tmp_path / "plan.SVG"
    draw_gantt(report, str(out))
    text = out.read_text()
    assert "<svg" in text[:2000]
    assert len(text) > 10_000
    assert "long" in text and "short" in text  # legend entries per request


def test_empty_report_still_draws(tmp_path: Path) -> None:
    """A report with no plans draws the busy shading alone rather than failing."""
    prob = problem(linear_cost_model(2), (1.0, 0.0))
    out = tmp_path / "empty.png"
    draw_gantt(report_from_result(prob, solve_greedy(prob)), out)
    assert out.stat().st_size > 1_000


@pytest.mark.parametrize("name", ["plan.pdf", "plan", "plan.png.txt"])
def test_bad_suffix_raises(report: PlanReport, tmp_path: Path, name: str) -> None:
    """Any suffix other than .png/.svg is a ValueError, and nothing is written."""
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        draw_gantt(report, tmp_path / name)
    assert not list(tmp_path.iterdir())


def test_pyplot_state_untouched(report: PlanReport, tmp_path: Path) -> None:
    """Drawing leaves no pyplot figures open (the module never goes through pyplot)."""
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    draw_gantt(report, tmp_path / "p.png")
    assert plt.get_fignums() == before
