"""Figures: metric against NFE (log axis on request), sample grids, one labelled strip per method, 2-D scatters."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rayflow.errors import RayflowError, require
from rayflow.metrics import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

from rayflow.evaluation.results import EvalResult, _is_number, _rows_and_columns
from rayflow.evaluation.samples import _numpy

# --------------------------------------------------------------------------------------------------- figures


def _new_figure(figsize: tuple[float, float]) -> Figure:
    # An explicit Agg canvas instead of pyplot: no global figure state and no dependence on the session's backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def plot_metric_vs_nfe(
    rows: Sequence[EvalResult | Mapping[str, Any]], metric: str, path: str | os.PathLike, title: str | None = None,
    reference: float | tuple[str, float] | None = None, log_y: bool = False,
) -> Path:
    """PNG of ``metric`` against NFE: one line per method, NFE on a log2 axis, an optional dashed horizontal
    ``reference`` line (a value, or ``(label, value)`` such as ``("teacher, 50 steps", 3.2)``). ``log_y`` puts
    the metric on a log axis too, so that one bad 1-NFE row does not flatten every other line."""
    flat, columns = _rows_and_columns(rows)
    series: dict[str, list[tuple[int, float]]] = {}
    for f in flat:
        if _is_number(f.get(metric)):
            series.setdefault(str(f["method"]), []).append((int(f["nfe"]), float(f[metric])))
    if not series:
        raise RayflowError(f"no results have metric {metric!r}; available: {', '.join(columns) or 'none'}")
    fig = _new_figure((6.0, 4.0))
    ax = fig.add_subplot()
    nfes: set[int] = set()
    from matplotlib import colormaps

    colors = colormaps["tab20" if len(series) > 10 else "tab10"]
    for i, (method, pts) in enumerate(series.items()):
        pts.sort()
        nfes.update(n for n, _ in pts)
        ax.plot([n for n, _ in pts], [v for _, v in pts], marker="o", label=method, color=colors(i % colors.N))
    if reference is not None:
        label, value = reference if isinstance(reference, tuple) else ("reference", reference)
        ax.axhline(float(value), color="black", linestyle="--", linewidth=1, label=label)
    ax.set_xscale("log", base=2)
    if log_y and all(v > 0 for pts in series.values() for _, v in pts):
        ax.set_yscale("log")
    ticks = sorted(n for n in nfes if n > 0)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs NFE")
    ax.grid(True, alpha=0.3)
    if len(series) > 6:  # beside the axes, where it hides no line
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        ax.legend(fontsize="small")
    return _save_figure(fig, path)


def _as_nhwc_uint8(images: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    a = _numpy(images)
    if a.ndim == 3:
        a = a[..., None]
    require(a.dtype == np.uint8 and a.ndim == 4 and a.shape[-1] in (1, 3, 4) and a.shape[0] > 0,
            f"{what}: expected uint8 images [N, H, W, C] with C in 1, 3, 4, got {a.dtype} {list(a.shape)}")
    return a


def _grid(images: np.ndarray, nrow: int, pad: int = 1) -> np.ndarray:
    """Tile ``[N, H, W, C]`` into ``ceil(N / nrow)`` rows of ``nrow`` images with ``pad`` pixel gaps.

    Hand-written rather than ``diffusers.utils.make_image_grid`` (PIL images, no gaps, every row full): 8x8 and
    28x28 digits need the white gaps to read as separate samples, and a last row may be short.
    """
    n, h, w, c = images.shape
    nrow = max(1, min(nrow, n))
    rows = math.ceil(n / nrow)
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
    return out


def save_sample_grid(images_uint8: np.ndarray | torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> Path:
    """PNG grid of uint8 images ``[N, H, W, C]`` (or ``[N, H, W]``), ``nrow`` images per row.

    Images smaller than 32 pixels are enlarged by an integer factor (nearest neighbour) so 8x8 digits are
    visible at all; pixels are never interpolated.
    """
    from PIL import Image

    images = _as_nhwc_uint8(images_uint8, "sample grid")
    scale = max(1, math.ceil(32 / min(images.shape[1:3])))
    grid = _grid(images, nrow)
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    grid = grid[..., 0] if grid.shape[-1] == 1 else grid
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def save_grid_by_method(images_by_method: Mapping[str, np.ndarray | torch.Tensor], path: str | os.PathLike,
                        max_per_row: int = 16) -> Path:
    """PNG with one labelled row per method, showing its first ``max_per_row`` uint8 images ``[N, H, W, C]``."""
    require(len(images_by_method) > 0, "save_grid_by_method: no methods given")
    strips = {m: _grid(_as_nhwc_uint8(im, f"samples of {m}")[:max_per_row], max_per_row)
              for m, im in images_by_method.items()}
    width = max(s.shape[1] for s in strips.values())
    fig = _new_figure((max(4.0, width / 12), 0.9 * len(strips) + 0.2))
    for i, (method, strip) in enumerate(strips.items()):
        ax = fig.add_subplot(len(strips), 1, i + 1)
        ax.imshow(strip[..., 0] if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_xlim(-0.5, width - 0.5)  # left-align shorter rows instead of stretching them
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
        ax.set_ylabel(method, rotation=0, ha="right", va="center", fontsize=9)
    return _save_figure(fig, path)


def scatter_2d(
    samples_by_method: Mapping[str, torch.Tensor | np.ndarray], path: str | os.PathLike,
    truth: torch.Tensor | np.ndarray | None = None, max_points: int = 5000,
) -> Path:
    """PNG with one panel per method: a scatter of the first two coordinates of its samples, over the
    ``truth`` samples in grey when given. All panels share axis limits so spreads are comparable."""
    require(len(samples_by_method) > 0, "scatter_2d: no methods given")
    pts = {m: _numpy(s).reshape(len(s), -1)[:max_points] for m, s in samples_by_method.items()}
    ref = None if truth is None else _numpy(truth).reshape(len(truth), -1)[:max_points]
    for name, p in [*pts.items(), *([("truth", ref)] if ref is not None else [])]:
        require(p.ndim == 2 and p.shape[1] >= 2, f"scatter_2d: {name} needs at least 2 coordinates, got {p.shape}")
    # Shared limits from robust percentiles of the truth (of all samples without it), padded: one runaway sample
    # must not shrink every panel to a dot; points left outside are counted in the panel titles instead.
    basis = ref[:, :2] if ref is not None else np.concatenate([p[:, :2] for p in pts.values()])
    basis = basis[np.isfinite(basis).all(1)]
    lo, hi = np.percentile(basis, [0.5, 99.5], axis=0) if len(basis) else (np.full(2, -1.0), np.full(2, 1.0))
    margin = 0.25 * np.maximum(hi - lo, 1e-6)
    lo, hi = lo - margin, hi + margin
    cols = min(4, len(pts))
    rows = math.ceil(len(pts) / cols)
    fig = _new_figure((3.2 * cols, 3.2 * rows))
    for i, (method, p) in enumerate(pts.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        if ref is not None:
            ax.scatter(ref[:, 0], ref[:, 1], s=2, color="0.75", label="truth", rasterized=True)
        ax.scatter(p[:, 0], p[:, 1], s=2, color="C0", label=method, rasterized=True)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_aspect("equal", adjustable="box")
        # Points beyond the shared limits are counted, so a diverged method cannot look tidy by being off-screen.
        xy = p[:, :2]
        outside = int((~(np.isfinite(xy).all(1) & (xy >= lo).all(1) & (xy <= hi).all(1))).sum())
        ax.set_title(method + (f" ({outside} of {len(p)} outside)" if outside else ""), fontsize=10)
        ax.tick_params(labelsize=7)
    return _save_figure(fig, path)
