"""Atomic JSON / text / safetensors writes, and reading safetensors and JSON with user-facing errors.

Every write goes to a temporary file in the destination's directory, is fsync'ed, then ``os.replace``'d over
the target, so a crash leaves either the old file or the new one, never a torn one. Nothing here uses pickle.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from rayflow.errors import RayflowError


# ---------------------------------------------------------------------- low-level atomic writes
def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it is durable (a no-op where the OS does not support it)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask (read by setting and restoring it: POSIX offers no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _tmp_path(path: Path) -> Path:
    """A fresh temporary file beside ``path``, named ``.<name>.<pid>.<random>.tmp``.

    ``mkstemp`` creates it with mode 0600; it is widened to what ``open()`` would give (0666 minus the umask),
    so an atomically written file has the same permissions as a plainly written one. The pid in the name lets
    :func:`remove_orphan_tmp_files` tell the debris of a killed process from a write in progress.
    """
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    except (AttributeError, OSError):  # no fchmod (Windows) or a file system without modes: keep mkstemp's
        pass
    os.close(fd)
    return Path(name)


_TMP_NAME = re.compile(r"^\..+\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else, or we cannot tell: leave its file alone
    return True


def remove_orphan_tmp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of atomic writes whose process is gone (killed mid-write); returns them.

    Only names of the form ``.<name>.<pid>.<random>.tmp`` (what :func:`_tmp_path` creates) whose ``pid`` is
    no longer running on this machine are removed; anything else - including a write in progress by a live
    process - is left alone.
    """
    removed: list[Path] = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = _TMP_NAME.match(p.name)
        if m is None or not p.is_file() or _pid_alive(int(m.group("pid"))):
            continue
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass  # another process cleaned it first
    return removed


@contextmanager
def _replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file beside ``path`` for the caller to write and fsync; on success it replaces ``path``
    (``os.replace``, then the directory is fsynced), on an exception it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + fsync + ``os.replace``)."""
    with _replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Write a UTF-8 text file atomically."""
    write_bytes_atomic(text.encode("utf-8"), path)


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON atomically (temp file in the same directory + fsync + ``os.replace``)."""
    write_text_atomic(json.dumps(obj, indent=2) + "\n", path)


def _cpu_contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors with no shared storage (safetensors refuses shared tensors)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not torch.is_tensor(t):
            raise TypeError(f"cannot save {name!r}: expected a tensor, got {type(t).__name__}")
        t = t.detach().cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if not t.is_contiguous() or (ptr is not None and ptr in seen):
            t = t.contiguous().clone()
            ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None:
            seen.add(ptr)
        out[name] = t
    return out


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Save tensors to a safetensors file atomically (temp file + fsync + ``os.replace``)."""
    from safetensors.torch import save_file

    with _replacing(path) as tmp:
        save_file(_cpu_contiguous(tensors), os.fspath(tmp), metadata=dict(metadata) if metadata else None)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


# ---------------------------------------------------------------------- reading with user-facing errors
def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file onto the CPU.

    A missing, truncated or corrupt file raises :class:`RayflowError` naming the file.
    """
    return load_safetensors_with_metadata(path)[0]


def load_safetensors_with_metadata(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """:func:`load_safetensors` plus the file's string metadata (``{}`` when it has none)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise RayflowError(f"{path}: no such file")
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises SafetensorError, OSError, ValueError ... on bad files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RayflowError(f"{path}: not a readable safetensors file (truncated or corrupt?): {msg}") from exc
    return tensors, metadata


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object; a missing file, invalid JSON or a non-object raises :class:`RayflowError`."""
    path = Path(path)
    if not path.is_file():
        raise RayflowError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as exc:
        raise RayflowError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise RayflowError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(obj, dict):
        raise RayflowError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj

