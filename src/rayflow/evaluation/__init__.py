"""Scoring samples and reporting the scores: what ``rayflow eval`` and the demo call.

One evaluated configuration is an :class:`EvalResult` (method, number of function evaluations, metrics).
Results are written as ``results.json`` (a list of flat rows ``{"method", "nfe", <metric>: value, ...}``)
and ``results.md`` (the same as a Markdown table), plotted against NFE, and samples are shown as grids.

Image samples are scored the way they would be saved: clamped to ``[-1, 1]`` and quantised to uint8
(:func:`rayflow.data.to_uint8_images`), and the reference images go through the same round trip, so a method
gains nothing from values a PNG could not hold. Fidelity to the teacher uses the unquantised model-space values.

By responsibility::

    results.py   EvalResult, the tables (plain and comparison), results.json / results.md
    scoring.py   evaluate_images (feature-network FD/KID, classifier FD, accuracy, Inception) and evaluate_vectors
    samples.py   the .npz sample files (never unpickled)
    figures.py   metric-vs-NFE plots, sample grids, per-method strips, 2-D scatters
"""

from __future__ import annotations

from rayflow.evaluation.figures import (
    _grid,
    _new_figure,
    _save_figure,
    plot_metric_vs_nfe,
    save_grid_by_method,
    save_sample_grid,
    scatter_2d,
)
from rayflow.evaluation.results import (
    METRIC_ORDER,
    EvalResult,
    format_comparison,
    format_table,
    make_result,
    write_results,
)
from rayflow.evaluation.samples import load_samples_npz, save_samples_npz
from rayflow.evaluation.scoring import DEFAULT_VIEW, _quantised, evaluate_images, evaluate_vectors

__all__ = [
    "DEFAULT_VIEW",
    "METRIC_ORDER",
    "EvalResult",
    "_grid",
    "_new_figure",
    "_quantised",
    "_save_figure",
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
