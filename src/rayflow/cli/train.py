"""``rayflow train-teacher`` and ``rayflow distill`` (a toy/image teacher, or a diffusers pipeline teacher)."""

from __future__ import annotations

import argparse
import time

from rayflow.cli.options import _accelerator, _parse_options, _pool_size_options, _train_config
from rayflow.errors import require
from rayflow.validate import check_output_dir


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from rayflow.data import load_dataset
    from rayflow.distillation import train_teacher
    from rayflow.models import ModelConfig, default_model_config
    from rayflow.schedules import VPSchedule

    check_output_dir(args.out)
    dataset = load_dataset(args.data)
    num_classes = 0 if args.unconditional else dataset.num_classes
    model = default_model_config(tuple(dataset.sample_shape), num_classes)
    if args.model is not None:
        require(args.model != "unet" or dataset.kind == "image", "--model unet needs image data")
        model = ModelConfig(kind=args.model, sample_shape=tuple(dataset.sample_shape), num_classes=num_classes)
    if args.hidden is not None:
        model.hidden = args.hidden
    if args.channels is not None:
        require(model.kind == "unet", f"--channels applies to the unet model, not {model.kind}")
        model.channels = args.channels
    t0 = time.time()
    train_teacher(dataset, args.out, _train_config(args), model=model,
                  schedule=VPSchedule.from_name(args.schedule), conditional=not args.unconditional,
                  label_dropout=args.label_dropout, accelerator=_accelerator())
    print(f"teacher written to {args.out} ({time.time() - t0:.0f} s)")
    return 0


def _is_sd_distill(args: argparse.Namespace) -> bool:
    from rayflow.pipelines.sd import is_pipeline_dir

    data = str(args.data).strip().lower()
    return is_pipeline_dir(args.teacher) or data.startswith(("captions:", "prompts:"))


def cmd_distill_sd(args: argparse.Namespace) -> int:
    """``rayflow distill --teacher PIPE_DIR --data captions:path=DIR ...``: a LoRA (or full) SD student."""
    from rayflow.methods import get_method
    from rayflow.models.text import DEFAULT_LORA_TARGETS
    from rayflow.pipelines.sd import LoraSpec, SDOptions, distill_sd

    require(args.gen_batch is None, "--gen-batch: only for a teacher directory (a pipeline teacher's UNet is not "
                                    "compiled for pools)")
    if args.full_finetune:
        require(args.lora_rank is None, "--full-finetune and --lora-rank exclude each other")
        lora = None
    else:
        targets = tuple(t for t in (args.lora_targets or "").split(",") if t.strip()) or DEFAULT_LORA_TARGETS
        lora = LoraSpec(rank=64 if args.lora_rank is None else args.lora_rank, alpha=args.lora_alpha,
                        target_modules=targets)
    check_output_dir(args.out)
    if args.cache is not None:
        check_output_dir(args.cache, "--cache")
    options = SDOptions(lora=lora, resolution=args.resolution, center_crop=not args.random_crop,
                        random_flip=args.random_flip, gradient_checkpointing=args.gradient_checkpointing,
                        teacher_dtype=args.teacher_dtype,
                        validation_prompts=tuple(args.validation_prompts or ()),
                        validation_steps=args.validation_steps or (500 if args.validation_prompts else 0))
    method = get_method(args.method).from_options(_pool_size_options(args.pool_size, _parse_options(args.option)))
    train = _train_config(args)
    t0 = time.time()
    result = distill_sd(method, args.teacher, args.data, args.out, train, options, guidance=args.guidance,
                        cache_dir=args.cache, progress=not args.no_progress, accelerator=_accelerator())
    print(f"{method.name} student of {args.teacher} written to {args.out} ({time.time() - t0:.0f} s, "
          f"{result.teacher_nfe} teacher evaluations)")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from rayflow.distillation import distill
    from rayflow.methods import get_method

    if _is_sd_distill(args):
        return cmd_distill_sd(args)
    check_output_dir(args.out)
    if args.cache is not None:
        check_output_dir(args.cache, "--cache")
    sd_only = [flag for flag, on in (("--lora-rank", args.lora_rank is not None), ("--lora-alpha", args.lora_alpha),
                                     ("--full-finetune", args.full_finetune), ("--resolution", args.resolution),
                                     ("--validation-prompts", args.validation_prompts is not None),
                                     ("--validation-steps", args.validation_steps > 0))
               if on]
    require(not sd_only, f"{', '.join(sd_only)}: only for a diffusers pipeline teacher (--teacher PIPE_DIR)")
    method = get_method(args.method).from_options(_pool_size_options(args.pool_size, _parse_options(args.option)))
    t0 = time.time()
    result = distill(method, args.teacher, args.data, args.out, _train_config(args), guidance=args.guidance,
                     cache_dir=args.cache, schedule_name=args.schedule, progress=not args.no_progress,
                     accelerator=_accelerator(), gen_batch=args.gen_batch or "auto")
    print(f"{method.name} student written to {args.out} ({time.time() - t0:.0f} s, "
          f"{result.teacher_nfe} teacher evaluations)")
    return 0
