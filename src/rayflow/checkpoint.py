"""Crash-safe files: atomic JSON / safetensors writes, and model directories.

Nothing here uses pickle: weights are safetensors, everything else is JSON. Every write goes to a temporary
file in the destination's directory, is fsync'ed, then ``os.replace``'d over the target, so a crash leaves
either the old file or the new one, never a torn one.

A *model directory* holds::

    model.safetensors   the network's state_dict (contiguous CPU tensors)
    config.json         {"model": ModelConfig.to_dict(), ..., "rayflow_version": "x.y.z"}

and :func:`load_model_dir` rebuilds the network from it with :func:`rayflow.models.build_model`.

Weights a network can rebuild from a reference are not written: a module with a ``reference_keys()`` method
(a LoRA student's :class:`~rayflow.models.text.TextUNetDenoiser`, whose frozen base is the teacher pipeline's
UNet, read back from the pipeline folder its config names) has those state_dict keys left out of
``model.safetensors`` and of every checkpoint (:func:`saved_state_dict`), and :func:`load_weights_strict`
accepts a file without them. A SD1.5 LoRA student then saves 0.27 GB (rank 64) instead of 3.4 GB.
"""

from __future__ import annotations

import json
import numbers
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rayflow.errors import RayflowError
from rayflow.models.base import Denoiser

MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"


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


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + fsync + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


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

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        save_file(_cpu_contiguous(tensors), os.fspath(tmp), metadata=dict(metadata) if metadata else None)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


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


# ---------------------------------------------------------------------- state_dict <-> tensors + JSON
def split_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (an optimizer's ``state_dict()`` ...) into a JSON skeleton and a flat tensor dict.

    Tensors are replaced by ``{"__tensor__": name}``, tuples by ``{"__tuple__": [...]}``, and dicts whose keys
    are not all strings (optimizer state is keyed by int) by ``{"__items__": [[key, value], ...]}``, so
    :func:`join_state` restores the exact structure, key types and tuple-ness. Raises ``TypeError`` on values
    that are neither tensors, containers nor JSON scalars.
    """
    tensors: dict[str, torch.Tensor] = {}

    def name_for(path: str) -> str:
        name, n = path or "tensor", 1
        while name in tensors:
            name, n = f"{path}#{n}", n + 1
        return name

    def walk(x: Any, path: str) -> Any:
        if torch.is_tensor(x):
            name = name_for(path)
            tensors[name] = x
            return {"__tensor__": name}
        if isinstance(x, Mapping):
            def sub(k: Any) -> str:
                return f"{path}.{k}" if path else str(k)

            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: walk(v, sub(k)) for k, v in x.items()}
            for k in x:
                if not isinstance(k, (str, int, float, bool)) and k is not None:
                    raise TypeError(f"cannot serialise a dict key of type {type(k).__name__} at {path!r}")
            return {"__items__": [[k, walk(v, sub(k))] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, numbers.Integral):  # numpy integers ...
            return int(x)
        if isinstance(x, numbers.Real):
            return float(x)
        raise TypeError(f"cannot serialise a value of type {type(x).__name__} at {path!r} without pickle")

    return walk(obj, prefix), tensors


def join_state(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_state`."""

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if set(x) == {"__tensor__"}:
                return tensors[x["__tensor__"]]
            if set(x) == {"__tuple__"}:
                return tuple(walk(v) for v in x["__tuple__"])
            if set(x) == {"__items__"}:
                return {k: walk(v) for k, v in x["__items__"]}
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(skeleton)


def save_state(state: Any, tensors_path: str | os.PathLike, json_path: str | os.PathLike) -> None:
    """Save a nested state as ``tensors_path`` (safetensors) + ``json_path`` (its skeleton), atomically each."""
    skeleton, tensors = split_state(state)
    save_safetensors_atomic(tensors, tensors_path, metadata={"format": "pt"})
    write_json_atomic(skeleton, json_path)


def load_state(tensors_path: str | os.PathLike, json_path: str | os.PathLike) -> Any:
    """Load what :func:`save_state` wrote; a skeleton naming a tensor the file lacks is a :class:`RayflowError`."""
    tensors = load_safetensors(tensors_path)
    skeleton = read_json(json_path)
    try:
        return join_state(skeleton, tensors)
    except KeyError as exc:
        raise RayflowError(f"{tensors_path}: tensor {exc.args[0]!r} named by {json_path} is missing") from exc


# ---------------------------------------------------------------------- model directories
def _fmt_shape(shape: torch.Size | tuple[int, ...]) -> str:
    return str(tuple(int(s) for s in shape))


def unwrap_denoiser(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``torch.compile`` and (Distributed)DataParallel wrappers, without modifying it.

    Unlike ``accelerator.unwrap_model(..., keep_fp32_wrapper=False)`` this never changes the module.
    """
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            model = inner
            continue
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
            continue
        return model


def reference_keys(model: torch.nn.Module) -> set[str]:
    """The state_dict keys of ``model`` that are not saved: those its modules' ``reference_keys()`` name (frozen
    weights rebuilt from elsewhere when the network is built, e.g. a LoRA student's base UNet)."""
    model = unwrap_denoiser(model)
    keys: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "reference_keys", None)
        if callable(fn):
            keys.update(f"{prefix}.{k}" if prefix else k for k in fn())
    return keys


def saved_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a model directory or a checkpoint stores of ``model``: its state_dict without :func:`reference_keys`."""
    model = unwrap_denoiser(model)
    skip = reference_keys(model)
    return {k: v for k, v in model.state_dict().items() if k not in skip}


def save_model_dir(out_dir: str | os.PathLike, model: Denoiser, config: dict) -> None:
    """Write ``out_dir/model.safetensors`` (the state_dict) and ``out_dir/config.json`` atomically.

    ``config`` should carry ``"model": ModelConfig.to_dict()`` for :func:`load_model_dir`; ``rayflow_version``
    is added. Other files in ``out_dir`` are left alone.
    """
    from rayflow import __version__

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RayflowError(f"{out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    state = saved_state_dict(model)
    save_safetensors_atomic(state, out_dir / MODEL_WEIGHTS, metadata={"format": "pt"})
    write_json_atomic({**config, "rayflow_version": __version__}, out_dir / MODEL_CONFIG)


def check_state_dict_fits(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str,
                          optional: set[str] | frozenset[str] = frozenset()) -> None:
    """Raise one-line :class:`RayflowError` (naming ``where``, the key and both shapes) unless ``state`` fits
    ``model`` exactly: same keys (those in ``optional`` may be absent), same shapes."""
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state and key not in optional:
            raise RayflowError(
                f"{where}: weights do not fit the config: missing key {key!r} (shape {_fmt_shape(value.shape)})"
            )
        if key in state and tuple(state[key].shape) != tuple(value.shape):
            raise RayflowError(
                f"{where}: weights do not fit the config: {key!r} has shape {_fmt_shape(state[key].shape)} in the "
                f"file but {_fmt_shape(value.shape)} in the model"
            )
    for key in state:
        if key not in expected:
            raise RayflowError(
                f"{where}: weights do not fit the config: unexpected key {key!r} "
                f"(shape {_fmt_shape(state[key].shape)})"
            )


def load_weights_strict(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a safetensors state_dict into ``model`` strictly, with one-line errors naming the file.

    The file may leave out the model's :func:`reference_keys` (and nothing else)."""
    state = load_safetensors(path)
    skip = reference_keys(model)
    check_state_dict_fits(model, state, os.fspath(path), optional=skip)
    try:
        # strict unless the file leaves out reference weights, which the model already holds
        model.load_state_dict(state, strict=not (skip - set(state)))
    except RuntimeError as exc:  # dtype problems the shape check cannot see
        raise RayflowError(f"{path}: cannot load weights: {str(exc).splitlines()[0]}") from exc


def load_model_dir(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Denoiser, dict]:
    """Rebuild the network saved by :func:`save_model_dir`; returns ``(model in eval mode, config)``.

    Errors are one-line :class:`RayflowError` naming the path: not a directory, no ``config.json``, no
    ``model.safetensors``, a config without ``"model"``, or weights that do not fit the config.
    """
    from rayflow.models.networks import ModelConfig, build_model

    path = Path(path)
    if not path.exists():
        raise RayflowError(f"{path}: no such directory")
    if not path.is_dir():
        raise RayflowError(f"{path}: not a directory (expected a model directory with {MODEL_CONFIG})")
    cfg_path, weights_path = path / MODEL_CONFIG, path / MODEL_WEIGHTS
    if not cfg_path.is_file():
        raise RayflowError(f"{path}: no {MODEL_CONFIG} here; not a rayflow model directory")
    if not weights_path.is_file():
        raise RayflowError(f"{path}: no {MODEL_WEIGHTS} here")
    config = read_json(cfg_path)
    model_cfg = config.get("model")
    if not isinstance(model_cfg, dict):
        raise RayflowError(f"{cfg_path}: no \"model\" section describing the network")
    try:
        model = build_model(ModelConfig.from_dict(model_cfg))
    except RayflowError as exc:
        raise RayflowError(f"{cfg_path}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise RayflowError(f"{cfg_path}: invalid model config: {str(exc).splitlines()[0]}") from exc
    load_weights_strict(model, weights_path)
    return model.to(device).eval(), config


# ---------------------------------------------------------------------- run directories
RUN_LOCK = ".rayflow.lock"


class DirectoryLock:
    """An exclusive, non-blocking lock on a directory (``fcntl.flock`` on ``<dir>/<name>``), as a context manager.

    A second process asking for the same lock gets a one-line :class:`RayflowError` at once instead of both
    writing into the same files. The OS drops the lock when the process dies (even by ``kill -9``), so a stale
    lock file never blocks a resume; the file itself stays (removing it would race with a waiting process).
    Where ``fcntl`` does not exist (Windows) the lock is a no-op.

    Args:
        directory: created if missing.
        what: how the error names the holder's activity, e.g. ``"a run is writing to"``.
        blocking: wait for the lock instead of refusing (used by caches for short critical sections).
    """

    def __init__(self, directory: str | os.PathLike, name: str = RUN_LOCK, what: str = "another rayflow run is "
                 "writing to", blocking: bool = False) -> None:
        self.directory = Path(directory)
        self.path = self.directory / name
        self.what = what
        self.blocking = blocking
        self._fd: int | None = None

    def acquire(self) -> DirectoryLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = ""
            try:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            except OSError:
                pass
            os.close(fd)
            raise RayflowError(
                f"{self.what} {self.directory}{f' (pid {holder})' if holder.isdigit() else ''}; wait for it to "
                "finish or use another directory"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder's pid, for the message above (informative only)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError:
            pass
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def has_resumable_checkpoint(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir/checkpoints`` holds a complete checkpoint (``step-*/state.json``) a run could resume."""
    ckpt = Path(out_dir) / "checkpoints"
    if not ckpt.is_dir():
        return False
    return any(p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file() for p in ckpt.iterdir())


def check_not_finished_elsewhere(out_dir: str | os.PathLike) -> None:
    """Refuse to train into a folder that holds a finished model but no checkpoint to resume.

    Such a folder is a model someone finished (a committed teacher, a copied student): training into it would
    overwrite ``model.safetensors`` and ``config.json`` with an unrelated run. A folder *with* checkpoints is
    left to the trainer, which resumes it or refuses a checkpoint of another configuration.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    finished = [name for name in (MODEL_WEIGHTS, MODEL_CONFIG) if (out_dir / name).exists()]
    if finished and not has_resumable_checkpoint(out_dir):
        raise RayflowError(
            f"{out_dir}: holds a finished model ({', '.join(finished)}) and no checkpoints to resume; refusing to "
            "overwrite it: choose another --out"
        )


class RunDirectory:
    """Claim ``out_dir`` for one training run (a context manager), before any work is done.

    On entering (main process only, where ``is_main`` is false nothing happens): refuse a path that is a file,
    refuse a folder holding a finished model without checkpoints (:func:`check_not_finished_elsewhere`), take
    the exclusive run lock (:class:`DirectoryLock`, so two runs sharing one ``--out`` refuse instead of colliding
    on ``os.replace``), and delete orphan temporary files of killed writes in ``out_dir`` and its
    ``checkpoints/``. The lock is held until exit.
    """

    def __init__(self, out_dir: str | os.PathLike, is_main: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.is_main = is_main
        self._lock: DirectoryLock | None = None

    def __enter__(self) -> RunDirectory:
        if not self.is_main:
            return self
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise RayflowError(f"{self.out_dir}: exists and is not a directory")
        check_not_finished_elsewhere(self.out_dir)
        self._lock = DirectoryLock(self.out_dir).acquire()
        try:
            for d in (self.out_dir, self.out_dir / "checkpoints"):
                remove_orphan_tmp_files(d)
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
