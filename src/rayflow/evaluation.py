"""Scoring samples and reporting the scores: what ``rayflow eval`` and the demo call.

One evaluated configuration is an :class:`EvalResult` (method, number of function evaluations, metrics).
Results are written as ``results.json`` (a list of flat rows ``{"method", "nfe", <metric>: value, ...}``)
and ``results.md`` (the same as a Markdown table), plotted against NFE, and samples are shown as grids.

Image samples are scored the way they would be saved: clamped to ``[-1, 1]`` and quantised to uint8
(:func:`rayflow.data.to_uint8_images`), and the reference images go through the same round trip, so a method
gains nothing from values a PNG could not hold. Fidelity to the teacher uses the unquantised model-space values.
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rayflow.errors import RayflowError, require
from rayflow.metrics import (
    FeatureNet,
    atomic_write_bytes,
    classifier_accuracy,
    extract_features,
    frechet_distance,
    kernel_distance,
    mean_pairwise_distance,
    mmd_rbf,
    sliced_wasserstein,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from rayflow.data import Dataset

__all__ = [
    "EvalResult",
    "evaluate_images",
    "evaluate_vectors",
    "format_comparison",
    "format_table",
    "load_samples_npz",
    "make_result",
    "plot_metric_vs_nfe",
    "save_grid_by_method",
    "save_sample_grid",
    "save_samples_npz",
    "scatter_2d",
    "write_results",
]

#: metric columns shown first, in this order; any others follow in order of first appearance
METRIC_ORDER: tuple[str, ...] = ("fd", "kid", "kid_std", "accuracy", "sw", "mmd", "fidelity")
_ROW_KEYS = ("method", "nfe")


# --------------------------------------------------------------------------------------------------- results


@dataclass
class EvalResult:
    """One evaluated configuration: ``method`` sampled with ``nfe`` network evaluations scored ``metrics``.

    ``extra`` carries what describes the run rather than scores it (sampler, steps, guidance, wall time,
    feature network); it goes into ``results.json`` but not into the table's metric columns.
    """

    method: str
    nfe: int
    metrics: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        """The flat JSON row ``{"method": ..., "nfe": ..., <metric>: value, ..., <extra>: value, ...}``."""
        keys = set(self.metrics) | set(self.extra)
        clash = sorted((set(self.metrics) & set(self.extra)) | (set(_ROW_KEYS) & keys))
        if clash:
            raise ValueError(f"EvalResult {self.method!r}: keys {clash} would collide in the flat row")
        return {"method": self.method, "nfe": int(self.nfe), **self.metrics, **self.extra}


def make_result(method: str, nfe: int, measured: Mapping[str, Any], **extra: Any) -> EvalResult:
    """An :class:`EvalResult` from an ``evaluate_*`` dict: numbers become metrics, the rest (e.g. the
    ``feature_net`` name) goes to ``extra`` together with the keyword arguments."""
    metrics = {k: float(v) for k, v in measured.items() if _is_number(v)}
    rest = {k: v for k, v in measured.items() if not _is_number(v)}
    return EvalResult(method=method, nfe=int(nfe), metrics=metrics, extra={**rest, **extra})


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _as_row(row: EvalResult | Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A flat row and its metric columns (an EvalResult's metrics; for a plain dict, its numeric keys)."""
    if isinstance(row, EvalResult):
        return row.to_row(), list(row.metrics)
    require("method" in row and "nfe" in row, f"a result row needs 'method' and 'nfe', got keys {sorted(row)}")
    return dict(row), [k for k, v in row.items() if k not in _ROW_KEYS and _is_number(v)]


def _rows_and_columns(rows: Sequence[EvalResult | Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    flat, seen = [], []
    for r in rows:
        f, cols = _as_row(r)
        flat.append(f)
        seen += [c for c in cols if c not in seen]
    columns = [c for c in METRIC_ORDER if c in seen] + [c for c in seen if c not in METRIC_ORDER]
    flat.sort(key=lambda f: (str(f["method"]), int(f["nfe"])))
    return flat, columns


def _fmt(v: Any) -> str:
    """Numbers for a table: 4 significant digits (``12.35``, ``0.00125``, ``1.234e-05``), 1 decimal from 1000 up."""
    if v is None:
        return "–"
    if not _is_number(v):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    if not math.isfinite(v):
        return str(v)  # nan / inf: a diverged run must be visible, not hidden
    return f"{v:.1f}" if abs(v) >= 1000 else f"{v:.4g}"


def format_table(rows: Sequence[EvalResult | Mapping[str, Any]]) -> str:
    """A Markdown table: ``method | nfe | <metrics...>``, sorted by method then NFE; ``–`` marks a missing value."""
    flat, columns = _rows_and_columns(rows)
    header = ["method", "nfe", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for f in flat:
        lines.append("| " + " | ".join([str(f["method"]), str(int(f["nfe"]))] + [_fmt(f.get(c)) for c in columns])
                     + " |")
    return "\n".join(lines) + "\n"


#: metrics where a larger value is better (every other metric: lower is better)
HIGHER_IS_BETTER: frozenset[str] = frozenset({"accuracy", "fidelity"})


def format_comparison(rows: Sequence[EvalResult | Mapping[str, Any]], metric: str, sort_nfe: int = 4,
                      names: Mapping[str, str] | None = None, reference: str | None = None) -> str:
    """A Markdown table to read at a glance: one row per method, one ``metric`` column per NFE.

    The ``reference`` row (e.g. the teacher at 50 steps) comes first; the others are sorted by ``metric`` at
    ``sort_nfe`` (best first; methods without that NFE last), the best value of every NFE column is bold, and
    the header says which direction is better. ``names`` maps a row's method to its display name.
    """
    flat, _ = _rows_and_columns(rows)
    names = dict(names or {})
    higher = metric in HIGHER_IS_BETTER
    table: dict[str, dict[int, float]] = {}
    for f in flat:
        v = f.get(metric)
        if _is_number(v):
            table.setdefault(str(f["method"]), {})[int(f["nfe"])] = float(v)
    ref = table.pop(reference, None) if reference is not None else None
    nfes = sorted({n for vals in table.values() for n in vals})

    def key(item: tuple[str, dict[int, float]]) -> tuple[int, float, str]:
        v = item[1].get(sort_nfe)
        if v is None or not math.isfinite(v):
            return (1, 0.0, item[0])
        return (0, -v if higher else v, item[0])

    ordered = sorted(table.items(), key=key)
    best = {}
    for n in nfes:
        vals = [vals[n] for _, vals in ordered if n in vals and math.isfinite(vals[n])]
        if vals:
            best[n] = max(vals) if higher else min(vals)
    better = "higher" if higher else "lower"
    title = f"{metric.upper()} by NFE ({better} is better; sorted by NFE {sort_nfe}; best of each column in bold)"
    lines = [title, "",
             "| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|" + "|".join(["---:"] * len(nfes)) + "|"]
    if ref is not None:
        (ref_nfe, ref_value), = list(ref.items())[:1]
        lines.append(f"| {names.get(reference, reference)} (reference, NFE {ref_nfe}) | "
                     + " | ".join([_fmt(ref_value)] * len(nfes)) + " |")
    for method, vals in ordered:
        cells = []
        for n in nfes:
            v = vals.get(n)
            cell = _fmt(v)
            cells.append(f"**{cell}**" if v is not None and best.get(n) == v else cell)
        lines.append(f"| {names.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _json_safe(v: Any) -> Any:
    # Strict JSON has no NaN/Infinity; a diverged metric is written as null rather than an unparseable token.
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, Mapping):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def write_results(
    rows: Sequence[EvalResult | Mapping[str, Any]], out_dir: str | os.PathLike, name: str = "results"
) -> tuple[Path, Path]:
    """Write ``<name>.json`` (a JSON list of flat rows, sorted like the table) and ``<name>.md``, atomically.

    Non-finite metric values become ``null`` in the JSON (strict JSON has no NaN) and ``nan`` in the table.
    Returns the two paths.
    """
    flat, _ = _rows_and_columns(rows)
    out_dir = Path(out_dir)
    js = atomic_write_bytes(out_dir / f"{name}.json",
                            (json.dumps(_json_safe(flat), indent=2, allow_nan=False) + "\n").encode())
    md = atomic_write_bytes(out_dir / f"{name}.md", format_table(rows).encode())
    return js, md


# --------------------------------------------------------------------------------------------------- evaluation


def _model_images(samples: torch.Tensor | np.ndarray, shape: tuple[int, int, int], what: str) -> torch.Tensor:
    """``[N, C, H, W]`` model-space images (floats) or uint8 ``[N, H, W, C]`` -> float32 ``[N, C, H, W]``."""
    is_uint8 = (isinstance(samples, np.ndarray) and samples.dtype == np.uint8) or (
        isinstance(samples, torch.Tensor) and samples.dtype == torch.uint8)
    x = torch.as_tensor(samples).detach().cpu()
    if is_uint8:
        require(x.ndim == 4, f"{what}: uint8 images must be [N, H, W, C], got shape {list(x.shape)}")
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    x = x.float()
    require(x.ndim == 4 and tuple(x.shape[1:]) == shape,
            f"{what}: expected images [N, {', '.join(map(str, shape))}] (or uint8 [N, {shape[1]}, {shape[2]}, "
            f"{shape[0]}]), got {'uint8 ' if is_uint8 else ''}shape {list(torch.as_tensor(samples).shape)}")
    return x


def _quantised(x: torch.Tensor) -> torch.Tensor:
    """Model-space images through the uint8 round trip a saved PNG makes (``to_uint8_images``, ``v/127.5-1``)."""
    from rayflow.data import to_uint8_images

    return torch.from_numpy(to_uint8_images(x)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def evaluate_images(
    samples: torch.Tensor | np.ndarray, reference: Dataset, feature_net: FeatureNet,
    labels: torch.Tensor | None = None, teacher_samples: torch.Tensor | np.ndarray | None = None,
    kid_subsets: int = 10, kid_subset_size: int = 1000,
) -> dict[str, float | str]:
    """Score image samples (model-space ``[N, C, H, W]`` or uint8 ``[N, H, W, C]``) against ``reference``.

    Returns ``fd`` (:func:`~rayflow.metrics.frechet_distance` of ``feature_net`` features vs the reference
    images), ``kid`` and ``kid_std`` (:func:`~rayflow.metrics.kernel_distance`), ``accuracy`` (how often
    ``feature_net`` classifies a conditional sample as the label it was generated with; only with ``labels``),
    ``fidelity`` (:func:`~rayflow.metrics.mean_pairwise_distance` to the teacher's samples from the same noise;
    only with ``teacher_samples``) and ``feature_net``, the network's name. FD and KID are biased/noisier at
    small N, so compare methods at equal sample counts; use a held-out split as ``reference`` (the feature
    network was trained on the train split).
    """
    shape = feature_net.input_shape
    require(getattr(reference, "kind", "image") == "image", f"{reference.spec}: image metrics need image data")
    require(tuple(reference.x.shape[1:]) == shape,
            f"feature net {feature_net.name!r} expects images {list(shape)}, but the reference data "
            f"{reference.spec} has {list(reference.x.shape[1:])}")
    x = _model_images(samples, shape, "samples")
    images = _quantised(x)
    ref = _quantised(reference.x)
    feats, ref_feats = extract_features(feature_net, images), extract_features(feature_net, ref)
    kid, kid_std = kernel_distance(feats, ref_feats, num_subsets=kid_subsets, subset_size=kid_subset_size)
    out: dict[str, float | str] = {"fd": frechet_distance(feats, ref_feats), "kid": kid, "kid_std": kid_std}
    if labels is not None:
        labels = torch.as_tensor(labels).long().reshape(-1)
        require(labels.shape[0] == x.shape[0], f"{labels.shape[0]} labels for {x.shape[0]} samples")
        require(bool(((labels >= 0) & (labels < feature_net.num_classes)).all()),
                f"labels must lie in 0..{feature_net.num_classes - 1} (the classes of {feature_net.name!r})")
        out["accuracy"] = classifier_accuracy(feature_net, images, labels)
    if teacher_samples is not None:
        out["fidelity"] = mean_pairwise_distance(x, _model_images(teacher_samples, shape, "teacher samples"))
    out["feature_net"] = feature_net.name
    return out


def evaluate_vectors(
    samples: torch.Tensor, reference_samples: torch.Tensor, teacher_samples: torch.Tensor | None = None
) -> dict[str, float]:
    """Score vector samples ``[N, D]``: ``sw`` (sliced W2), ``mmd`` (multi-bandwidth RBF MMD²) against the
    reference, and ``fidelity`` to the teacher's samples from the same noise when given."""
    samples, reference_samples = torch.as_tensor(samples), torch.as_tensor(reference_samples)
    out = {"sw": sliced_wasserstein(samples, reference_samples), "mmd": mmd_rbf(samples, reference_samples)}
    if teacher_samples is not None:
        out["fidelity"] = mean_pairwise_distance(samples, torch.as_tensor(teacher_samples))
    return out


# --------------------------------------------------------------------------------------------------- sample files


def save_samples_npz(
    path: str | os.PathLike, x: torch.Tensor | np.ndarray, images: np.ndarray | None = None,
    labels: torch.Tensor | np.ndarray | None = None,
) -> Path:
    """Write samples as ``rayflow sample`` does, atomically: ``x`` float32 (model space), ``images`` uint8
    ``[N, H, W, C]`` for image data, ``labels`` int64 ``[N]`` when conditional. The path is used as given."""
    arrays = {"x": np.ascontiguousarray(_numpy(x), dtype=np.float32)}
    n = arrays["x"].shape[0]
    if images is not None:
        images = _numpy(images)
        require(images.dtype == np.uint8 and images.ndim == 4 and images.shape[0] == n,
                f"images must be uint8 [N={n}, H, W, C], got {images.dtype} {list(images.shape)}")
        arrays["images"] = np.ascontiguousarray(images)
    if labels is not None:
        labels = _numpy(labels).reshape(-1)
        require(labels.shape[0] == n, f"{labels.shape[0]} labels for {n} samples")
        arrays["labels"] = labels.astype(np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def _numpy(a: torch.Tensor | np.ndarray) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def load_samples_npz(path: str | os.PathLike) -> dict[str, Any]:
    """Read a samples file: ``{"x": float32 tensor, "images": uint8 ndarray [N,H,W,C] or None, "labels": int64
    tensor or None}``. Never unpickles; a missing/corrupt file or missing/ill-shaped arrays raise
    :class:`RayflowError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise RayflowError(f"samples file not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array
            raise RayflowError(f"{path}: not a .npz samples file (expected arrays x[, images, labels])")
        with loaded as npz:
            found = ", ".join(npz.files) or "none"
            arrays = {k: npz[k] for k in ("x", "images", "labels") if k in npz.files}
    except RayflowError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        # numpy's messages for damaged files vary (truncated zip, object arrays refused without pickle, ...)
        raise RayflowError(f"cannot read samples file {path}: {e}") from None
    if "x" not in arrays:
        raise RayflowError(f"{path}: no array 'x' in the samples file (found {found})")
    x = arrays["x"]
    require(x.dtype.kind == "f" and x.ndim >= 2 and x.shape[0] > 0,
            f"{path}: 'x' must be a non-empty float array [N, ...], got {x.dtype} {list(x.shape)}")
    images, labels = arrays.get("images"), arrays.get("labels")
    if images is not None:
        require(images.dtype == np.uint8 and images.ndim == 4 and images.shape[0] == x.shape[0],
                f"{path}: 'images' must be uint8 [N={x.shape[0]}, H, W, C], got {images.dtype} {list(images.shape)}")
    if labels is not None:
        require(labels.dtype.kind in "iu" and labels.shape == (x.shape[0],),
                f"{path}: 'labels' must be integers [N={x.shape[0]}], got {labels.dtype} {list(labels.shape)}")
    return {
        "x": torch.from_numpy(x.astype(np.float32)),
        "images": images,
        "labels": None if labels is None else torch.from_numpy(labels.astype(np.int64)),
    }


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
    """Tile ``[N, H, W, C]`` into ``ceil(N / nrow)`` rows of ``nrow`` images with ``pad`` pixel gaps."""
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
