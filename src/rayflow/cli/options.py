"""The flags and helpers several commands share: the training options and their ``TrainConfig``,
``--option key=value``, ``--pool-size`` and the accelerator of a multi-process launch."""

from __future__ import annotations

import argparse

from rayflow.errors import require
from rayflow.validate import MAX_SEED, float_in, int_in


def _train_args(p: argparse.ArgumentParser, max_steps: int, batch_size: int, lr: float, ema: float) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--max-steps", type=int_in(0), default=max_steps, help=f"optimizer steps (default {max_steps})")
    g.add_argument("--batch-size", type=int_in(1), default=batch_size,
                   help=f"per-process batch (default {batch_size})")
    g.add_argument("--lr", type=float_in(0, lo_open=True), default=lr, help=f"AdamW learning rate (default {lr:g})")
    g.add_argument("--warmup-steps", type=int_in(0), default=0)
    g.add_argument("--weight-decay", type=float_in(0), default=0.0)
    g.add_argument("--grad-clip", type=float_in(0), default=1.0, help="0 disables")
    g.add_argument("--ema-decay", type=float_in(0, 1, hi_open=True), default=ema, help=f"0 disables (default {ema:g})")
    g.add_argument("--seed", type=int_in(0, MAX_SEED), default=0)
    g.add_argument("--checkpoint-every", type=int_in(0), default=500, help="steps between resumable checkpoints")
    g.add_argument("--gradient-accumulation-steps", type=int_in(1), default=1,
                   help="micro-batches per optimizer step (effective batch: batch size x this x processes)")
    g.add_argument("--checkpoints-total-limit", type=int_in(1), default=2,
                   help="checkpoints kept, the oldest removed first (default 2; diffusers' checkpoints_total_limit)")
    g.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    g.add_argument("--compile", default="auto", choices=["auto", "yes", "no"], help="torch.compile (auto: on CUDA)")
    g.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode; reduce-overhead replays each step from CUDA graphs (GPU only)")
    g.add_argument("--layout-optimization", default="force", choices=["force", "inductor"],
                   help="compiled convolutional networks on CUDA: force Inductor's channels-last layout optimisation "
                        "(default), or leave it to Inductor's heuristic")
    g.add_argument("--kernel-tuning", default="none", choices=["none", "coordinate-descent"],
                   help="compiled networks on CUDA: tune Inductor's generated kernels by coordinate descent (faster "
                        "steps for minutes more compilation)")
    g.add_argument("--step-graph", default="auto", choices=["auto", "yes", "no"],
                   help="capture the whole training step (objective, backward, clipping, AdamW, EMA) as one CUDA "
                        "graph; auto: when --compile-mode replays CUDA graphs and the step can be captured")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_config(args: argparse.Namespace):
    from rayflow.training import TrainConfig

    return TrainConfig(
        max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, ema_decay=args.ema_decay, seed=args.seed,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.checkpoints_total_limit,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision, compile=args.compile, compile_mode=args.compile_mode,
        layout_optimization=args.layout_optimization, kernel_tuning=args.kernel_tuning,
        step_graph=args.step_graph, progress=not args.no_progress,
    )


def _parse_options(pairs: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in pairs:
        require("=" in item, f"--option expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        options[key.strip()] = value.strip()
    return options


def _accelerator():
    """An Accelerator only when launched by ``accelerate launch`` / torchrun with several processes (the world
    size as accelerate sees it; a launch whose ranks disagree is refused)."""
    from rayflow.training import launch_accelerator

    return launch_accelerator()


def _pool_size_options(pool_size: int | None, options: dict[str, str]) -> dict[str, str]:
    """``--pool-size N``: one name for every method's pool of pairs / instances (the method option pool_size)."""
    if pool_size is None:
        return options
    require(pool_size >= 1, f"--pool-size must be >= 1, got {pool_size}")
    return {**options, "pool_size": str(pool_size)}
