"""accelerate: the launch check across processes, the trainer's ``Accelerator``, and the log trackers it writes
through (``train_log.jsonl``, TensorBoard)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from rayflow.errors import RayflowError, require


def _launched_world_size() -> int:
    """The number of processes the launcher (torchrun, accelerate launch, mpirun) says it started."""
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        value = os.environ.get(key, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise RayflowError(f"the launcher set {key}={value!r}, which is not a process count") from None
    return 1


def distributed_state() -> Any:
    """accelerate's process-wide ``PartialState``, initialised (gloo on a machine without CUDA, so that
    ``torchrun --nproc_per_node N`` works on CPUs too, where accelerate alone sees no distributed set-up)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def check_launch(num_processes: int) -> None:
    """Refuse a launch whose processes disagree about the world: the launcher started ``WORLD_SIZE`` of them but
    accelerate joined ``num_processes`` (each would train alone and all would write the same checkpoints)."""
    launched = _launched_world_size()
    require(launched == num_processes,
            f"the launcher started {launched} processes but accelerate sees {num_processes} "
            f"(each rank would train alone and write the same files); launch with "
            f"`accelerate launch --num_processes {launched} ...` or torchrun --nproc_per_node {launched}")


def launch_accelerator(mixed_precision: str | None = None) -> Any | None:
    """An ``Accelerator`` when this process is one of several (the world size taken from accelerate, checked
    against the launcher's), ``None`` for a single process (the :class:`Trainer` then makes its own).
    ``mixed_precision=None`` takes the launcher's (``accelerate launch --mixed_precision``)."""
    state = distributed_state()
    check_launch(state.num_processes)
    if state.num_processes <= 1:
        return None
    return _make_accelerator(mixed_precision)


def _make_accelerator(mixed_precision: str | None) -> Any:
    """``Accelerator(mixed_precision=...)``. accelerate keeps one process-wide state and refuses a second
    Accelerator with another precision (a teacher trained in fp32, then a student in bf16, in one process);
    the finished run's precision state is then reset. The distributed state (PartialState) is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    distributed_state()
    cpu = not torch.cuda.is_available()
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except ValueError as exc:
        if "already been initialized" not in str(exc):
            raise
        AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


# ---------------------------------------------------------------------- trackers
def _jsonl_tracker(path: Path) -> Any:
    """An accelerate tracker that appends each ``accelerator.log`` record to ``path`` as one JSON line (the
    record as given: ``{"step", "loss", "loss_mean", "logs": {...}, "lr", "time", ...}``)."""
    from accelerate.tracking import GeneralTracker

    class JSONLTracker(GeneralTracker):
        name = "rayflow-jsonl"
        requires_logging_directory = False

        def __init__(self) -> None:
            super().__init__()
            self.path = path

        @property
        def tracker(self) -> Path:
            return self.path

        def store_init_configuration(self, values: dict) -> None:  # the config lives in state.json
            pass

        def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(values) + "\n")

    return JSONLTracker()


def _tensorboard_tracker(logging_dir: Path) -> Any | None:
    """accelerate's TensorBoard tracker with the nested ``logs`` flattened to scalars; None when tensorboard is
    not installed."""
    try:
        import tensorboard  # noqa: F401
        from accelerate.tracking import TensorBoardTracker
    except ImportError:
        return None

    class FlatTensorBoard(TensorBoardTracker):
        def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
            flat = {k: v for k, v in values.items() if isinstance(v, (int, float)) and k != "step"}
            for group in ("logs", "logs_mean"):
                flat.update({f"{group}/{k}": v for k, v in (values.get(group) or {}).items()
                             if isinstance(v, (int, float))})
            for key, value in flat.items():
                self.writer.add_scalar(key, value, global_step=step)
            self.writer.flush()

    tracker = FlatTensorBoard("run", logging_dir)
    tracker.start()
    return tracker
