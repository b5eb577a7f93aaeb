"""The one training loop, shared by teacher training and every distillation method.

A method supplies an :class:`Objective`: a callable ``(model, step, generator) -> LossOutput``. The
:class:`Trainer` owns everything else: accelerate (devices, DDP, mixed precision, gradient accumulation),
AdamW (fused on CUDA) with a warm-up from ``diffusers.optimization.get_scheduler``, an EMA of the weights,
gradient clipping, logging through ``accelerator.log``, divergence checks, crash-safe checkpoints and exact
resume.

Speed. A step queues its work on the device and never waits for it: the loss, the gradient norm and the
objective's logs stay device tensors (accumulated on the device), and are read - one host synchronisation -
only every ``log_every`` steps and before each checkpoint. There the run is checked: a non-finite loss,
gradient norm or weight, or an interval mean loss more than ``divergence_factor`` times the median of the
run's earlier interval means, stops it with a :class:`RayflowError` before anything is written for the bad
interval, so the last checkpoint is a good one. On CUDA the model is also put in channels-last layout and
compiled (``compile="auto"``), and AdamW is fused.

Determinism. Step ``k`` on process ``r`` hands the objective a fresh ``torch.Generator`` on the accelerator's
device seeded with :func:`step_seed` ``(config.seed, k, r)`` (the global torch RNG is re-seeded from the same
value, so dropout and any stray ``torch.rand`` are covered too; micro-batch ``m > 0`` of an accumulated step
uses :func:`micro_seed`). Draws never depend on history, so a run interrupted at a checkpoint and resumed is
bit-identical to an uninterrupted one (eager mode, one GPU or DDP; with ``torch.compile`` two fresh runs
already differ in the last bits, since Inductor picks kernels per compilation, so a compiled resume matches
only to rounding).

On-disk layout of ``out_dir``::

    model.safetensors, config.json      final weights (the EMA if enabled) + run config (see checkpoint.py)
    train_log.jsonl                     one JSON line per ``log_every`` steps: step, loss, loss_mean, logs, lr,
                                        time (written by a JSONL accelerate tracker)
    tensorboard/                        the same scalars, when tensorboard is installed
    checkpoints/latest                  text: the name of the newest complete checkpoint, e.g. "step-0000500"
    checkpoints/step-0000500/
        model.safetensors               raw (non-EMA) weights (a LoRA student: only the adapter; see checkpoint.py)
        ema.safetensors                 EMA weights (metadata: ema_step, ema_decay); absent when EMA is off
        optimizer.safetensors           AdamW state tensors (exp_avg, exp_avg_sq, step) + LR scheduler tensors
        optimizer.json                  the rest: param groups, hyperparameters, LambdaLR counters
        objective.safetensors/.json     the objective's state_dict(), when it has one (rank 0's)
        objective-rank1.safetensors/... every other process's own, when several processes trained
        state.json                      {"step", "config": run_config + "train", "rayflow_version", "loss_history"}

A checkpoint is written into ``checkpoints/.tmp-step-XXXXXXX`` and renamed into place only when complete;
``latest`` is then replaced atomically and the oldest checkpoints beyond ``keep_checkpoints`` (diffusers'
``checkpoints_total_limit``) are removed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from rayflow.checkpoint import (
    fsync_dir,
    load_safetensors_with_metadata,
    load_state,
    load_weights_strict,
    read_json,
    save_model_dir,
    save_safetensors_atomic,
    save_state,
    saved_state_dict,
    unwrap_denoiser,
    write_json_atomic,
    write_text_atomic,
)
from rayflow.errors import RayflowError, require
from rayflow.models.base import Denoiser, drop_labels
from rayflow.models.speed import allow_recompiles, resolve_channels_last, to_channels_last
from rayflow.schedules import VPSchedule, convert_prediction, expand_like

MIXED_PRECISION_CHOICES = ("auto", "no", "bf16", "fp16")
COMPILE_CHOICES = ("auto", "yes", "no")
#: torch.compile modes of the student (``default`` = torch's); the first two replay the step from CUDA graphs
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
CHANNELS_LAST_CHOICES = ("auto", "yes", "no")
#: learning-rate schedules (diffusers.optimization names), each after ``warmup_steps`` of linear warm-up
LR_SCHEDULE_CHOICES = ("constant", "linear", "cosine")
#: train-config keys that may change between a checkpoint and its resume: they do not affect the weights (or,
#: for the speed settings, only in the last bits)
RESUME_MUTABLE_TRAIN_KEYS = ("max_steps", "progress", "log_every", "checkpoint_every", "keep_checkpoints",
                             "compile", "channels_last", "divergence_factor", "compile_mode")
#: train-config keys that may change on resume with a one-line notice: the remedies for a diverged run
RESUME_NOTICE_TRAIN_KEYS = ("lr", "warmup_steps", "lr_schedule", "grad_clip")
CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAIN_LOG = "train_log.jsonl"
TENSORBOARD_DIR = "tensorboard"
_HISTORY = 1000  # interval losses kept in state.json for the divergence check of a resumed run


# ---------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """Optimisation settings of one run (stored in every checkpoint and in the final ``config.json``).

    The effective batch of one update is ``batch_size * gradient_accumulation_steps * num_processes``.
    """

    max_steps: int = 2000  # optimizer updates
    batch_size: int = 128  # per process and micro-batch (diffusers convention)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up of the lr from 0 (diffusers' get_scheduler)
    lr_schedule: str = "constant"  # after the warm-up: "constant" | "linear" | "cosine" decay to 0 at max_steps
    grad_clip: float = 1.0  # 0 disables
    ema_decay: float = 0.999  # 0 disables EMA
    seed: int = 0
    gradient_accumulation_steps: int = 1
    checkpoint_every: int = 500  # steps; 0 = only at the end
    keep_checkpoints: int = 2  # diffusers' checkpoints_total_limit
    log_every: int = 50  # 0 disables train_log.jsonl (the run is still checked every 100 steps)
    divergence_factor: float = 100.0  # stop when an interval's mean loss exceeds this x the median so far; 0 = off
    mixed_precision: str = "auto"  # "auto" = bf16 on CUDA, "no" elsewhere | "no" | "bf16" | "fp16"
    compile: str = "auto"  # "auto" = torch.compile on CUDA only | "yes" | "no"
    channels_last: str = "auto"  # "auto" = on CUDA for convolutional networks | "yes" | "no"
    progress: bool = True  # tqdm bar
    # torch.compile mode when compiling: "default" | "reduce-overhead" (CUDA graphs of the forward and backward:
    # no launch overhead; off by default, as every tensor the objective keeps from a call must be consumed before
    # the next) | "max-autotune" | "max-autotune-no-cudagraphs"
    compile_mode: str = "default"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`RayflowError` for values out of range."""
        require(self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.lr > 0 and math.isfinite(self.lr), f"lr must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        require(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        require(self.lr_schedule in LR_SCHEDULE_CHOICES,
                f"lr_schedule must be one of {', '.join(LR_SCHEDULE_CHOICES)}, got {self.lr_schedule!r}")
        require(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        require(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1) (0 disables), got {self.ema_decay}")
        require(isinstance(self.gradient_accumulation_steps, int) and self.gradient_accumulation_steps >= 1,
                f"gradient_accumulation_steps must be an integer >= 1, got {self.gradient_accumulation_steps}")
        require(self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        require(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        require(self.log_every >= 0, f"log_every must be >= 0, got {self.log_every}")
        require(self.divergence_factor == 0 or self.divergence_factor > 1,
                f"divergence_factor must be > 1 (0 disables), got {self.divergence_factor}")
        require(self.mixed_precision in MIXED_PRECISION_CHOICES,
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, got {self.mixed_precision!r}")
        require(self.compile in COMPILE_CHOICES,
                f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {self.compile!r}")
        require(self.compile_mode in COMPILE_MODES,
                f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        require(self.channels_last in CHANNELS_LAST_CHOICES,
                f"channels_last must be one of {', '.join(CHANNELS_LAST_CHOICES)}, got {self.channels_last!r}")

    @property
    def checkpoints_total_limit(self) -> int:
        """diffusers' name for :attr:`keep_checkpoints`."""
        return self.keep_checkpoints

    @property
    def check_every(self) -> int:
        """Steps between two reads of the device-side loss (host synchronisations)."""
        return self.log_every or 100

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict; ``checkpoints_total_limit`` is accepted for ``keep_checkpoints``."""
        d = dict(d)
        if "checkpoints_total_limit" in d:
            require("keep_checkpoints" not in d, "give keep_checkpoints or checkpoints_total_limit, not both")
            d["keep_checkpoints"] = d.pop("checkpoints_total_limit")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        require(not unknown, f"train config has unknown keys {unknown}; known: {', '.join(sorted(names))}")
        try:
            return cls(**d)
        except TypeError as exc:  # a value of the wrong type (a string for lr ...)
            raise RayflowError(f"invalid train config: {exc}") from exc


def _device_type(device: str | torch.device) -> str:
    return torch.device(device).type


def resolve_mixed_precision(config: TrainConfig, device: str | torch.device) -> str:
    """The accelerate ``mixed_precision`` for this device: ``"auto"`` is ``"bf16"`` on CUDA, ``"no"`` elsewhere.

    fp16 needs a GPU (its loss scaler is CUDA-only); bf16 is allowed anywhere (CPU autocast supports it).
    """
    mp = config.mixed_precision
    require(mp in MIXED_PRECISION_CHOICES,
            f"mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, got {mp!r}")
    kind = _device_type(device)
    if mp == "auto":
        return "bf16" if kind == "cuda" else "no"
    require(not (mp == "fp16" and kind == "cpu"), "mixed_precision=fp16 needs a GPU; use bf16 or no on a CPU")
    return mp


def resolve_compile(config: TrainConfig, device: str | torch.device) -> bool:
    """Whether to ``torch.compile`` the model: ``"auto"`` compiles on CUDA only."""
    c = config.compile
    require(c in COMPILE_CHOICES, f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {c!r}")
    if c == "auto":
        return _device_type(device) == "cuda"
    return c == "yes"


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of step ``step`` on process ``rank``: a 63-bit hash (blake2b) of ``(seed, step, rank)``.

    Stable across Python processes and machines; distinct inputs give unrelated seeds (no arithmetic
    collisions such as ``seed * A + step * B + rank`` has for large steps or ranks).
    """
    digest = hashlib.blake2b(f"rayflow:{int(seed)}:{int(step)}:{int(rank)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def micro_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """The seed of micro-batch ``micro`` of an accumulated step: :func:`step_seed` for ``micro = 0`` (so a run
    without accumulation draws exactly what it always drew), an unrelated hash otherwise."""
    if micro == 0:
        return step_seed(seed, step, rank)
    digest = hashlib.blake2b(f"rayflow:{int(seed)}:{int(step)}:{int(rank)}:{int(micro)}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------- objectives
@dataclass
class LossOutput:
    """What an objective returns: the loss and logs.

    ``logs`` values may be floats or 0-d tensors; tensors are preferred, because the trainer reads them only at
    log steps, so a step needs no host synchronisation (``float(t)`` in an objective forces one every step).
    """

    loss: torch.Tensor  # scalar, differentiable
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class Objective(Protocol):
    """``objective(model, step, generator) -> LossOutput``.

    ``model`` is the accelerate-prepared (possibly DDP-wrapped / compiled) network: call it, but read
    attributes such as ``prediction_type`` from :func:`unwrap_denoiser` ``(model)``. Draw all randomness from
    ``generator`` (on the training device). With ``gradient_accumulation_steps = n`` it is called ``n`` times
    per step (same ``step``, a fresh generator each). Optional methods, called when present:

    * ``after_step(model, step, generator) -> dict[str, float | Tensor]`` after the optimizer step (e.g. a
      time-sampler update); the returned logs are merged into the step's logs.
    * ``state_dict() -> dict`` / ``load_state_dict(d)``: state that must survive a resume. Tensors (nested
      dicts/lists of tensors and JSON scalars, e.g. ``{"net": net.state_dict(), "opt": opt.state_dict()}``,
      are fine) are saved as ``objective.safetensors`` + ``objective.json``, never pickled.
    """

    def __call__(self, model: Denoiser, step: int, generator: torch.Generator) -> LossOutput: ...


class EpsilonObjective:
    r"""The standard teacher (DDPM) loss, with label dropout for classifier-free guidance::

        L(theta) = E_{i, t ~ U{0..T-1}, eps ~ N(0, I)} || eps_theta(a_t x0_i + s_t eps, t, c~_i) - eps ||^2

    ``x0_i`` is a random row of ``dataset_x`` (``a_t = sqrt(alpha_bar_t)``, ``s_t = sqrt(1 - alpha_bar_t)``),
    ``c~_i = labels_i``, replaced by the null label ``num_classes`` with probability ``label_dropout`` (no
    condition when ``labels`` is None). A model that predicts another type (``sample``, ``v_prediction``,
    ``flow``) has its output converted to epsilon at ``x_t`` first, so the loss is always the epsilon MSE
    (mean over batch and dimensions).
    """

    def __init__(
        self,
        dataset_x: torch.Tensor,
        labels: torch.Tensor | None,
        schedule: VPSchedule,
        batch_size: int,
        label_dropout: float = 0.1,
        num_classes: int = 0,
    ) -> None:
        require(dataset_x.ndim >= 2 and dataset_x.shape[0] >= 1,
                f"dataset_x must be [N, ...] with N >= 1, got shape {tuple(dataset_x.shape)}")
        require(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        require(0 <= label_dropout <= 1, f"label_dropout must be in [0, 1], got {label_dropout}")
        if labels is not None:
            labels = torch.as_tensor(labels).long().reshape(-1)
            require(labels.shape[0] == dataset_x.shape[0],
                    f"{labels.shape[0]} labels for {dataset_x.shape[0]} samples")
            require(num_classes >= 1, "labels were given but num_classes is 0")
            require(bool(((labels >= 0) & (labels < num_classes)).all()),
                    f"labels must lie in 0..{num_classes - 1}")
        self.dataset_x = dataset_x.float()
        self.labels = labels
        self.schedule = schedule
        self.batch_size = int(batch_size)
        self.label_dropout = float(label_dropout)
        self.num_classes = int(num_classes)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _data_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = str(device)
        if key not in self._cache:
            x = self.dataset_x
            small = x.numel() * x.element_size() <= (1 << 30)  # keep big data sets where they are
            x = x.to(device) if small else x
            y = self.labels.to(x.device) if self.labels is not None else None
            self._cache = {key: (x, y)}
        return self._cache[key]

    def __call__(self, model: Denoiser, step: int, generator: torch.Generator) -> LossOutput:
        dev = generator.device
        data, labels = self._data_on(dev)
        b, n, T = self.batch_size, data.shape[0], self.schedule.num_train_timesteps
        idx = torch.randint(0, n, (b,), generator=generator, device=dev)
        x0 = data[idx.to(data.device)].to(dev)
        t = torch.randint(0, T, (b,), generator=generator, device=dev)
        eps = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
        a, s = expand_like(self.schedule.a(t), x0), expand_like(self.schedule.s(t), x0)
        x_t = a * x0 + s * eps
        cond = None
        if labels is not None:
            cond = labels[idx.to(labels.device)].to(dev)
            if self.label_dropout > 0:
                cond = drop_labels(cond, self.label_dropout, self.num_classes, generator)
        pred = model(x_t, t.float(), cond)
        ptype = unwrap_denoiser(model).prediction_type
        if ptype != "epsilon":
            pred = convert_prediction(pred.float(), ptype, "epsilon", x_t, a, s)
        loss = F.mse_loss(pred.float(), eps.float())
        return LossOutput(loss, {})


# ---------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of a model's trainable parameters, as a full shadow copy of the module.

    ``shadow <- lerp(shadow, param, 1 - d_n)`` with one ``torch._foreach_lerp_`` over all parameters and
    diffusers' default decay warm-up ``d_n = min(decay, (1 + n) / (10 + n))`` (``n`` = updates so far), so short
    runs are not dominated by the initial weights. Buffers are copied; frozen parameters are shared with the
    model, not copied. The shadow module's ``state_dict()`` is what gets saved.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.step = 0
        # frozen parameters never change: the shadow shares them instead of copying (a LoRA student's EMA then
        # costs the adapter's size, not a second UNet)
        frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.module = copy.deepcopy(model, memo=frozen).eval().requires_grad_(False)
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]
        self._pairs: tuple[int, list[torch.Tensor], list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]] | None
        self._pairs = None

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.step) / (10 + self.step))

    def _lists(self, model: torch.nn.Module):
        # the (source, shadow) tensor lists are built once per model: rebuilding name dicts every step costs
        # host time on networks with hundreds of parameters
        if self._pairs is None or self._pairs[0] != id(model):
            params = dict(model.named_parameters())
            shadow = dict(self.module.named_parameters())
            src = [params[n] for n in self._names]
            dst = [shadow[n] for n in self._names]
            buffers = [(b_dst, b_src) for (_, b_dst), (_, b_src) in zip(self.module.named_buffers(),
                                                                         model.named_buffers())]
            self._pairs = (id(model), src, dst, buffers)
        return self._pairs[1:]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        src, dst, buffers = self._lists(model)
        if dst:
            torch._foreach_lerp_(dst, src, 1.0 - self.current_decay())  # under no_grad: no detach needed
        for b_dst, b_src in buffers:
            b_dst.copy_(b_src)
        self.step += 1


# ---------------------------------------------------------------------- helpers
def _normalise(obj: Any) -> Any:
    """A JSON round trip (tuples -> lists ...), so configs compare the way they are stored."""
    return json.loads(json.dumps(obj))


def _first_difference(old: Any, new: Any, path: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in new:
                return sub, old[key], "<absent>"
            if key not in old:
                return sub, "<absent>", new[key]
            diff = _first_difference(old[key], new[key], sub)
            if diff is not None:
                return diff
        return None
    if old != new:
        return path or "<config>", old, new
    return None


def _with_train_defaults(config: dict) -> dict:
    """``config`` with the train keys a checkpoint of an older version lacks filled in with their defaults (a
    key added since then, e.g. ``gradient_accumulation_steps``, had its default's behaviour)."""
    cfg = copy.deepcopy(config)
    train = cfg.get("train")
    if isinstance(train, dict):
        defaults = _normalise(dataclasses.asdict(TrainConfig()))
        cfg["train"] = {**defaults, **train}
    return cfg


def _comparable(config: dict) -> dict:
    cfg = _with_train_defaults(config)
    train = cfg.get("train")
    if isinstance(train, dict):
        for key in RESUME_MUTABLE_TRAIN_KEYS + RESUME_NOTICE_TRAIN_KEYS:
            train.pop(key, None)
    return cfg


def _notice(message: str) -> None:
    """A one-line notice on stderr (not an error: the run goes on)."""
    print(f"rayflow: note: {message}", file=sys.stderr, flush=True)


def _step_of(name: str) -> int | None:
    if not name.startswith("step-"):
        return None
    try:
        return int(name[5:])
    except ValueError:
        return None


def _fmt(v: Any) -> str:
    return v if isinstance(v, str) and v == "<absent>" else json.dumps(v)


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


# ---------------------------------------------------------------------- the trainer
class TrainingStopped(RayflowError):
    """The run diverged (a non-finite loss, gradient or weight, or a loss blow-up) and was stopped; nothing was
    written for the bad interval, so the newest checkpoint is a good one."""


def _objective_stem(rank: int) -> str:
    """The file stem of process ``rank``'s objective state in a checkpoint (rank 0 keeps the one-process name)."""
    return "objective" if rank == 0 else f"objective-rank{rank}"


def _to_float(value: Any) -> float:
    return float(value.detach().float()) if isinstance(value, torch.Tensor) else float(value)


def _accumulate(sums: dict[str, tuple[Any, int]], logs: dict[str, Any]) -> None:
    """Add one step's logs to the interval's sums: tensors stay on their device (no host read), numbers as they
    are; a value that is neither (a string ...) is not averaged."""
    for key, value in logs.items():
        if torch.is_tensor(value) and value.numel() == 1:
            value = value.detach().float().reshape(())
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        total, count = sums.get(key, (0.0, 0))
        sums[key] = (total + value, count + 1)


class Trainer:
    """Train ``model`` on ``objective`` with accelerate; see the module docstring for files and guarantees.

    ``run_config`` (JSON-serialisable) describes the run: it is stored in checkpoints and in the final
    ``config.json`` and must match on resume (the lr, warm-up and clipping may change, with a notice). When it
    has no ``"model"`` entry and the model carries a :class:`~rayflow.models.ModelConfig` as ``model.config``,
    that is added so the output loads with :func:`rayflow.checkpoint.load_model_dir`.

    ``Trainer.callbacks`` (class-wide, for tools that cannot reach where a method builds its trainer, such as
    benchmarks and profilers): callables ``callback(trainer, event, step)`` with ``event`` one of ``"start"``
    (``step`` = the first step to run), ``"step"`` (after each optimizer step; ``step`` = steps done) and
    ``"end"``.
    """

    callbacks: ClassVar[list[Callable[[Trainer, str, int], None]]] = []

    def __init__(
        self,
        model: Denoiser,
        objective: Objective,
        config: TrainConfig,
        out_dir: str | Path,
        run_config: dict,
        accelerator: Any | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.objective = objective
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / CHECKPOINTS
        if accelerator is None:
            accelerator = _make_accelerator(resolve_mixed_precision(config, distributed_state().device))
        self.accelerator = accelerator
        self.device = accelerator.device
        check_launch(accelerator.num_processes)

        run_config = dict(run_config)
        model_cfg = getattr(model, "config", None)
        if "model" not in run_config and hasattr(model_cfg, "to_dict") and hasattr(model_cfg, "kind"):
            run_config["model"] = model_cfg.to_dict()
        try:
            self.run_config = _normalise(run_config)
        except (TypeError, ValueError) as exc:
            raise RayflowError(f"run_config must be JSON-serialisable: {exc}") from exc
        self.full_config = {**self.run_config, "train": _normalise(config.to_dict())}
        self._check_ranks_agree()

        model.to(self.device)
        self.channels_last = resolve_channels_last(config.channels_last, model, self.device)
        if self.channels_last:
            to_channels_last(model)
        self.ema = EMA(model, config.ema_decay) if config.ema_decay > 0 else None
        params = [p for p in model.parameters() if p.requires_grad]
        require(len(params) > 0, "the model has no trainable parameters")
        # fused AdamW: one kernel for all parameters instead of a dozen per tensor; CUDA only (on a CPU the
        # default single-tensor loop is kept, which also keeps CPU runs bit-identical to earlier versions)
        fused = all(p.device.type == "cuda" for p in params)
        optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay,
                                      **({"fused": True} if fused else {}))
        # not prepared: accelerate's scheduler wrapper steps num_processes times per step
        self.lr_scheduler = self._make_lr_scheduler(optimizer)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self._prepared = self.model  # the DDP module (before compile), for no_sync
        self._params = params
        self.compiled = resolve_compile(config, self.device)
        mode = config.compile_mode
        if self.compiled and mode in _CUDA_GRAPH_MODES and self.device.type != "cuda":
            _notice(f"compile_mode={mode} replays CUDA graphs, which need a GPU: compiling without them")
            mode = "max-autotune-no-cudagraphs" if mode == "max-autotune" else "default"
        if self.compiled and mode in _CUDA_GRAPH_MODES and config.gradient_accumulation_steps > 1:
            # the micro-batches' gradients accumulate into graph outputs that the next replay would overwrite
            _notice(f"compile_mode={mode} does not combine with gradient_accumulation_steps > 1: compiling "
                    "without CUDA graphs")
            mode = "max-autotune-no-cudagraphs" if mode == "max-autotune" else "default"
        #: the step is replayed from CUDA graphs: each step must tell torch that a new iteration begins
        self.cuda_graphs = self.compiled and mode in _CUDA_GRAPH_MODES
        if self.compiled:
            allow_recompiles()  # a new Trainer of an already compiled network class must not find torch's limit spent
            self.model = torch.compile(self.model, mode=None if mode == "default" else mode)
        self.mixed_precision = str(accelerator.mixed_precision)
        self.loss_history: list[float] = []  # interval mean losses, for the divergence check
        self.stats: dict[str, float] = {}  # filled by train(): steps, samples, seconds of the last run

    def _make_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """diffusers' ``get_scheduler``: linear warm-up from 0 over ``warmup_steps``, then constant, linear or
        cosine (to 0 at ``max_steps``)."""
        from diffusers.optimization import get_scheduler

        cfg = self.config
        name = cfg.lr_schedule
        if name == "constant" and cfg.warmup_steps > 0:
            name = "constant_with_warmup"
        return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=max(cfg.max_steps, cfg.warmup_steps + 1))

    def _check_ranks_agree(self) -> None:
        """Every process must run the same configuration (one rank launched with other options would silently
        train on other targets and write the same checkpoints)."""
        acc = self.accelerator
        if acc.num_processes <= 1:
            return
        digest = hashlib.blake2b(json.dumps(self.full_config, sort_keys=True).encode(), digest_size=7).digest()
        mine = torch.tensor([int.from_bytes(digest, "little")], dtype=torch.int64, device=self.device)
        every = acc.gather(mine)
        require(bool((every == every[0]).all()),
                f"the {acc.num_processes} processes of this launch were given different configurations; "
                "launch every rank with the same command")

    # ------------------------------------------------------------------ properties
    @property
    def raw_model(self) -> Denoiser:
        """The trained network, without DDP / compile wrappers (its forward may still autocast)."""
        return unwrap_denoiser(self.model)

    def _final_model(self) -> Denoiser:
        if self.ema is not None:
            model = self.ema.module.eval()
        else:
            model = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False,
                                                  keep_torch_compile=False).eval()
        if self.channels_last:  # hand back the ordinary layout: callers may .view() its outputs' inputs
            model.to(memory_format=torch.contiguous_format)
        return model

    # ------------------------------------------------------------------ checkpoints
    def _list_checkpoints(self) -> list[tuple[int, Path]]:
        if not self.ckpt_dir.is_dir():
            return []
        found = []
        for p in self.ckpt_dir.iterdir():
            step = _step_of(p.name)
            if step is not None and p.is_dir() and (p / "state.json").is_file():
                found.append((step, p))
        return sorted(found)

    def find_checkpoint(self) -> Path | None:
        """The checkpoint to resume from: the one ``latest`` names, else the newest complete ``step-*``."""
        latest = self.ckpt_dir / LATEST
        if latest.is_file():
            name = latest.read_text(encoding="utf-8").strip()
            target = self.ckpt_dir / name
            if _step_of(name) is not None and (target / "state.json").is_file():
                return target
        found = self._list_checkpoints()
        return found[-1][1] if found else None

    def _save_checkpoint(self, steps_done: int) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        name = f"step-{steps_done:07d}"
        final, tmp = self.ckpt_dir / name, self.ckpt_dir / f".tmp-{name}"
        if acc.is_main_process:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        if acc.num_processes > 1 and hasattr(self.objective, "state_dict"):
            # an objective's state may be rank-local (RayFlow's Time Sampler learns from each rank's own losses):
            # every rank writes its own into the checkpoint being assembled, before rank 0 renames it into place
            acc.wait_for_everyone()
            if not acc.is_main_process:
                self._save_objective_state(tmp, acc.process_index)
            acc.wait_for_everyone()
        if acc.is_main_process:
            model_state = saved_state_dict(self.raw_model)  # a LoRA student: the adapter only
            save_safetensors_atomic(model_state, tmp / "model.safetensors", {"format": "pt"})
            if self.ema is not None:
                save_safetensors_atomic(saved_state_dict(self.ema.module), tmp / "ema.safetensors", {
                    "format": "pt", "ema_step": str(self.ema.step), "ema_decay": repr(self.ema.decay)})
            save_state({"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict()},
                       tmp / "optimizer.safetensors", tmp / "optimizer.json")
            if hasattr(self.objective, "state_dict"):
                self._save_objective_state(tmp, 0)
            from rayflow import __version__

            write_json_atomic({"step": steps_done, "config": self.full_config, "rayflow_version": __version__,
                               "loss_history": self.loss_history[-_HISTORY:]}, tmp / "state.json")
            fsync_dir(tmp)
            old = None
            if final.exists():  # only after a manual edit of `latest`: keep it until the new one is in place
                old = self.ckpt_dir / f".old-{name}"
                if old.exists():
                    shutil.rmtree(old)
                final.rename(old)
            tmp.rename(final)
            fsync_dir(self.ckpt_dir)
            write_text_atomic(name + "\n", self.ckpt_dir / LATEST)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self._rotate(keep_name=name)
        acc.wait_for_everyone()

    def _save_objective_state(self, directory: Path, rank: int) -> None:
        """``objective.safetensors/.json`` (rank 0) or ``objective-rank{r}.safetensors/.json`` (rank ``r``)."""
        stem = _objective_stem(rank)
        try:
            save_state(self.objective.state_dict(), directory / f"{stem}.safetensors", directory / f"{stem}.json")
        except TypeError as exc:
            raise RayflowError(f"the objective's state_dict cannot be saved: {exc}") from exc

    def _rotate(self, keep_name: str) -> None:
        found = [p for _, p in self._list_checkpoints()]
        excess = len(found) - self.config.keep_checkpoints
        for p in found:
            if excess <= 0:
                break
            if p.name != keep_name:
                shutil.rmtree(p, ignore_errors=True)
                excess -= 1

    def _load_checkpoint(self, path: Path) -> int:
        state = read_json(path / "state.json")
        step = state.get("step")
        require(isinstance(step, int) and step >= 0, f"{path / 'state.json'}: no valid \"step\"")
        saved = state.get("config")
        require(isinstance(saved, dict), f"{path / 'state.json'}: no \"config\"")
        diff = _first_difference(_comparable(saved), _comparable(self.full_config))
        if diff is not None:
            key, was, now = diff
            raise RayflowError(
                f"{path}: checkpoint is from another configuration: {key} was {_fmt(was)}, now {_fmt(now)} "
                f"(use another output directory, or delete {self.ckpt_dir} to start over)"
            )
        saved_train = _with_train_defaults(saved).get("train", {})
        changed = [f"{k} {_fmt(saved_train.get(k))} -> {_fmt(self.full_config['train'][k])}"
                   for k in RESUME_NOTICE_TRAIN_KEYS if saved_train.get(k) != self.full_config["train"][k]]
        if changed and self.accelerator.is_main_process:
            _notice(f"resuming {path.name} with {', '.join(changed)}")
        load_weights_strict(self.raw_model, path / "model.safetensors")
        if self.ema is not None:
            ema_file = path / "ema.safetensors"
            if ema_file.is_file():
                load_weights_strict(self.ema.module, ema_file)
                _, meta = load_safetensors_with_metadata(ema_file)
                self.ema.step = int(meta.get("ema_step", step))
            else:  # checkpoint of a run without EMA (cannot happen with matching configs): start from the weights
                self.ema.module.load_state_dict(self.raw_model.state_dict())
                self.ema.step = step
        opt = load_state(path / "optimizer.safetensors", path / "optimizer.json")
        try:
            self.optimizer.load_state_dict(opt["optimizer"])
            self.lr_scheduler.load_state_dict(opt["lr_scheduler"])
        except (KeyError, ValueError, TypeError) as exc:
            raise RayflowError(f"{path / 'optimizer.json'}: cannot restore the optimizer: {exc}") from exc
        self._apply_lr_config()
        self._match_state_layout()
        history = state.get("loss_history")
        self.loss_history = [float(v) for v in history] if isinstance(history, list) else []
        if hasattr(self.objective, "load_state_dict"):
            # this rank's own state; rank 0's when the checkpoint has none for it (written by fewer processes)
            stem = _objective_stem(self.accelerator.process_index)
            if not (path / f"{stem}.safetensors").is_file():
                stem = _objective_stem(0)
            obj_t = path / f"{stem}.safetensors"
            if obj_t.is_file():
                self.objective.load_state_dict(load_state(obj_t, path / f"{stem}.json"))
        return step

    def _apply_lr_config(self) -> None:
        """After loading an optimizer: the lr, warm-up and schedule are this run's (they may have changed on
        resume), at the restored step count. The saved state carries the old base lr; the schedule's lambda is
        never saved (it is code), so it is already this run's."""
        sched = self.lr_scheduler
        sched.base_lrs = [self.config.lr for _ in sched.base_lrs]
        for group, lr_lambda in zip(self.optimizer.param_groups, sched.lr_lambdas):
            group["initial_lr"] = self.config.lr
            group["lr"] = self.config.lr * lr_lambda(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _match_state_layout(self) -> None:
        """Loaded optimizer moments are contiguous; give them their parameter's layout (channels-last weights),
        which the fused AdamW kernel expects."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                for key, value in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                        self.optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)

    # ------------------------------------------------------------------ logging
    def _trim_log(self, step: int) -> None:
        """Drop log lines past the resumed step (they belong to the interrupted continuation)."""
        log = self.out_dir / TRAIN_LOG
        if not log.is_file():
            return
        kept = []
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    kept.append(line)
            except (ValueError, AttributeError, TypeError):
                continue
        write_text_atomic("".join(x + "\n" for x in kept), log)


    def _write_final(self, steps_done: int) -> Denoiser:
        model = self._final_model()
        if self.accelerator.is_main_process:
            save_model_dir(self.out_dir, model, {**self.run_config, "train": self.config.to_dict(),
                                                 "steps_done": steps_done})
        self.accelerator.wait_for_everyone()
        return model

    # ------------------------------------------------------------------ the loop
    def progress_label(self) -> str:
        """The progress bar's name: the method (and stage) from the run config, so parallel bars tell apart."""
        method = self.run_config.get("method")
        name = method.get("name") if isinstance(method, dict) else None
        stage = self.run_config.get("stage")
        label = " ".join(str(p) for p in (name, None if stage is None else f"stage {stage}") if p)
        return f"{label}: train" if label else "train"

    def _start_trackers(self) -> list[Any]:
        """The JSONL tracker (train_log.jsonl) and, when installed, TensorBoard, added to the accelerator's own
        trackers for this run, so ``accelerator.log`` reaches them and any the caller configured."""
        if not (self.accelerator.is_main_process and self.config.log_every):
            return []
        mine = [_jsonl_tracker(self.out_dir / TRAIN_LOG)]
        tb = _tensorboard_tracker(self.out_dir / TENSORBOARD_DIR)
        if tb is not None:
            mine.append(tb)
        self.accelerator.trackers.extend(mine)
        return mine

    def _stop_trackers(self, mine: list[Any]) -> None:
        for tracker in mine:
            if tracker in self.accelerator.trackers:
                self.accelerator.trackers.remove(tracker)
            try:
                tracker.finish()
            except Exception:  # noqa: BLE001 - closing a log writer must not hide the run's own outcome
                pass

    def _micro_step(self, step: int, micro: int, n: int) -> tuple[torch.Tensor, dict[str, Any], torch.Generator]:
        """One forward/backward of micro-batch ``micro`` of ``n``; returns the loss (detached, on the device), the
        objective's logs and the generator it drew from."""
        acc, cfg = self.accelerator, self.config
        seed = micro_seed(cfg.seed, step, acc.process_index, micro)
        torch.manual_seed(seed)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        if self.cuda_graphs:  # the previous step's graph outputs (loss, logs) are dead or already read
            torch.compiler.cudagraph_mark_step_begin()
        # gradients are all-reduced once per step, on the last micro-batch
        sync = micro == n - 1 or acc.num_processes == 1
        with nullcontext() if sync else acc.no_sync(self._prepared):
            with acc.autocast():
                out = self.objective(self.model, step, generator)
            acc.backward(out.loss / n if n > 1 else out.loss)
        return out.loss.detach().float().reshape(()), out.logs, generator

    def _check(self, sums: torch.Tensor, steps: int, first: int, last: int) -> float:
        """Read the device-side accumulators (the one host synchronisation of an interval) and stop a diverged
        run. ``sums = [loss sum, first step with a non-finite loss, first with a non-finite gradient norm]`` on
        this process; returns the interval's mean loss over all processes."""
        acc, cfg = self.accelerator, self.config
        weights_ok = torch.stack([torch.isfinite(n) for n in torch._foreach_norm(self._params)]).all()
        local = torch.cat([sums.double(), weights_ok.double().reshape(1)]).reshape(1, -1)
        every = (acc.gather(local) if acc.num_processes > 1 else local).cpu()
        mean = float(every[:, 0].sum()) / (steps * every.shape[0])
        bad_loss, bad_grad = int(every[:, 1].min()), int(every[:, 2].min())
        where = self._checkpoint_note  # listed only when the run is stopped
        if bad_loss <= last:
            raise TrainingStopped(f"step {bad_loss}: the loss is {'nan' if math.isnan(mean) else 'inf'} "
                                  f"(diverged); {where()}")
        if bad_grad <= last:
            raise TrainingStopped(f"step {bad_grad}: the gradient norm is not finite (diverged); {where()}")
        if not bool(every[:, 3].all()):
            raise TrainingStopped(f"steps {first}-{last}: the weights are no longer finite (diverged); {where()}")
        if cfg.divergence_factor and self.loss_history:
            median = statistics.median(self.loss_history)
            if mean > cfg.divergence_factor * median:
                raise TrainingStopped(
                    f"steps {first}-{last}: the mean loss {mean:.4g} is over {cfg.divergence_factor:g}x the run's "
                    f"median so far ({median:.4g}): diverged; {where()}")
        self.loss_history.append(mean)
        return mean

    def _checkpoint_note(self) -> str:
        found = self._list_checkpoints()
        remedy = "a lower lr, more warmup_steps or grad_clip > 0 (these may change on resume)"
        if not found:
            return f"no checkpoint was written yet: start again with {remedy}"
        return f"the newest checkpoint, {found[-1][1].name}, is intact: resume from it with {remedy}"

    def train(self) -> Denoiser:
        """Train to ``config.max_steps``, resuming from ``out_dir/checkpoints`` if present; returns the EMA model
        (or the raw model if EMA is off), unwrapped, in eval mode.

        At the end writes ``out_dir/model.safetensors`` + ``out_dir/config.json`` via
        :func:`~rayflow.checkpoint.save_model_dir` (weights = EMA), with ``run_config`` as the config plus
        ``"train"`` and ``"steps_done"``. A diverged run (see the module docstring) raises
        :class:`TrainingStopped`, naming the step, before anything is written for the interval.
        """
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.config
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.ckpt_dir.is_dir():
                for stale in self.ckpt_dir.glob(".tmp-step-*"):  # debris of a crash mid-checkpoint
                    shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()

        start = 0
        ckpt = self.find_checkpoint()
        if ckpt is not None:
            start = self._load_checkpoint(ckpt)
            if acc.is_main_process:
                self._trim_log(start)
        if start >= cfg.max_steps:
            return self._write_final(start)

        self.model.train()
        n = cfg.gradient_accumulation_steps
        per_step = cfg.batch_size * n * acc.num_processes
        big = float(cfg.max_steps + 1)
        # device-side accumulators: [loss sum, first non-finite loss step, first non-finite grad-norm step]
        sums = torch.tensor([0.0, big, big], device=self.device)
        log_sums: dict[str, tuple[Any, int]] = {}  # the objective's logs summed over the interval (on the device)
        clip = cfg.grad_clip > 0
        check_grad = clip and self.mixed_precision != "fp16"  # fp16 skips inf steps on purpose
        trackers = self._start_trackers()
        bar = tqdm(total=cfg.max_steps, initial=start, desc=self.progress_label(), dynamic_ncols=True,
                   disable=not (cfg.progress and acc.is_main_process))
        for callback in list(Trainer.callbacks):
            callback(self, "start", start)
        t0 = time.time()
        t_interval, interval_first = t0, start
        try:
            for step in range(start, cfg.max_steps):
                loss = None
                for micro in range(n):
                    micro_loss, logs, generator = self._micro_step(step, micro, n)
                    loss = micro_loss if loss is None else loss + micro_loss
                if n > 1:
                    loss = loss / n
                grad_norm = acc.clip_grad_norm_(self._params, cfg.grad_clip) if clip else None
                self.optimizer.step()
                if not acc.optimizer_step_was_skipped:
                    self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(self.raw_model)
                if hasattr(self.objective, "after_step"):
                    logs = {**logs, **(self.objective.after_step(self.model, step, generator) or {})}
                _accumulate(log_sums, logs)
                # no host synchronisation: the checks below read these once per interval
                sums[0] += loss
                sums[1] = torch.minimum(sums[1], torch.where(torch.isfinite(loss), big, float(step)))
                if check_grad and torch.is_tensor(grad_norm):
                    sums[2] = torch.minimum(sums[2], torch.where(torch.isfinite(grad_norm), big, float(step)))
                steps_done = step + 1
                bar.update(1)
                for callback in list(Trainer.callbacks):
                    callback(self, "step", steps_done)
                log_now = bool(cfg.log_every) and (steps_done % cfg.log_every == 0 or steps_done == cfg.max_steps)
                save_now = steps_done == cfg.max_steps or bool(
                    cfg.checkpoint_every and steps_done % cfg.checkpoint_every == 0)
                if log_now or save_now or steps_done % cfg.check_every == 0:
                    mean = self._check(sums, steps_done - interval_first, interval_first, step)
                    now = time.time()
                    if log_now:
                        values = {k: _to_float(v) for k, v in logs.items()}
                        means = {k: _to_float(total) / count for k, (total, count) in log_sums.items()}
                        record = {"step": steps_done, "loss": _to_float(loss), "loss_mean": mean, "logs": values,
                                  "logs_mean": means,
                                  "lr": float(self.lr_scheduler.get_last_lr()[0]), "time": round(now - t0, 3),
                                  "samples_per_s": round(per_step * (steps_done - interval_first)
                                                         / max(now - t_interval, 1e-9), 1)}
                        if grad_norm is not None:
                            record["grad_norm"] = _to_float(grad_norm)
                        if acc.is_main_process:
                            acc.log(record, step=steps_done)
                        bar.set_postfix({"loss": f"{record['loss']:.4g}",
                                         **{k: f"{v:.4g}" for k, v in values.items()}}, refresh=False)
                    sums = torch.tensor([0.0, big, big], device=self.device)
                    log_sums = {}
                    t_interval, interval_first = now, steps_done
                if save_now:
                    self._save_checkpoint(steps_done)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.time() - t0
            self.stats = {"steps": cfg.max_steps - start, "samples": (cfg.max_steps - start) * per_step,
                          "seconds": seconds}
            for callback in list(Trainer.callbacks):
                callback(self, "end", cfg.max_steps)
        finally:
            bar.close()
            self._stop_trackers(trackers)
        return self._write_final(cfg.max_steps)
