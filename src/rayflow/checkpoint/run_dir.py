"""Run directories: an exclusive directory lock, and claiming ``--out`` for one training run."""

from __future__ import annotations

import os
from pathlib import Path

from rayflow.checkpoint.files import remove_orphan_tmp_files
from rayflow.checkpoint.model_dir import MODEL_CONFIG, MODEL_WEIGHTS
from rayflow.errors import RayflowError

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
