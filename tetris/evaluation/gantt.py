"""Gantt chart of a plan: prefill instances × time, each request's chunks in its own colour.

A chunk spans the rows of all its instances, and groups only grow, so each request draws its
Tetris shape: a narrow block that widens as instances free up. Hatched grey is committed work
(busy until each instance's availability); a dashed line marks each arrival, a diamond each
request's prefill end (its first token).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.patheffects import withStroke

from tetris.solver.plan_json import ChunkOut, PlanReport, RequestPlanOut

ROW_HEIGHT = 0.86
LABEL_SIZE = 8.0
LABEL_PAD_PX = 18.0  # room for the prefill-end diamond at a block's right edge
BUSY_COLOUR = "#d9d9d9"
BUSY_EDGE = "#9a9a9a"
FORMATS = {".png": "png", ".svg": "svg"}
Colour = tuple[float, float, float, float]


@dataclass(frozen=True)
class _Label:
    x0: float
    x1: float
    y: float
    texts: tuple[str, ...]  # longest first; the first that fits is drawn


def draw_gantt(
    report: PlanReport,
    path: str | Path,
    title: str | None = None,
    *,
    gpus_per_node: int | None = None,
) -> None:
    """Write the chart to `path` (.png or .svg). `gpus_per_node` draws node boundaries."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"Gantt chart path must end in .png or .svg, got {path.name!r}")
    used = [g for p in report.plans for c in p.chunks for g in c.instances]
    n = max(report.num_instances, 1 + max(used, default=-1), 1)
    t_min = min([0.0, *(p.arrival_s for p in report.plans)])
    t_max = max([t_min + 1e-3, *report.availability_s, *(p.arrival_s for p in report.plans),
                 *(c.end_s for p in report.plans for c in p.chunks)])
    span = t_max - t_min

    # Tall enough for the rows and for the legend (one entry per request, plus 3 keys).
    height = max(3.2, 0.42 * n + 1.8, 0.3 * (len(report.plans) + 3) + 1.0)
    fig = Figure(figsize=(11.0, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas without pyplot: no global backend state touched
    ax = fig.add_subplot()

    busy = [(g, a) for g, a in enumerate(report.availability_s) if a > 0]
    for g, a in busy:
        ax.add_patch(Rectangle((0, g - ROW_HEIGHT / 2), a, ROW_HEIGHT, facecolor=BUSY_COLOUR,
                               edgecolor=BUSY_EDGE, hatch="///", linewidth=0.6, zorder=1))

    handles: list[Patch | Line2D] = []
    labels: list[_Label] = []
    for plan, colour in zip(report.plans, _colours(len(report.plans)), strict=True):
        labels += _draw_request(ax, plan, colour)
        handles.append(Patch(facecolor=colour, edgecolor="black", linewidth=0.6,
                             label=_legend_label(plan)))
    if busy:
        handles.append(Patch(facecolor=BUSY_COLOUR, edgecolor=BUSY_EDGE, hatch="///",
                             label="busy (committed work)"))
    handles.append(Line2D([], [], color="#555555", linestyle="--", label="arrival"))
    handles.append(Line2D([], [], color="#555555", marker="D", linestyle="none",
                          markeredgecolor="black", label="prefill end (first token)"))

    if gpus_per_node:
        for boundary in range(gpus_per_node, n, gpus_per_node):
            ax.axhline(boundary - 0.5, color="black", linewidth=1.0, zorder=0.5)
    ax.set_ylim(n - 0.5, -0.5)  # instance 0 on top
    ax.set_yticks(range(n), [f"inst {g}" for g in range(n)])
    ax.set_xlim(t_min - 0.01 * span, t_max + 0.03 * span)
    ax.set_xlabel("time from now (s)")
    ax.grid(axis="x", color="#e5e5e5", linewidth=0.8, zorder=0)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(axis="y", length=0)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
              fontsize=8, labelspacing=0.9)
    s = report.solver
    ax.set_title(title or f"solver {s.name} ({s.status}): {len(report.plans)} requests on "
                 f"{n} prefill instances", fontsize=11, loc="left")
    _place_labels(fig, ax, labels)
    fig.savefig(path, format=fmt)


def _colours(n: int) -> list[Colour]:
    from matplotlib import colormaps

    # tab10 is the most distinguishable palette; tab20 only when there are more requests.
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _runs(instances: list[int]) -> list[tuple[int, int]]:
    """Consecutive instance runs as (first, last): each drawn as one outlined block."""
    runs: list[tuple[int, int]] = []
    for g in sorted(instances):
        if runs and g == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], g)
        else:
            runs.append((g, g))
    return runs


def _anchor_row(chunk: ChunkOut) -> float:
    """Middle of the chunk's tallest run: where its label and marker sit."""
    first, last = max(_runs(chunk.instances), key=lambda r: (r[1] - r[0], -r[0]))
    return (first + last) / 2


def _legend_label(plan: RequestPlanOut) -> str:
    miss = "  MISSED" if not plan.meets_slo else ""
    sps = "→".join(str(c.sp) for c in plan.chunks)
    return (f"{plan.request_id}: {plan.prompt_tokens:,} tok, SP {sps}\n"
            f"TTFT {plan.ttft_s:.2f} s / SLO {plan.ttft_slo_s:.2f} s{miss}")


def _draw_request(ax: Axes, plan: RequestPlanOut, colour: Colour) -> list[_Label]:
    # Below the bars: the arrival line shows where the request waits, not through its work.
    ax.axvline(plan.arrival_s, color=colour, linestyle="--", linewidth=1.2, zorder=1.5)
    labels = []
    for k, chunk in enumerate(plan.chunks):
        width = chunk.end_s - chunk.start_s
        for g in chunk.instances:
            ax.add_patch(Rectangle((chunk.start_s, g - ROW_HEIGHT / 2), width, ROW_HEIGHT,
                                   facecolor=colour, edgecolor="none", zorder=2))
        # A lighter fill bridging the row gaps and one outline per run of consecutive
        # instances: the group reads as one block while its instance rows stay visible.
        for first, last in _runs(chunk.instances):
            corner = (chunk.start_s, first - ROW_HEIGHT / 2)
            height = last - first + ROW_HEIGHT
            ax.add_patch(Rectangle(corner, width, height, facecolor=colour, alpha=0.55,
                                   edgecolor="none", zorder=1.8))
            ax.add_patch(Rectangle(corner, width, height, facecolor="none",
                                   edgecolor="black", linewidth=0.8, zorder=2.5))
        texts = (f"{plan.request_id} c{k} sp{chunk.sp}", f"c{k} sp{chunk.sp}", f"c{k}")
        labels.append(_Label(chunk.start_s, chunk.end_s, _anchor_row(chunk), texts))
    ax.plot([plan.prefill_end_s], [_anchor_row(plan.chunks[-1])], marker="D", markersize=7,
            color=colour, markeredgecolor="black", zorder=5)
    return labels


def _place_labels(fig: Figure, ax: Axes, labels: list[_Label]) -> None:
    """Draw each chunk's longest label that fits its block, measured on the final layout."""
    fig.draw_without_rendering()  # settle the constrained layout so pixel widths are final
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    for label in labels:
        (px0, _), (px1, _) = ax.transData.transform([(label.x0, 0.0), (label.x1, 0.0)])
        room = abs(px1 - px0) - LABEL_PAD_PX
        for text in label.texts:
            artist = ax.text((label.x0 + label.x1) / 2, label.y, text, ha="center", va="center",
                             fontsize=LABEL_SIZE, color="white", fontweight="bold", zorder=4,
                             path_effects=[withStroke(linewidth=2, foreground="#333333")])
            if artist.get_window_extent(renderer).width <= room:
                break
            artist.remove()
