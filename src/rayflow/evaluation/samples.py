"""Sample files: ``.npz`` archives of samples with their labels and provenance, written atomically and read back
with one-line errors."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rayflow.errors import RayflowError, require
from rayflow.metrics import atomic_write_bytes

# --------------------------------------------------------------------------------------------------- sample files


def save_samples_npz(
    path: str | os.PathLike, x: torch.Tensor | np.ndarray, images: np.ndarray | None = None,
    labels: torch.Tensor | np.ndarray | None = None, nfe: int | None = None,
) -> Path:
    """Write samples as ``rayflow sample`` does, atomically: ``x`` float32 (model space), ``images`` uint8
    ``[N, H, W, C]`` for image data, ``labels`` int64 ``[N]`` when conditional, ``nfe`` an int64 scalar (the
    network evaluations per sample, the default row label of ``rayflow eval``). The path is used as given."""
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
    if nfe is not None:
        arrays["nfe"] = np.asarray(int(nfe), dtype=np.int64)
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
            arrays = {k: npz[k] for k in ("x", "images", "labels", "nfe") if k in npz.files}
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
    nfe = arrays.get("nfe")
    if nfe is not None:
        require(nfe.dtype.kind in "iu" and nfe.shape == () and int(nfe) >= 0,
                f"{path}: 'nfe' must be a non-negative integer scalar, got {nfe.dtype} {list(nfe.shape)}")
    return {
        "x": torch.from_numpy(x.astype(np.float32)),
        "images": images,
        "labels": None if labels is None else torch.from_numpy(labels.astype(np.int64)),
        "nfe": None if nfe is None else int(nfe),
    }
