"""The one training loop, shared by teacher training and every distillation method.

A method supplies an :class:`Objective`: a callable ``(model, step, generator) -> LossOutput``. The
:class:`Trainer` owns everything else: accelerate (devices, DDP, mixed precision), AdamW with a linear
warm-up, an EMA of the weights, gradient clipping, logging, crash-safe checkpoints and exact resume.

Determinism. Step ``k`` on process ``r`` hands the objective a fresh ``torch.Generator`` on the accelerator's
device seeded with :func:`step_seed` ``(config.seed, k, r)`` (the global torch RNG is re-seeded from the same
value, so dropout and any stray ``torch.rand`` are covered too). Draws never depend on history, so a run
interrupted at a checkpoint and resumed is bit-identical to an uninterrupted one (eager mode, one GPU or DDP;
with ``torch.compile`` two fresh runs already differ in the last bits, since Inductor picks kernels per
compilation, so a compiled resume matches only to rounding).

On-disk layout of ``out_dir``::

    model.safetensors, config.json      final weights (the EMA if enabled) + run config (see checkpoint.py)
    train_log.jsonl                     one JSON line per ``log_every`` steps: step, loss, logs, lr, time
    checkpoints/latest                  text: the name of the newest complete checkpoint, e.g. "step-0000500"
    checkpoints/step-0000500/
        model.safetensors               raw (non-EMA) weights
        ema.safetensors                 EMA weights (metadata: ema_step, ema_decay); absent when EMA is off
        optimizer.safetensors           AdamW state tensors (exp_avg, exp_avg_sq, step) + LR scheduler tensors
        optimizer.json                  the rest: param groups, hyperparameters, LambdaLR counters
        objective.safetensors/.json     the objective's state_dict(), when it has one
        state.json                      {"step", "config": run_config + "train", "rayflow_version"}

A checkpoint is written into ``checkpoints/.tmp-step-XXXXXXX`` and renamed into place only when complete;
``latest`` is then replaced atomically and the oldest checkpoints beyond ``keep_checkpoints`` are removed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

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
    unwrap_denoiser,
    write_json_atomic,
    write_text_atomic,
)
from rayflow.errors import RayflowError, require
from rayflow.models.base import Denoiser
from rayflow.schedules import VPSchedule, convert_prediction, expand_like

MIXED_PRECISION_CHOICES = ("auto", "no", "bf16", "fp16")
COMPILE_CHOICES = ("auto", "yes", "no")
#: train-config keys that may change between a checkpoint and its resume: they do not affect the weights
RESUME_MUTABLE_TRAIN_KEYS = ("max_steps", "progress", "log_every", "checkpoint_every", "keep_checkpoints")
CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAIN_LOG = "train_log.jsonl"


# ---------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """Optimisation settings of one run (stored in every checkpoint and in the final ``config.json``)."""

    max_steps: int = 2000
    batch_size: int = 128  # per process (diffusers convention)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up of the lr
    grad_clip: float = 1.0  # 0 disables
    ema_decay: float = 0.999  # 0 disables EMA
    seed: int = 0
    checkpoint_every: int = 500  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    log_every: int = 50  # 0 disables train_log.jsonl
    mixed_precision: str = "auto"  # "auto" = bf16 on CUDA, "no" elsewhere | "no" | "bf16" | "fp16"
    compile: str = "auto"  # "auto" = torch.compile on CUDA only | "yes" | "no"
    progress: bool = True  # tqdm bar

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`RayflowError` for values out of range."""
        require(self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        require(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        require(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        require(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1) (0 disables), got {self.ema_decay}")
        require(self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        require(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        require(self.log_every >= 0, f"log_every must be >= 0, got {self.log_every}")
        require(self.mixed_precision in MIXED_PRECISION_CHOICES,
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, got {self.mixed_precision!r}")
        require(self.compile in COMPILE_CHOICES,
                f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {self.compile!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
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


# ---------------------------------------------------------------------- objectives
@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    logs: dict[str, float] = field(default_factory=dict)  # shown in the bar postfix and written to the log


@runtime_checkable
class Objective(Protocol):
    """``objective(model, step, generator) -> LossOutput``.

    ``model`` is the accelerate-prepared (possibly DDP-wrapped / compiled) network: call it, but read
    attributes such as ``prediction_type`` from :func:`unwrap_denoiser` ``(model)``. Draw all randomness from
    ``generator`` (on the training device). Optional methods, called when present:

    * ``after_step(model, step, generator) -> dict[str, float]`` after the optimizer step (e.g. a time-sampler
      update); the returned logs are merged into the step's logs.
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
                drop = torch.rand(b, generator=generator, device=dev) < self.label_dropout
                cond = torch.where(drop, torch.full_like(cond, self.num_classes), cond)
        pred = model(x_t, t.float(), cond)
        ptype = unwrap_denoiser(model).prediction_type
        if ptype != "epsilon":
            pred = convert_prediction(pred.float(), ptype, "epsilon", x_t, a, s)
        loss = F.mse_loss(pred.float(), eps.float())
        return LossOutput(loss, {})


# ---------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of a model's trainable parameters, as a full shadow copy of the module.

    ``shadow <- lerp(shadow, param, 1 - d_n)`` with ``torch._foreach_lerp_`` and diffusers' default decay
    warm-up ``d_n = min(decay, (1 + n) / (10 + n))`` (``n`` = updates so far), so short runs are not dominated
    by the initial weights. Buffers are copied. The shadow module's ``state_dict()`` is what gets saved.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.step = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.step) / (10 + self.step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        shadow = dict(self.module.named_parameters())
        src = [params[n].detach() for n in self._names]
        dst = [shadow[n] for n in self._names]
        if dst:
            torch._foreach_lerp_(dst, src, 1.0 - self.current_decay())
        for (_, b_dst), (_, b_src) in zip(self.module.named_buffers(), model.named_buffers()):
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


def _comparable(config: dict) -> dict:
    cfg = copy.deepcopy(config)
    train = cfg.get("train")
    if isinstance(train, dict):
        for key in RESUME_MUTABLE_TRAIN_KEYS:
            train.pop(key, None)
    return cfg


def _step_of(name: str) -> int | None:
    if not name.startswith("step-"):
        return None
    try:
        return int(name[5:])
    except ValueError:
        return None


def _fmt(v: Any) -> str:
    return v if isinstance(v, str) and v == "<absent>" else json.dumps(v)


def _make_accelerator(mixed_precision: str) -> Any:
    """``Accelerator(mixed_precision=...)``. accelerate keeps one process-wide state and refuses a second
    Accelerator with another precision (a teacher trained in fp32, then a student in bf16, in one process);
    the finished run's precision state is then reset. The distributed state (PartialState) is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        return Accelerator(mixed_precision=mixed_precision)
    except ValueError as exc:
        if "already been initialized" not in str(exc):
            raise
        AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(mixed_precision=mixed_precision)


# ---------------------------------------------------------------------- the trainer
class Trainer:
    """Train ``model`` on ``objective`` with accelerate; see the module docstring for files and guarantees.

    ``run_config`` (JSON-serialisable) describes the run: it is stored in checkpoints and in the final
    ``config.json`` and must match on resume. When it has no ``"model"`` entry and the model carries a
    :class:`~rayflow.models.ModelConfig` as ``model.config``, that is added so the output loads with
    :func:`rayflow.checkpoint.load_model_dir`.
    """

    def __init__(
        self,
        model: Denoiser,
        objective: Objective,
        config: TrainConfig,
        out_dir: str | Path,
        run_config: dict,
        accelerator: Any | None = None,
    ) -> None:
        from accelerate import PartialState

        config.validate()
        self.config = config
        self.objective = objective
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / CHECKPOINTS
        if accelerator is None:
            accelerator = _make_accelerator(resolve_mixed_precision(config, PartialState().device))
        self.accelerator = accelerator
        self.device = accelerator.device

        run_config = dict(run_config)
        model_cfg = getattr(model, "config", None)
        if "model" not in run_config and hasattr(model_cfg, "to_dict") and hasattr(model_cfg, "kind"):
            run_config["model"] = model_cfg.to_dict()
        try:
            self.run_config = _normalise(run_config)
        except (TypeError, ValueError) as exc:
            raise RayflowError(f"run_config must be JSON-serialisable: {exc}") from exc
        self.full_config = {**self.run_config, "train": _normalise(config.to_dict())}

        self.ema = EMA(model, config.ema_decay) if config.ema_decay > 0 else None
        if self.ema is not None:
            self.ema.module.to(self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        require(len(params) > 0, "the model has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay)
        warmup = config.warmup_steps
        # not prepared: accelerate's scheduler wrapper steps num_processes times per step
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
        )
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.compiled = resolve_compile(config, self.device)
        if self.compiled:
            self.model = torch.compile(self.model)
        self.mixed_precision = str(accelerator.mixed_precision)

    # ------------------------------------------------------------------ properties
    @property
    def raw_model(self) -> Denoiser:
        """The trained network, without DDP / compile wrappers (its forward may still autocast)."""
        return unwrap_denoiser(self.model)

    def _final_model(self) -> Denoiser:
        if self.ema is not None:
            return self.ema.module.eval()
        return self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False, keep_torch_compile=False).eval()

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
        if acc.is_main_process:
            model_state = self.raw_model.state_dict()
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            name = f"step-{steps_done:07d}"
            final, tmp = self.ckpt_dir / name, self.ckpt_dir / f".tmp-{name}"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            save_safetensors_atomic(model_state, tmp / "model.safetensors", {"format": "pt"})
            if self.ema is not None:
                save_safetensors_atomic(self.ema.module.state_dict(), tmp / "ema.safetensors", {
                    "format": "pt", "ema_step": str(self.ema.step), "ema_decay": repr(self.ema.decay)})
            save_state({"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict()},
                       tmp / "optimizer.safetensors", tmp / "optimizer.json")
            if hasattr(self.objective, "state_dict"):
                try:
                    save_state(self.objective.state_dict(), tmp / "objective.safetensors", tmp / "objective.json")
                except TypeError as exc:
                    raise RayflowError(f"the objective's state_dict cannot be saved: {exc}") from exc
            from rayflow import __version__

            write_json_atomic({"step": steps_done, "config": self.full_config, "rayflow_version": __version__},
                              tmp / "state.json")
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
        if hasattr(self.objective, "load_state_dict"):
            obj_t = path / "objective.safetensors"
            if obj_t.is_file():
                self.objective.load_state_dict(load_state(obj_t, path / "objective.json"))
        return step

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

    def _log(self, record: dict) -> None:
        with open(self.out_dir / TRAIN_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _write_final(self, steps_done: int) -> Denoiser:
        model = self._final_model()
        if self.accelerator.is_main_process:
            save_model_dir(self.out_dir, model, {**self.run_config, "train": self.config.to_dict(),
                                                 "steps_done": steps_done})
        self.accelerator.wait_for_everyone()
        return model

    # ------------------------------------------------------------------ the loop
    def train(self) -> Denoiser:
        """Train to ``config.max_steps``, resuming from ``out_dir/checkpoints`` if present; returns the EMA model
        (or the raw model if EMA is off), unwrapped, in eval mode.

        At the end writes ``out_dir/model.safetensors`` + ``out_dir/config.json`` via
        :func:`~rayflow.checkpoint.save_model_dir` (weights = EMA), with ``run_config`` as the config plus
        ``"train"`` and ``"steps_done"``. A non-finite loss raises :class:`RayflowError` naming the step before
        anything is written for it.
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
        rank = acc.process_index
        bar = tqdm(total=cfg.max_steps, initial=start, desc="train", dynamic_ncols=True,
                   disable=not (cfg.progress and acc.is_main_process))
        t0 = time.time()
        last_saved = start
        try:
            for step in range(start, cfg.max_steps):
                seed = step_seed(cfg.seed, step, rank)
                torch.manual_seed(seed)
                generator = torch.Generator(device=self.device)
                generator.manual_seed(seed)
                with acc.autocast():
                    out = self.objective(self.model, step, generator)
                loss_mean = acc.reduce(out.loss.detach().float().reshape(()), reduction="mean")
                loss_value = float(loss_mean)
                if not math.isfinite(loss_value):
                    raise RayflowError(
                        f"step {step}: the loss is {loss_value} (diverged); try a lower lr, more warmup_steps "
                        f"or grad_clip > 0. Checkpoints up to step {last_saved} are intact."
                    )
                acc.backward(out.loss)
                grad_norm = None
                if cfg.grad_clip > 0:
                    grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
                    if not math.isfinite(grad_norm) and self.mixed_precision != "fp16":
                        raise RayflowError(
                            f"step {step}: the gradient norm is {grad_norm}; try a lower lr or more warmup_steps. "
                            f"Checkpoints up to step {last_saved} are intact."
                        )
                self.optimizer.step()
                if not acc.optimizer_step_was_skipped:
                    self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(self.raw_model)
                logs = {k: float(v) for k, v in out.logs.items()}
                if hasattr(self.objective, "after_step"):
                    logs.update({k: float(v) for k, v in (self.objective.after_step(self.model, step, generator)
                                                          or {}).items()})
                steps_done = step + 1
                bar.update(1)
                bar.set_postfix({"loss": f"{loss_value:.4g}", **{k: f"{v:.4g}" for k, v in logs.items()}},
                                refresh=False)
                if acc.is_main_process and cfg.log_every and (steps_done % cfg.log_every == 0
                                                               or steps_done == cfg.max_steps):
                    record = {"step": steps_done, "loss": loss_value, "logs": logs,
                              "lr": float(self.lr_scheduler.get_last_lr()[0]), "time": round(time.time() - t0, 3)}
                    if grad_norm is not None:
                        record["grad_norm"] = grad_norm
                    self._log(record)
                if steps_done == cfg.max_steps or (cfg.checkpoint_every and steps_done % cfg.checkpoint_every == 0):
                    self._save_checkpoint(steps_done)
                    last_saved = steps_done
        finally:
            bar.close()
        return self._write_final(cfg.max_steps)
