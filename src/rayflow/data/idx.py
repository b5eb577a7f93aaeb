"""IDX files (the MNIST / Fashion-MNIST format), gzipped or raw, read and checked byte by byte."""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from rayflow.data.dataset import Dataset, _pad_images, _uint8_to_model
from rayflow.errors import RayflowError

_IDX_IMAGES_MAGIC = 2051  # unsigned bytes, 3 dims [N, H, W]
_IDX_LABELS_MAGIC = 2049  # unsigned bytes, 1 dim [N]
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """A file's bytes, gunzipped when it starts with the gzip magic (whatever its name says)."""
    if not path.exists():
        raise RayflowError(f"{path}: no such file")
    if not path.is_file():
        raise RayflowError(f"{path}: not a regular file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RayflowError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if data[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(data)
        except EOFError as exc:
            raise RayflowError(f"{path}: truncated gzip file (the compressed stream ends early)") from exc
        except (OSError, zlib.error) as exc:
            raise RayflowError(f"{path}: corrupt gzip file: {exc}") from exc
    if path.suffix == ".gz":
        raise RayflowError(f"{path}: named .gz but is not gzip data (first bytes {data[:2].hex() or 'none'})")
    return data


def _read_idx(path: Path, magic: int, what: str) -> np.ndarray:
    """An unsigned-byte IDX array (``magic`` 2051 for ``[N, H, W]`` images, 2049 for ``[N]`` labels).

    The format: a big-endian uint32 magic ``0x0000TTDD`` (``TT=0x08`` unsigned bytes, ``DD`` the number of
    dims), one big-endian uint32 per dim, then the data in C order. The magic, the dims and the exact length
    are all checked so a wrong or damaged file is reported instead of silently mis-read.
    """
    data = _read_bytes(path)
    if len(data) < 4:
        raise RayflowError(f"{path}: {len(data)} bytes is too short to be an IDX file (expected {what})")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise RayflowError(f"{path}: wrong IDX magic number: found {found} (0x{found:08x}), expected {magic} ({what})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise RayflowError(f"{path}: truncated IDX header: {len(data)} bytes, the header alone needs {header}")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if any(d == 0 for d in dims):
        raise RayflowError(f"{path}: IDX header declares an empty array of shape {tuple(dims)}")
    expected = math.prod(dims)
    body = len(data) - header
    if body < expected:
        raise RayflowError(
            f"{path}: file is shorter than its header claims: shape {tuple(dims)} needs {expected} bytes of data, "
            f"found {body}"
        )
    if body > expected:
        raise RayflowError(
            f"{path}: {body - expected} unexpected bytes after the {tuple(dims)} array the IDX header declares"
        )
    return np.frombuffer(data, dtype=np.uint8, count=expected, offset=header).reshape(dims)


def _idx_dataset(
    images_path: Path, labels_path: Path | None, limit: int | None, pad: int | str | None, where: str,
    num_classes: int | None, spec: str,
) -> Dataset:
    """Images (and labels) from IDX files, checked to agree; ``num_classes=None`` counts them from the labels."""
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC, "IDX images")
    labels_t: torch.Tensor | None = None
    classes = 0
    if labels_path is not None:
        labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, "IDX labels")
        if labels.shape[0] != images.shape[0]:
            raise RayflowError(
                f"{labels_path}: {labels.shape[0]} labels but {images_path} holds {images.shape[0]} images"
            )
        # count the classes before `limit`, so a small subset still has the full label space
        classes = int(labels.max()) + 1 if num_classes is None else num_classes
        if int(labels.max()) >= classes:
            raise RayflowError(f"{labels_path}: label {int(labels.max())} is out of range 0..{classes - 1}")
        labels_t = torch.from_numpy(labels[:limit].astype(np.int64))
    x = _pad_images(_uint8_to_model(images[:limit])[:, None], pad, where)
    return Dataset(x=x, labels=labels_t, num_classes=classes, kind="image", spec=spec)


def _find_idx_file(directory: Path, split: str, part: str, where: str) -> Path:
    """``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` in ``directory`` (also the ``images.idx3`` spelling)."""
    prefix = "train" if split == "train" else "t10k"
    kind = "images-idx3" if part == "images" else "labels-idx1"
    stem = f"{prefix}-{kind}-ubyte"
    dotted = f"{prefix}-{kind.replace('-', '.')}-ubyte"  # the spelling some mirrors use
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise RayflowError(f"{where}: {directory} has no {stem} or {stem}.gz (the {split} {part})")

