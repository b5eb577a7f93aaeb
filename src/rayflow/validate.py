"""Checks at the command-line boundary: option ranges at parse time, output paths before any work, sizes that
cannot fit in memory.

Every function here raises :class:`~rayflow.errors.RayflowError` (one line, exit code 2 at the CLI) or, for the
``argparse`` ``type=`` converters, ``argparse.ArgumentTypeError`` which the CLI's parser turns into the same
one line. Nothing here imports torch at module level, so ``rayflow --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

from rayflow.errors import RayflowError, require

#: seeds are fed to ``torch.Generator.manual_seed`` and hashed into 63-bit step seeds
MAX_SEED = 2**63 - 1
#: a class-conditional model embeds every class; more classes than this is a mistake in the labels
MAX_CLASSES = 1_000_000


def whole_number(raw: str) -> int:
    """``raw`` as an ``int``; scientific notation (``2e4``) is accepted when it is a whole number, since it is
    natural for counts. Anything else raises ``ValueError``."""
    try:
        return int(raw)
    except ValueError:
        as_float = float(raw)  # ValueError for what is no number at all
        if not (math.isfinite(as_float) and as_float.is_integer()):
            raise ValueError(f"not a whole number: {raw!r}") from None
        return int(as_float)


# ---------------------------------------------------------------------- argparse converters
def int_in(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An ``argparse`` type: an integer in ``[lo, hi]`` (either bound optional).

    ``2e4`` is accepted when it is a whole number, as for data specs.
    """

    def convert(raw: str) -> int:
        try:
            value = whole_number(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {raw!r}") from None
        if lo is not None and value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {raw}")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi}, got {raw}")
        return value

    convert.__name__ = "integer"
    return convert


def float_in(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
             also: tuple[float, ...] = ()) -> Callable[[str], float]:
    """An ``argparse`` type: a finite float in the interval ``lo..hi`` (open ends with ``lo_open``/``hi_open``).

    ``also`` lists single values accepted outside the interval (``--guidance 0`` = unconditional).
    NaN and infinities are always refused: they pass every ``<``/``>`` comparison test by failing it silently.
    """

    def convert(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {raw!r}")
        if value in also:
            return value
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        interval = f"{left}{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}{right}"
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {raw}")
        if hi is not None and (value > hi or (hi_open and value == hi)):
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {raw}")
        return value

    convert.__name__ = "number"
    return convert


def int_list(raw: str) -> tuple[int, ...]:
    """An ``argparse`` type: comma-separated positive integers (``--channels 32,64,64``)."""
    parts = [p.strip() for p in raw.split(",")]
    if not raw.strip() or any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {raw!r}")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {raw!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every entry must be >= 1, got {raw!r}")
    return values


# ---------------------------------------------------------------------- devices
def check_device(name: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps``, and present on this machine; returns the name unchanged."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise RayflowError(f"--device {name!r} is not a device (expected cpu, cuda, cuda:N or mps)") from exc
    if device.type == "cuda":
        require(torch.cuda.is_available(), f"--device {name}: CUDA is not available on this machine; use --device cpu")
        count = torch.cuda.device_count()
        require(device.index is None or device.index < count,
                f"--device {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif device.type == "mps":
        require(torch.backends.mps.is_available(), f"--device {name}: MPS is not available on this machine")
    else:
        require(device.type == "cpu", f"--device {name!r}: unsupported device type (expected cpu, cuda or mps)")
    return name


# ---------------------------------------------------------------------- memory
def physical_memory_bytes() -> int | None:
    """Total physical memory of this machine, or ``None`` where the OS does not say."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_memory(num_bytes: float, what: str) -> None:
    """Refuse an allocation of ``num_bytes`` that exceeds the machine's physical memory, naming ``what``.

    Checked before allocating, so the user gets one line instead of an allocator failure (or the OOM killer).
    """
    total = physical_memory_bytes()
    if total is not None and num_bytes > total:
        raise RayflowError(f"{what} needs {_fmt_bytes(num_bytes)} but this machine has {_fmt_bytes(total)} of memory")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PiB"  # pragma: no cover


# ---------------------------------------------------------------------- output paths
def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_creatable(path: Path, flag: str) -> None:
    """Every existing ancestor of ``path`` is a directory, and the nearest one is writable."""
    anc = _nearest_existing(path.parent if not path.exists() else path)
    if anc != path:
        for parent in (anc, *anc.parents):
            if parent.exists() and not parent.is_dir():
                raise RayflowError(f"{flag} {path}: {parent} is a file, not a directory")
    target = path if path.is_dir() else anc
    require(os.access(target, os.W_OK | os.X_OK), f"{flag} {path}: {target} is not writable")


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """An output directory: absent (its parent must be creatable) or an existing, writable directory."""
    p = Path(path).expanduser()
    require(str(path) != "", f"{flag} is empty")
    if p.exists() and not p.is_dir():
        raise RayflowError(f"{flag} {p}: exists and is not a directory")
    _check_creatable(p, flag)
    return p


def check_output_file(path: str | os.PathLike, flag: str = "--out", suffixes: tuple[str, ...] = ()) -> Path:
    """An output file: not a directory, the right suffix, and a creatable/writable parent."""
    p = Path(path).expanduser()
    require(str(path) != "", f"{flag} is empty")
    if suffixes:
        require(p.suffix.lower() in suffixes,
                f"{flag} must name a {' or '.join(suffixes)} file, got {path}")
    if p.is_dir():
        raise RayflowError(f"{flag} {p}: is a directory; name a file")
    _check_creatable(p, flag)
    if p.exists():
        require(os.access(p, os.W_OK), f"{flag} {p}: exists and is not writable")
    return p


def same_or_inside(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` is ``b`` or lies inside it (after resolving symlinks and ``..``)."""
    ra, rb = Path(a).expanduser().resolve(), Path(b).expanduser().resolve()
    return ra == rb or rb in ra.parents


__all__ = [
    "MAX_CLASSES", "MAX_SEED", "check_device", "check_fits_memory", "check_output_dir", "check_output_file",
    "float_in", "int_in", "int_list", "physical_memory_bytes", "same_or_inside",
]
