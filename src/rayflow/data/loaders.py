"""One loader per dataset name, and :func:`load_dataset`, which picks one by the spec's name."""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rayflow.data.dataset import Dataset, _pad_images, _uint8_to_model
from rayflow.data.idx import _find_idx_file, _idx_dataset
from rayflow.data.spec import SPLITS, _canonical_spec, _check_split, _limit, _Options, parse_spec
from rayflow.errors import RayflowError
from rayflow.gmm import GaussianMixture
from rayflow.validate import MAX_CLASSES, check_fits_memory

#: the dataset names :func:`load_dataset` understands
DATASET_NAMES: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "idx", "folder", "npy", "mog")

#: digits: the first ``DIGITS_TRAIN_SIZE`` indices of ``default_rng(0).permutation(1797)`` are train, the rest test
DIGITS_TRAIN_SIZE = 1500
DIGITS_SPLIT_SEED = 0

#: offsets added to a mog ``seed`` for the train and test draws, so neither stream reuses the one that drew the
#: component means (``GaussianMixture.from_options`` seeds its generator with ``seed`` itself)
MOG_TRAIN_STREAM = 2_000_003
MOG_TEST_STREAM = 1_000_003

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


# ---------------------------------------------------------------------- the loaders
def _load_digits(opts: _Options, split: str, spec: str) -> Dataset:
    # load_digits reads a csv shipped inside scikit-learn: no network, ever
    from sklearn.datasets import load_digits

    try:
        bunch = load_digits()
    except Exception as exc:  # a broken scikit-learn install is not something the user asked for
        raise RayflowError(f"digits: cannot load scikit-learn's digits: {exc}") from exc
    images = np.asarray(bunch.images, dtype=np.float32)  # [1797, 8, 8], values 0..16
    targets = np.asarray(bunch.target, dtype=np.int64)
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(images))
    idx = perm[:DIGITS_TRAIN_SIZE] if split == "train" else perm[DIGITS_TRAIN_SIZE:]
    idx = idx[: _limit(opts)]
    x = torch.from_numpy(images[idx] / np.float32(8.0) - np.float32(1.0))[:, None]
    x = _pad_images(x, opts.pad(), "digits")
    return Dataset(x=x, labels=torch.from_numpy(targets[idx]), num_classes=10, kind="image", spec=spec)


def _load_mnist(opts: _Options, split: str, spec: str) -> Dataset:
    directory = opts.path("path", "DIR")
    if not directory.is_dir():
        raise RayflowError(f"{opts.name}: {directory} is not a directory" if directory.exists()
                           else f"{opts.name}: directory {directory} does not exist")
    images = _find_idx_file(directory, split, "images", opts.name)
    labels = _find_idx_file(directory, split, "labels", opts.name)
    return _idx_dataset(images, labels, _limit(opts), opts.pad(), opts.name, 10, spec)


def _load_idx(opts: _Options, split: str, spec: str) -> Dataset:
    images = opts.path("images", "FILE")
    labels = Path(opts.options["labels"]).expanduser() if opts.has("labels") else None
    return _idx_dataset(images, labels, _limit(opts), opts.pad(), "idx", None, spec)


def _image_files(directory: Path, recursive: bool) -> list[Path]:
    files = directory.rglob("*") if recursive else directory.iterdir()
    return sorted(
        p for p in files
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def _load_folder(opts: _Options, split: str, spec: str) -> Dataset:
    from PIL import Image, UnidentifiedImageError

    directory = opts.path("path", "DIR")
    size = opts.integer("size", 32, minimum=1)
    channels = int(opts.choice("channels", ("1", "3"), "3"))
    limit = _limit(opts)
    check_fits_memory(4.0 * channels * size * size, f"folder: size={size} (per image)")
    if not directory.is_dir():
        raise RayflowError(f"folder: {directory} is not a directory" if directory.exists()
                           else f"folder: directory {directory} does not exist")
    try:
        class_dirs = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
        loose = _image_files(directory, recursive=False)
        files: list[tuple[Path, int]] = []
        if class_dirs:
            if loose:
                raise RayflowError(
                    f"folder: {directory} mixes class subfolders with loose images (e.g. {loose[0].name}); "
                    "put every image in a class folder, or use a folder without subfolders"
                )
            for label, class_dir in enumerate(class_dirs):
                found = _image_files(class_dir, recursive=True)
                if not found:
                    raise RayflowError(f"folder: class folder {class_dir} holds no images")
                files.extend((p, label) for p in found)
        else:
            files = [(p, -1) for p in loose]
    except OSError as exc:
        raise RayflowError(f"folder: cannot list {directory}: {exc.strerror or exc}") from exc
    if not files:
        raise RayflowError(
            f"folder: {directory} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) and no class subfolders"
        )
    files = files[:limit]
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for path, _ in files:
        try:
            with Image.open(path) as im:
                im = im.convert(mode)
                if im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BICUBIC)
                arrays.append(np.asarray(im, dtype=np.uint8))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            raise RayflowError(f"folder: cannot read image {path}: {exc}") from exc
    stacked = np.stack(arrays)
    stacked = stacked[:, None] if channels == 1 else stacked.transpose(0, 3, 1, 2)
    x = _uint8_to_model(np.ascontiguousarray(stacked))
    if class_dirs:
        labels = torch.tensor([label for _, label in files], dtype=torch.int64)
        return Dataset(x=x, labels=labels, num_classes=len(class_dirs), kind="image", spec=spec)
    return Dataset(x=x, labels=None, num_classes=0, kind="image", spec=spec)


def _load_npy(opts: _Options, split: str, spec: str) -> Dataset:
    path = opts.path("path", "FILE")
    layout = opts.choice("layout", ("nchw", "nhwc"), None)
    limit, pad = _limit(opts), opts.pad()
    if not path.is_file():
        raise RayflowError(f"npy: {path} is not a file" if path.exists() else f"npy: file {path} does not exist")
    try:
        # allow_pickle=False: a data file must never be able to run code; object arrays are refused instead
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                if "x" not in loaded.files:
                    raise RayflowError(f"npy: {path} has no array 'x' (found {', '.join(loaded.files) or 'none'})")
                x = loaded["x"]
                labels = loaded["labels"] if "labels" in loaded.files else None
        else:
            x, labels = loaded, None
    except RayflowError:
        raise
    except Exception as exc:  # numpy raises ValueError/OSError/EOFError/BadZipFile... for damaged files
        raise RayflowError(f"npy: cannot load {path} as .npy/.npz without pickle: {exc}") from exc

    if x.dtype.kind not in "iuf":
        raise RayflowError(f"npy: {path}: x must be a numeric array, got dtype {x.dtype}")
    if x.ndim not in (2, 3, 4):
        raise RayflowError(f"npy: {path}: x must be [N, D] vectors or [N, H, W(, C)] images, got shape {x.shape}")
    if x.shape[0] == 0 or 0 in x.shape:
        raise RayflowError(f"npy: {path}: x is empty (shape {x.shape})")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise RayflowError(f"npy: {path}: x contains NaN or infinite values")

    labels_t: torch.Tensor | None = None
    num_classes = 0
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.ndim != 1:
            raise RayflowError(f"npy: {path}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        if labels.shape[0] != x.shape[0]:
            raise RayflowError(f"npy: {path}: {labels.shape[0]} labels for {x.shape[0]} samples")
        if labels.min() < 0:
            raise RayflowError(f"npy: {path}: labels must be >= 0, found {int(labels.min())}")
        if int(labels.max()) >= MAX_CLASSES:
            raise RayflowError(f"npy: {path}: label {int(labels.max())} means more than {MAX_CLASSES} classes; "
                               "labels must be class indices 0..K-1")
        num_classes = int(labels.max()) + 1
        labels_t = torch.from_numpy(labels[:limit].astype(np.int64))
    x = x[:limit]

    if x.ndim == 2:
        if pad is not None or layout is not None:
            raise RayflowError(f"npy: {path}: pad and layout apply to images; x is [N, D] vectors")
        return Dataset(torch.from_numpy(x.astype(np.float32)), labels_t, num_classes, "vector", spec)

    if x.ndim == 3:
        x = x[:, None]
    else:
        x = _to_nchw(x, layout, path)
    if x.dtype == np.uint8:
        xt = _uint8_to_model(np.ascontiguousarray(x))
    elif x.dtype.kind == "f":
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        lo, hi = float(xt.min()), float(xt.max())
        if lo < -1.01 or hi > 1.01:
            warnings.warn(
                f"npy: {path}: float images are used as-is but span [{lo:.3g}, {hi:.3g}], not [-1, 1]", stacklevel=3
            )
    else:
        raise RayflowError(
            f"npy: {path}: integer images must be uint8 (0..255), got {x.dtype}; or store floats in [-1, 1]"
        )
    return Dataset(_pad_images(xt, pad, "npy"), labels_t, num_classes, "image", spec)


def _to_nchw(x: np.ndarray, layout: str | None, path: Path) -> np.ndarray:
    """A 4-D image array as ``[N, C, H, W]``: the channel axis is the one of size <= 4 (or ``layout=``)."""
    if layout is None:
        first, last = x.shape[1] <= 4, x.shape[3] <= 4
        if first == last:
            raise RayflowError(
                f"npy: {path}: cannot tell the channel axis of shape {x.shape}; add layout=nchw or layout=nhwc"
            )
        layout = "nchw" if first else "nhwc"
    return x if layout == "nchw" else x.transpose(0, 3, 1, 2)


def _load_mog(opts: _Options, split: str, spec: str) -> Dataset:
    dim = opts.integer("dim", 2, minimum=1)
    modes = opts.integer("modes", 8, minimum=1)
    std = opts.number("std", 0.1, positive=True)
    seed = opts.integer("seed", 0, minimum=0)
    n = opts.integer("n", 20000, minimum=1)
    layout = opts.choice("layout", ("ring", "random"), None)
    scale = opts.number("scale", 1.0, positive=True)
    conditional = opts.flag("conditional", True)
    if layout == "ring" and dim != 2:
        raise RayflowError(f"mog: layout=ring needs dim=2, got dim={dim}")
    require_classes = modes if conditional else 0
    if require_classes > MAX_CLASSES:
        raise RayflowError(f"mog: modes={modes} is more than {MAX_CLASSES} classes")
    # the samples (float32) and their mode indices (int64), plus the mixture's means and scales
    check_fits_memory(4.0 * n * dim + 8.0 * n + 8.0 * modes * dim, f"mog: n={n}, dim={dim}, modes={modes}")
    mixture = GaussianMixture.from_options(dim=dim, modes=modes, std=std, seed=seed, layout=layout, scale=scale)
    stream = MOG_TRAIN_STREAM if split == "train" else MOG_TEST_STREAM
    x, labels = mixture.sample(n, torch.Generator().manual_seed(seed + stream))
    if not conditional:
        return Dataset(x=x, labels=None, num_classes=0, kind="vector", spec=spec, mixture=mixture)
    return Dataset(x=x, labels=labels, num_classes=modes, kind="vector", spec=spec, mixture=mixture)


_Loader = Callable[[_Options, str, str], Dataset]
#: name -> (loader, accepted options); ``split`` is accepted only where the data has a held-out part
_LOADERS: dict[str, tuple[_Loader, tuple[str, ...]]] = {
    "digits": (_load_digits, ("split", "limit", "pad")),
    "mnist": (_load_mnist, ("path", "split", "limit", "pad")),
    "fashion-mnist": (_load_mnist, ("path", "split", "limit", "pad")),
    "idx": (_load_idx, ("images", "labels", "limit", "pad")),
    "folder": (_load_folder, ("path", "size", "channels", "limit")),
    "npy": (_load_npy, ("path", "layout", "limit", "pad")),
    "mog": (_load_mog, ("dim", "modes", "std", "seed", "n", "layout", "scale", "conditional", "split")),
}


def load_dataset(spec: str, split: str = "train") -> Dataset:
    """Load the dataset a spec names (see the module docstring for the grammar), in model space.

    ``split`` is ``"train"`` or ``"test"``; a ``split=`` option inside the spec wins over the argument, because
    it is what the user wrote. ``digits``, ``mnist``, ``fashion-mnist`` and ``mog`` have a held-out test part;
    ``idx``, ``folder`` and ``npy`` name their files explicitly and return the same data for either split.
    """
    _check_split(split)
    name, options = parse_spec(spec)
    if name not in _LOADERS:
        raise RayflowError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    loader, allowed = _LOADERS[name]
    opts = _Options(name, options, allowed)
    split = opts.choice("split", SPLITS, split) or split
    canonical = _canonical_spec(name, options)
    try:
        return loader(opts, split, canonical)
    except RayflowError:
        raise
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        # the loaders wrap what they expect; this keeps anything they missed to one line for the CLI
        raise RayflowError(f"{name}: cannot load {canonical}: {exc}") from exc

