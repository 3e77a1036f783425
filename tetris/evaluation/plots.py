"""Result plots comparing policies: latency CDFs, SLO attainment vs arrival rate, and a generic
metric-vs-parameter sweep.

Figures are drawn on matplotlib's Agg canvas without pyplot (no display, no global backend
state) and written as PNG or SVG by the path's suffix.

- `plot_cdfs`: TTFT CDF over *all* requests of a run (a policy that never starts some requests
  plateaus below 1) and TBT CDF over all inter-token gaps (token-weighted, like the `tbt_*`
  metrics), both on a log time axis. A dotted line marks the SLO when every request of every
  run shares the same one.
- `plot_attainment_vs_rate`: SLO attainment per arrival rate, one line per policy, with the
  target as a dashed line (a policy's capacity is where its line crosses it).
- `plot_sweep`: any metric against any swept parameter, one line per policy.
- `plot_roles`: on an elastic cluster, GPUs prefilling, decoding and draining over time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tetris.simulator.records import RequestRecord

FORMATS = {".png": "png", ".svg": "svg"}
MAX_CDF_POINTS = 2000  # enough for a smooth curve; 4M raw gaps would make a huge SVG
GRID_COLOUR = "#e5e5e5"
TARGET_COLOUR = "#555555"

FloatArray = npt.NDArray[np.float64]


def plot_cdfs(
    runs: Mapping[str, Sequence[RequestRecord]], path: str | Path, *, title: str | None = None,
) -> None:
    """Two panels, TTFT CDF and TBT CDF (log x), one line per policy in `runs`."""
    fmt = _format(path)
    fig, (ax_ttft, ax_tbt) = _figure(ncols=2)
    ttft_slos: set[float] = set()
    tbt_slos: set[float] = set()
    for policy, records in runs.items():
        ttft = np.array([r.ttft_s for r in records if r.ttft_s is not None], dtype=np.float64)
        _cdf(ax_ttft, ttft, total=len(records), label=policy)
        tbt = _all_gaps(records)
        _cdf(ax_tbt, tbt, total=tbt.size, label=policy)
        ttft_slos.update(r.request.ttft_slo_s for r in records)
        tbt_slos.update(r.request.tbt_slo_s for r in records)
    for ax, slos, name in ((ax_ttft, ttft_slos, "TTFT"), (ax_tbt, tbt_slos, "TBT")):
        if len(slos) == 1 and np.isfinite(slo := next(iter(slos))) and slo > 0:
            ax.axvline(slo, color=TARGET_COLOUR, linestyle=":", linewidth=1.2,
                       label=f"SLO {slo:g} s")
        _style(ax, xlabel=f"{name} (s)", ylabel="fraction of requests" if name == "TTFT"
               else "fraction of tokens")
        ax.set_xscale("log")
        ax.set_ylim(0.0, 1.02)
        ax.set_title(f"{name} CDF", fontsize=11, loc="left")
    if title:
        fig.suptitle(title, fontsize=12)
    fig.savefig(path, format=fmt)


def plot_attainment_vs_rate(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    target: float = 0.9,
    title: str | None = None,
    bounds: Mapping[str, float] | None = None,
) -> None:
    """SLO attainment against arrival rate, from (rate, attainment) points per policy;
    `bounds` (label -> req/s) are drawn as vertical lines: the limits no policy can pass."""
    fmt = _format(path)
    fig, (ax,) = _figure(ncols=1)
    for policy, points in curves.items():
        ordered = sorted(points)
        ax.plot([p[0] for p in ordered], [p[1] for p in ordered], marker="o", markersize=4,
                linewidth=1.6, label=policy)
    ax.axhline(target, color=TARGET_COLOUR, linestyle="--", linewidth=1.2,
               label=f"target {target:g}")
    for (label, rate), style in zip((bounds or {}).items(), ("-", "-.", ":"), strict=False):
        ax.axvline(rate, color="black", linestyle=style, linewidth=1.0,
                   label=f"{label} {rate:.3g}")
    ax.set_ylim(0.0, 1.05)
    _style(ax, xlabel="arrival rate (requests/s)", ylabel="SLO attainment")
    ax.set_title(title or "SLO attainment vs arrival rate", fontsize=11, loc="left")
    fig.savefig(path, format=fmt)


def plot_sweep(
    series: Mapping[str, Sequence[tuple[float, float | None]]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    logx: bool = False,
    logy: bool = False,
    hline: float | None = None,
) -> None:
    """`ylabel` against `xlabel` from (x, y) points per policy; y None (undefined metric) leaves
    a gap in that policy's line. `hline` draws a dashed reference level (a target, an SLO)."""
    fmt = _format(path)
    fig, (ax,) = _figure(ncols=1)
    for policy, points in series.items():
        ordered = sorted(points, key=lambda p: p[0])
        ys = [np.nan if y is None else y for _, y in ordered]
        ax.plot([x for x, _ in ordered], ys, marker="o", markersize=4, linewidth=1.6,
                label=policy)
    if hline is not None:
        ax.axhline(hline, color=TARGET_COLOUR, linestyle="--", linewidth=1.2,
                   label=f"{hline:g}")
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    _style(ax, xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title or f"{ylabel} vs {xlabel}", fontsize=11, loc="left")
    fig.savefig(path, format=fmt)


def plot_roles(timeline: Sequence[tuple[float, int, int, int]], path: str | Path, *,
               title: str | None = None) -> None:
    """GPUs per role over one run, as stacked steps (each change holds until the next)."""
    fmt = _format(path)
    fig, (ax,) = _figure(ncols=1)
    if timeline:
        t = [p[0] for p in timeline]
        stacks = [[p[i] for p in timeline] for i in (1, 3, 2)]
        ax.stackplot(t, *stacks, step="post", labels=("prefill", "draining", "decode"),
                     colors=("#4c72b0", "#bbbbbb", "#dd8452"))
        ax.set_xlim(t[0], t[-1] if t[-1] > t[0] else t[0] + 1.0)
    _style(ax, xlabel="simulated time (s)", ylabel="GPUs")
    ax.set_title(title or "GPU roles over time", fontsize=11, loc="left")
    fig.savefig(path, format=fmt)


def _format(path: str | Path) -> str:
    """The file format for `path`, checked before any drawing work."""
    suffix = Path(path).suffix
    fmt = FORMATS.get(suffix.lower())
    if fmt is None:
        raise ValueError(f"plot path must end in .png or .svg, got suffix {suffix!r} "
                         f"({Path(path).name!r})")
    return fmt


def _figure(*, ncols: int) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(5.2 * ncols + 0.8, 4.0), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas without pyplot: no global backend state touched
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _style(ax: Axes, *, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", color=GRID_COLOUR, linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False, fontsize=8)


def _all_gaps(records: Sequence[RequestRecord]) -> FloatArray:
    gaps = [np.diff(np.frombuffer(r.token_times, np.float64))
            for r in records if len(r.token_times) >= 2]
    return np.concatenate(gaps) if gaps else np.empty(0)


def _cdf(ax: Axes, values: FloatArray, *, total: int, label: str) -> None:
    """Empirical CDF of `values` as a fraction of `total` (≥ len(values)), thinned to
    `MAX_CDF_POINTS` evenly spaced order statistics."""
    if not values.size or total <= 0:
        ax.plot([], [], label=f"{label} (no data)")
        return
    ordered = np.sort(values)
    fraction = np.arange(1, ordered.size + 1) / total
    if ordered.size > MAX_CDF_POINTS:
        keep = np.unique(np.linspace(0, ordered.size - 1, MAX_CDF_POINTS).round().astype(int))
        ordered, fraction = ordered[keep], fraction[keep]
    # A log axis cannot show 0 s; clip to a tiny positive time instead of dropping the point.
    floor = ordered[ordered > 0].min() if (ordered > 0).any() else 1e-6
    ax.step(np.maximum(ordered, floor), fraction, where="post", linewidth=1.6, label=label)
