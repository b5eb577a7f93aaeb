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
compiled (``compile="auto"``), and AdamW is fused. With a CUDA-graph ``compile_mode`` and a capturable objective,
the whole step (objective, backward, clipping, AdamW, EMA) is captured as one CUDA graph and replayed
(``step_graph``, :mod:`rayflow.training.step_graph`).

Determinism. Step ``k`` on process ``r`` hands the objective a fresh ``torch.Generator`` on the accelerator's
device seeded with :func:`step_seed` ``(config.seed, k, r)`` (the global generators of the CPU and of the training
device are re-seeded from the same value, so dropout and any stray ``torch.rand`` are covered too; micro-batch
``m > 0`` of an accumulated step uses :func:`micro_seed`). Draws never depend on history, so a run interrupted at a
checkpoint and resumed is bit-identical to an uninterrupted one (eager mode, one GPU or DDP; with ``torch.compile``
two fresh runs already differ in the last bits, since Inductor picks kernels per compilation, so a compiled resume
matches only to rounding).

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

Where each piece lives::

    config.py      TrainConfig, the mixed-precision / compile resolution, the per-step seeds
    objectives.py  the Objective protocol, LossOutput, the teacher's EpsilonObjective
    ema.py         EMA
    step_graph.py  the whole step as one CUDA graph (StepGraph, and why a step cannot be captured)
    launch.py      the launch check, the Accelerator, the JSONL and TensorBoard trackers
    resume.py      checkpoints and exact resume (CheckpointMixin), the config comparison on resume
    trainer.py     the Trainer and its loop
"""

from __future__ import annotations

from rayflow.checkpoint import unwrap_denoiser
from rayflow.training.config import (
    CHANNELS_LAST_CHOICES,
    COMPILE_CHOICES,
    COMPILE_MODES,
    LR_SCHEDULE_CHOICES,
    MIXED_PRECISION_CHOICES,
    TrainConfig,
    micro_seed,
    resolve_compile,
    resolve_mixed_precision,
    step_seed,
)
from rayflow.training.ema import EMA
from rayflow.training.launch import check_launch, distributed_state, launch_accelerator
from rayflow.training.objectives import EpsilonObjective, LossOutput, Objective
from rayflow.training.resume import (
    CHECKPOINTS,
    LATEST,
    RESUME_MUTABLE_TRAIN_KEYS,
    RESUME_NOTICE_TRAIN_KEYS,
    TENSORBOARD_DIR,
    TRAIN_LOG,
)
from rayflow.training.trainer import Trainer, TrainingStopped

__all__ = ["CHANNELS_LAST_CHOICES", "CHECKPOINTS", "COMPILE_CHOICES", "COMPILE_MODES", "EMA", "LATEST",
           "LR_SCHEDULE_CHOICES", "MIXED_PRECISION_CHOICES", "RESUME_MUTABLE_TRAIN_KEYS", "RESUME_NOTICE_TRAIN_KEYS",
           "TENSORBOARD_DIR", "TRAIN_LOG", "EpsilonObjective", "LossOutput", "Objective", "TrainConfig", "Trainer",
           "TrainingStopped", "check_launch", "distributed_state", "launch_accelerator", "micro_seed",
           "resolve_compile", "resolve_mixed_precision", "step_seed", "unwrap_denoiser"]
