"""The trainer's configuration: :class:`TrainConfig`, its resolution on a device, and the per-step seeds."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from rayflow.errors import RayflowError, require
from rayflow.models.speed import CHANNELS_LAST_CHOICES, KERNEL_TUNING_CHOICES

MIXED_PRECISION_CHOICES = ("auto", "no", "bf16", "fp16")
COMPILE_CHOICES = ("auto", "yes", "no")
#: Inductor's layout optimisation for compiled convolutional networks on CUDA: forced, or left to its heuristic
LAYOUT_OPTIMIZATION_CHOICES = ("force", "inductor")
#: torch.compile modes of the student (``default`` = torch's); the first two replay the step from CUDA graphs
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
#: the whole step captured as one CUDA graph: "auto" = when the compile mode asks for CUDA graphs and the step can be
#: captured | "yes" = whenever it can be (a notice says why not) | "no"
STEP_GRAPH_CHOICES = ("auto", "yes", "no")
#: learning-rate schedules (diffusers.optimization names), each after ``warmup_steps`` of linear warm-up
LR_SCHEDULE_CHOICES = ("constant", "linear", "cosine")


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
    # inductor's layout optimisation (every convolution's activations channels-last through forward and backward)
    # when compiling a convolutional network on CUDA: "force" = always | "inductor" = its own heuristic, which
    # skips networks with few or narrow convolutions; forcing it took the Fashion-MNIST UNet's step from 13.4 to
    # 10.8 ms of GPU time, most layout copies gone (BENCHMARKS §6.4)
    layout_optimization: str = "force"
    # Inductor's kernel tuning when compiling on CUDA: "none" | "coordinate-descent" (each generated pointwise and
    # reduction kernel's block sizes tuned by timing them: the Fashion-MNIST UNet trained 6 % faster and sampled
    # 14 % faster, for about four minutes more compilation, BENCHMARKS §6.5)
    kernel_tuning: str = "none"
    # the whole step (objective, backward, clipping, AdamW, EMA) captured as one CUDA graph and replayed, so the
    # host's speed no longer sets the rate (BENCHMARKS §6.8): "auto" = when compile_mode replays CUDA graphs and
    # the step can be captured (one CUDA process, no accumulation, no fp16, a capturable objective; the network
    # is then compiled without graphs of its own) | "yes" = whenever it can be, with a notice when not | "no"
    step_graph: str = "auto"

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
        require(self.layout_optimization in LAYOUT_OPTIMIZATION_CHOICES,
                f"layout_optimization must be one of {', '.join(LAYOUT_OPTIMIZATION_CHOICES)}, "
                f"got {self.layout_optimization!r}")
        require(self.kernel_tuning in KERNEL_TUNING_CHOICES,
                f"kernel_tuning must be one of {', '.join(KERNEL_TUNING_CHOICES)}, got {self.kernel_tuning!r}")
        require(self.step_graph in STEP_GRAPH_CHOICES,
                f"step_graph must be one of {', '.join(STEP_GRAPH_CHOICES)}, got {self.step_graph!r}")

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
