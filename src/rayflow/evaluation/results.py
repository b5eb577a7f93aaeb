"""Result rows and their reports: :class:`EvalResult`, the plain and the comparison tables (teacher first, sorted
by the metric at a fixed NFE, best per column marked), ``results.json`` / ``results.md``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rayflow.errors import require
from rayflow.metrics import atomic_write_bytes

#: metric columns shown first, in this order; any others follow in order of first appearance
METRIC_ORDER: tuple[str, ...] = ("fd", "kid", "kid_std", "fd_net2", "fd_multilayer", "fd_classifier", "inception_fid",
                                  "inception_kid", "accuracy", "sw", "mmd", "fidelity")
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
