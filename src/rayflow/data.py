"""Training data: every dataset rayflow can distil on, named by one spec string.

A spec is ``name`` or ``name:key=value,key=value``::

    digits                                   scikit-learn's 8x8 digits, shipped inside scikit-learn (the default)
    mnist:path=DIR[,split=..,pad=..,limit=..]          the four standard IDX files in DIR (gzipped or raw)
    fashion-mnist:path=DIR[,...]                       the same for Fashion-MNIST
    idx:images=FILE[,labels=FILE,pad=..,limit=..]      any pair of IDX files
    folder:path=DIR[,size=32,channels=3,limit=..]      class subfolders (or loose images) resized with PIL
    npy:path=FILE[,pad=..,layout=..,limit=..]          a .npy array or a .npz with ``x`` and optional ``labels``
    mog:dim=..,modes=..,std=..,seed=..,n=..,layout=ring|random,scale=..,conditional=0|1

Everything is returned in *model space*: images are float32 ``[N, C, H, W]`` in ``[-1, 1]`` (uint8 ``v`` maps
to ``v / 127.5 - 1``), vectors float32 ``[N, D]``. Every mistake a user can make in a spec or a file raises
:class:`~rayflow.errors.RayflowError` with one line naming the option or file, so the CLI never shows a
numpy/PIL/gzip traceback for bad input. Files are only ever read: nothing is downloaded or cached, and
``.npy``/``.npz`` files are loaded with ``allow_pickle=False`` so a data file can never run code.
"""

from __future__ import annotations

import gzip
import math
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rayflow.errors import RayflowError
from rayflow.gmm import GaussianMixture
from rayflow.validate import MAX_CLASSES, check_fits_memory, whole_number

DEFAULT_DATA = "digits"

#: the dataset names :func:`load_dataset` understands
DATASET_NAMES: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "idx", "folder", "npy", "mog")

SPLITS: tuple[str, ...] = ("train", "test")

#: digits: the first ``DIGITS_TRAIN_SIZE`` indices of ``default_rng(0).permutation(1797)`` are train, the rest test
DIGITS_TRAIN_SIZE = 1500
DIGITS_SPLIT_SEED = 0

#: offsets added to a mog ``seed`` for the train and test draws, so neither stream reuses the one that drew the
#: component means (``GaussianMixture.from_options`` seeds its generator with ``seed`` itself)
MOG_TRAIN_STREAM = 2_000_003
MOG_TEST_STREAM = 1_000_003

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})

_IDX_IMAGES_MAGIC = 2051  # unsigned bytes, 3 dims [N, H, W]
_IDX_LABELS_MAGIC = 2049  # unsigned bytes, 1 dim [N]
_GZIP_MAGIC = b"\x1f\x8b"


# ---------------------------------------------------------------------- the dataset
@dataclass
class Dataset:
    """A dataset in model space, held in memory.

    ``x`` is float32 ``[N, *sample_shape]``: images ``[N, C, H, W]`` in ``[-1, 1]`` (``kind="image"``) or
    vectors ``[N, D]`` (``kind="vector"``). ``labels`` is int64 ``[N]`` with values in ``0 .. num_classes-1``,
    or ``None`` with ``num_classes = 0`` for unlabelled data. ``spec`` is the canonical spec string that
    :func:`load_dataset` rebuilds the same data from. For ``mog`` data, ``mixture`` is the exact distribution
    the points were drawn from, so metrics can compare against the truth instead of a finite sample.
    """

    x: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int
    kind: str
    spec: str
    mixture: GaussianMixture | None = None

    def __post_init__(self) -> None:
        if self.labels is not None and self.labels.shape != (self.x.shape[0],):
            shape = tuple(self.labels.shape)
            raise RayflowError(f"{self.spec}: {self.x.shape[0]} samples but labels of shape {shape}")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample: ``(C, H, W)`` for images, ``(D,)`` for vectors."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]

    def sample_truth(
        self, n: int, generator: torch.Generator, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` fresh draws (float32 ``[n, D]``) and their component labels from the true distribution.

        Only ``mog`` datasets know their distribution; ``labels`` (int ``[n]``) fixes the components.
        """
        if self.mixture is None:
            raise RayflowError(f"{self.spec}: only mog datasets know their true distribution (sample_truth)")
        if n < 1:
            raise RayflowError(f"sample_truth: n must be >= 1, got {n}")
        if labels is not None:
            labels = torch.as_tensor(labels).long().cpu()
            k = self.mixture.num_modes
            if labels.shape != (n,):
                raise RayflowError(f"sample_truth: labels must have shape [{n}], got {tuple(labels.shape)}")
            if bool(torch.any((labels < 0) | (labels >= k))):
                raise RayflowError(f"sample_truth: labels must lie in 0..{k - 1}")
        return self.mixture.sample(n, generator, labels)


# ---------------------------------------------------------------------- spec parsing
def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``"name:key=value,key=value"`` into ``(name, {key: value})``.

    Names and keys are lower-cased and everything is stripped of surrounding whitespace; values keep their case
    (they may be paths). The name ends at the first ``:`` and each value at the next ``,``, so a value may
    contain ``:`` or ``=`` but not ``,``. Empty names, items, keys or values and repeated keys are errors.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise RayflowError(f"empty data spec; expected name or name:key=value,... (e.g. {DEFAULT_DATA})")
    name, sep, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if not name:
        raise RayflowError(f"data spec {spec!r} has no dataset name before ':'")
    options: dict[str, str] = {}
    if not sep:
        return name, options
    if not rest.strip():
        raise RayflowError(f"data spec {spec!r}: nothing after ':'; expected key=value options or a bare name")
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not item.strip():
            raise RayflowError(f"data spec {spec!r}: empty option (two commas in a row, or a trailing comma?)")
        if not eq:
            raise RayflowError(f"data spec {spec!r}: option {item.strip()!r} is not of the form key=value")
        if not key:
            raise RayflowError(f"data spec {spec!r}: option {item.strip()!r} has no key")
        if not value:
            raise RayflowError(f"{name}: option {key!r} has an empty value")
        if key in options:
            raise RayflowError(f"{name}: option {key!r} is given twice")
        options[key] = value
    return name, options


def _canonical_spec(name: str, options: dict[str, str]) -> str:
    """``name`` or ``name:key=value,...`` with keys sorted, so equal specs compare equal as strings."""
    if not options:
        return name
    return name + ":" + ",".join(f"{k}={options[k]}" for k in sorted(options))


class _Options:
    """Typed access to one spec's options, with messages that name the dataset and the option."""

    def __init__(self, name: str, options: dict[str, str], allowed: tuple[str, ...]) -> None:
        self.name = name
        self.options = options
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            valid = ", ".join(sorted(allowed)) if allowed else "none"
            raise RayflowError(f"{name}: unknown option {unknown[0]!r}; valid options: {valid}")

    def has(self, key: str) -> bool:
        return key in self.options

    def required(self, key: str, what: str) -> str:
        if key not in self.options:
            raise RayflowError(f"{self.name}: missing option {key}=<{what}> (e.g. {self.name}:{key}=...)")
        return self.options[key]

    def integer(self, key: str, default: int, minimum: int | None = None) -> int:
        if key not in self.options:
            return default
        raw = self.options[key]
        try:
            value = whole_number(raw)  # n=2e4 is allowed
        except ValueError:
            raise RayflowError(f"{self.name}: {key} must be an integer, got {raw!r}") from None
        if minimum is not None and value < minimum:
            raise RayflowError(f"{self.name}: {key} must be >= {minimum}, got {value}")
        return value

    def number(self, key: str, default: float, positive: bool = False) -> float:
        if key not in self.options:
            return default
        raw = self.options[key]
        try:
            value = float(raw)
        except ValueError:
            raise RayflowError(f"{self.name}: {key} must be a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise RayflowError(f"{self.name}: {key} must be finite, got {raw!r}")
        if positive and value <= 0:
            raise RayflowError(f"{self.name}: {key} must be > 0, got {raw}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str | None) -> str | None:
        if key not in self.options:
            return default
        value = self.options[key].lower()
        if value not in choices:
            raise RayflowError(f"{self.name}: {key} must be one of {'|'.join(choices)}, got {self.options[key]!r}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.choice(key, ("0", "1", "false", "true", "no", "yes"), None)
        if value is None:
            return default
        return value in ("1", "true", "yes")

    def pad(self) -> int | str | None:
        """``pad=N`` (an int >= 1) or ``pad=pow2``; ``None`` when absent."""
        if not self.has("pad"):
            return None
        if self.options["pad"].lower() in ("pow2", "none"):
            return None if self.options["pad"].lower() == "none" else "pow2"
        return self.integer("pad", 0, minimum=1)

    def path(self, key: str, what: str) -> Path:
        return Path(self.required(key, what)).expanduser()


# ---------------------------------------------------------------------- helpers
def _uint8_to_model(images: np.ndarray) -> torch.Tensor:
    """uint8 pixels ``0..255`` -> float32 in ``[-1, 1]`` (``v / 127.5 - 1``), exactly invertible by rounding."""
    return torch.from_numpy(images.astype(np.float32) / np.float32(127.5) - np.float32(1.0))


def _pad_images(x: torch.Tensor, pad: int | str | None, where: str) -> torch.Tensor:
    """Centre ``[N, C, H, W]`` images on a ``pad x pad`` canvas of background ``-1`` (black in model space).

    ``pad="pow2"`` means the next power of two at or above the larger side, which is what UNets with several
    2x downsamplings need (28 -> 32).
    """
    if pad is None:
        return x
    h, w = x.shape[-2:]
    side = max(h, w)
    size = 1 << (side - 1).bit_length() if pad == "pow2" else int(pad)
    if size < side:
        raise RayflowError(f"{where}: pad={size} is smaller than the {h}x{w} images; pad must be >= {side}")
    check_fits_memory(4.0 * math.prod(x.shape[:-2]) * size * size, f"{where}: pad={size}")
    if size == h and size == w:
        return x
    top, left = (size - h) // 2, (size - w) // 2
    out = torch.full((*x.shape[:-2], size, size), -1.0, dtype=x.dtype)
    out[..., top : top + h, left : left + w] = x
    return out


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise RayflowError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


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


def _limit(opts: _Options) -> int | None:
    return opts.integer("limit", 0, minimum=1) if opts.has("limit") else None


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


# ---------------------------------------------------------------------- export
def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """Model-space images ``[N, C, H, W]`` in ``[-1, 1]`` -> uint8 ``[N, H, W, C]`` for PIL/metrics.

    The inverse of the ``v / 127.5 - 1`` loading map: ``round((x + 1) * 127.5)`` clipped to ``0..255``, with
    NaN mapped to 0 so a diverged sample shows up as black instead of undefined bytes.
    """
    x = torch.as_tensor(x)
    if x.ndim != 4:
        raise RayflowError(f"to_uint8_images expects images [N, C, H, W], got shape {tuple(x.shape)}")
    v = ((x.detach().to("cpu", torch.float32) + 1.0) * 127.5).nan_to_num(0.0).round().clamp(0, 255)
    return v.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
