"""``rayflow``: the command-line interface.

    rayflow train-teacher --data SPEC --out DIR [training options]
    rayflow distill --method NAME --teacher DIR|exact --data SPEC --out DIR [--max-steps N] [--batch-size B]
                    [--option key=value ...]
    rayflow sample  (--model DIR | --teacher exact --data SPEC) --steps N --num K --out samples.npz
    rayflow distill --teacher PIPE_DIR --data captions:path=DIR --method NAME --lora-rank R --out DIR
    rayflow sample  --model STUDENT_DIR --prompt "..." [--prompts FILE] --steps N --out DIR
    rayflow eval    --samples samples.npz (--data SPEC | --clip-model DIR [--prompts FILE]) --out DIR
    rayflow export  --model STUDENT_DIR --out PIPE_DIR [--fuse]
    rayflow demo    --out DIR
    rayflow methods

A user's mistake (a missing file, a bad option, a checkpoint of another configuration) prints one line,
``rayflow: error: ...``, and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from rayflow.errors import RayflowError, require
from rayflow.validate import (
    MAX_SEED,
    check_device,
    check_fits_memory,
    check_output_dir,
    check_output_file,
    float_in,
    int_in,
    int_list,
)


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
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_config(args: argparse.Namespace):
    from rayflow.training import TrainConfig

    return TrainConfig(
        max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, ema_decay=args.ema_decay, seed=args.seed,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.checkpoints_total_limit,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision, compile=args.compile, compile_mode=args.compile_mode,
        progress=not args.no_progress,
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


# ---------------------------------------------------------------------- commands
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


def _pool_size_options(pool_size: int | None, options: dict[str, str]) -> dict[str, str]:
    """``--pool-size N``: one name for every method's pool of pairs / instances (the method option pool_size)."""
    if pool_size is None:
        return options
    require(pool_size >= 1, f"--pool-size must be >= 1, got {pool_size}")
    return {**options, "pool_size": str(pool_size)}


def _is_sd_distill(args: argparse.Namespace) -> bool:
    from rayflow.pipelines.sd import is_pipeline_dir

    data = str(args.data).strip().lower()
    return is_pipeline_dir(args.teacher) or data.startswith(("captions:", "prompts:"))


def cmd_distill_sd(args: argparse.Namespace) -> int:
    """``rayflow distill --teacher PIPE_DIR --data captions:path=DIR ...``: a LoRA (or full) SD student."""
    from rayflow.methods import get_method
    from rayflow.models.text import DEFAULT_LORA_TARGETS
    from rayflow.pipelines.sd import LoraSpec, SDOptions, distill_sd

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
                     accelerator=_accelerator())
    print(f"{method.name} student written to {args.out} ({time.time() - t0:.0f} s, "
          f"{result.teacher_nfe} teacher evaluations)")
    return 0


def _labels_for(spec: str, n: int, num_classes: int, generator: torch.Generator) -> torch.Tensor | None:
    if num_classes == 0:
        require(spec in ("cycle", "random"), "--labels needs a class-conditional model")
        return None
    if spec == "cycle":
        return torch.arange(n) % num_classes
    if spec == "random":
        return torch.randint(0, num_classes, (n,), generator=generator)
    try:
        label = int(spec)
    except ValueError as exc:
        raise RayflowError(f"--labels must be cycle, random or a class index, got {spec!r}") from exc
    require(0 <= label < num_classes, f"--labels {label} is not a class of this model (0..{num_classes - 1})")
    return torch.full((n,), label, dtype=torch.long)


def _sd_student_dir(model: str | None) -> bool:
    if model is None or not (Path(model) / "config.json").is_file():
        return False
    try:
        cfg = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(cfg, dict) and (cfg.get("model") or {}).get("kind") == "sd"


def cmd_sample_sd(args: argparse.Namespace) -> int:
    """``rayflow sample --model STUDENT --prompt "..." [--prompts FILE] --steps N --out DIR``."""
    from rayflow.captions import load_captions
    from rayflow.pipelines.sd import (
        decode_latents,
        is_pipeline_dir,
        load_sd_pipeline,
        load_sd_student,
        sample_teacher_latents,
        write_samples,
    )

    require(args.model is not None, "--prompt/--prompts need --model STUDENT_DIR (or a pipeline folder)")
    teacher = is_pipeline_dir(args.model)
    require(teacher or _sd_student_dir(args.model),
            f"{args.model}: neither a diffusers pipeline folder nor a student of a Stable Diffusion pipeline")
    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += load_captions(f"prompts:path={args.prompts}").texts
    require(len(prompts) >= 1, "give --prompt TEXT (repeatable) or --prompts FILE")
    require(args.steps is None or args.steps >= 1, f"--steps must be >= 1, got {args.steps}")
    require(not str(args.out).endswith(".npz"), f"--out names a directory for prompt samples, got {args.out}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if teacher:  # the teacher itself, solved with rayflow's samplers: the reference for its students
        from rayflow.samplers import sampler_nfe

        sd = load_sd_pipeline(args.model)
        steps, sampler = args.steps or 25, args.sampler or "dpm++2m"
        t0 = time.time()
        latents = sample_teacher_latents(sd, prompts, steps, sampler, guidance=args.guidance, seed=args.seed,
                                         device=device, batch_size=min(args.batch_size, 64))
        write_samples(args.out, decode_latents(sd, latents, device), latents, prompts,
                      nfe=sampler_nfe(sampler, steps))
        print(f"{len(prompts)} teacher images ({sampler}, {steps} steps, guidance {args.guidance:g}) written to "
              f"{args.out} in {time.time() - t0:.1f} s")
        return 0
    require(args.sampler is None, "students use their method's own sampler; drop --sampler")
    student = load_sd_student(args.model, device=device)
    steps = args.steps or 4
    t0 = time.time()
    latents = student.sample_latents(prompts, steps, seed=args.seed, guidance=args.guidance,
                                     batch_size=min(args.batch_size, 64))
    images = student.decode(latents)
    write_samples(args.out, images, latents, prompts, nfe=student.method.nfe_for_steps(steps))
    print(f"{len(prompts)} images from {student.method.name} ({student.method.nfe_for_steps(steps)} NFE) written to "
          f"{args.out} in {time.time() - t0:.1f} s")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from rayflow.data import to_uint8_images

    if args.prompt or args.prompts or _sd_student_dir(args.model):
        return cmd_sample_sd(args)
    from rayflow.distillation import load_generator
    from rayflow.evaluation import save_sample_grid, save_samples_npz

    check_output_file(args.out, "--out", (".npz",))
    if args.grid:
        check_output_file(args.grid, "--grid", (".png",))
    device = check_device(args.device) if args.device else ("cuda" if torch.cuda.is_available() else "cpu")
    gen = load_generator(model=args.model, teacher=args.teacher, data=args.data, schedule_name=args.schedule,
                         device=device)
    # noise, samples and the uint8 copy are all held at once
    check_fits_memory(3 * 4 * args.num * math.prod(gen.sample_shape), f"--num {args.num}")
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.num, *gen.sample_shape, generator=g)
    labels = _labels_for(args.labels, args.num, gen.num_classes, g)
    t0 = time.time()
    x = gen.generate(noise, args.steps, cond=labels, guidance=args.guidance, sampler=args.sampler,
                     batch_size=args.batch_size).float()
    elapsed = time.time() - t0
    images = to_uint8_images(x) if x.ndim == 4 else None
    nfe = gen.nfe(args.steps or gen.default_steps, args.sampler)
    save_samples_npz(args.out, x.numpy(), images=images, labels=None if labels is None else labels.numpy(), nfe=nfe)
    if args.grid and images is not None:
        save_sample_grid(images[:64], args.grid)
    print(f"{args.num} samples from {gen.name} ({nfe} NFE) "
          f"written to {args.out} in {elapsed:.1f} s")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rayflow.comparison import evaluate_npz
    from rayflow.data import load_dataset
    from rayflow.evaluation import format_table, load_samples_npz, write_results

    require(args.data is not None or args.clip_model is not None,
            "give --data (reference data), --clip-model, or both")
    if args.metric == "inception-fid":  # a missing optional extra is refused before any work
        from rayflow.metrics import inception_weights_path

        inception_weights_path()
    out = check_output_dir(args.out)
    if args.feature_net is not None:
        feature_net = Path(args.feature_net)
        require(not feature_net.exists() or feature_net.is_dir(), f"--feature-net {feature_net}: not a directory")
    previous = _read_results(out)  # before any scoring: a broken results.json is refused up front
    samples = load_samples_npz(args.samples)
    nfe = args.nfe if args.nfe is not None else samples.get("nfe")
    require(nfe is not None, f"{args.samples} does not record its NFE (written by an older rayflow); pass --nfe N")
    metrics: dict = {}
    if args.clip_model is not None:  # prompt-conditioned samples: CLIP score against their prompts
        from rayflow.clip_score import clip_score, read_prompts

        prompts_file = Path(args.prompts) if args.prompts else Path(args.samples).parent / "prompts.txt"
        require(samples["images"] is not None, f"{args.samples}: no 'images' array for the CLIP score")
        metrics["clip_score"] = clip_score(samples["images"], read_prompts(prompts_file), args.clip_model)
    if args.data is not None:
        teacher = load_samples_npz(args.teacher_samples) if args.teacher_samples else None
        dataset = load_dataset(args.data, split=args.split)
        metrics.update(evaluate_npz(samples, dataset, teacher_samples=teacher, feature_net_dir=args.feature_net,
                                    reference_num=args.reference_num, seed=args.seed,
                                    inception_fid=args.metric == "inception-fid"))
    row = {"method": args.method or Path(args.samples).stem, "nfe": int(nfe), **metrics}
    rows = [r for r in previous if (r.get("method"), r.get("nfe")) != (row["method"], row["nfe"])]
    rows.append(row)
    write_results(rows, out)
    print(format_table([row]))
    return 0


def _read_results(out: Path) -> list[dict]:
    """The rows of an existing ``out/results.json`` (``[]`` when absent), or a one-line error if it is not a
    list of objects with ``method`` and ``nfe``."""
    path = out / "results.json"
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RayflowError(f"{path}: not a readable results file ({exc}); move it away or use another --out") from exc
    require(isinstance(rows, list) and all(isinstance(r, dict) and "method" in r and "nfe" in r for r in rows),
            f"{path}: expected a JSON list of rows with \"method\" and \"nfe\"; move it away or use another --out")
    return rows


def cmd_export(args: argparse.Namespace) -> int:
    from rayflow.pipelines.export import export_student

    t0 = time.time()
    res = export_student(args.model, args.out, fuse=args.fuse)
    what = "fused UNet" if res.fused else ("LoRA file" if res.lora else "UNet")
    print(f"{res.pipeline_class} written to {res.out_dir} ({what}, scheduler {'.'.join(res.scheduler)}; "
          f"{time.time() - t0:.0f} s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rayflow.demo import run_demo

    check_output_dir(args.out)
    run_demo(args.out, data=args.data, quick=args.quick, methods=args.methods.split(",") if args.methods else None,
             seed=args.seed)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from rayflow.methods import available_methods, get_method

    for name in available_methods():
        doc = (get_method(name).__doc__ or "").strip().splitlines()
        print(f"{name:22s} {doc[0] if doc else ''}")
    return 0


# ---------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are :class:`RayflowError` (one line, exit code 2), not argparse's
    usage block plus a message; subcommand parsers inherit the class."""

    def error(self, message: str):  # type: ignore[override]
        raise RayflowError(message)


def _one_line_error(message: str) -> None:
    print("rayflow: error: " + " ".join(message.split()), file=sys.stderr)


def _is_allocation_failure(exc: RuntimeError) -> bool:
    """torch reports a failed CPU allocation as a plain RuntimeError, CUDA's as OutOfMemoryError."""
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(exc)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def build_parser() -> argparse.ArgumentParser:
    from rayflow.methods import available_methods  # the registry names the methods in the help

    p = _Parser(prog="rayflow", description="Few-step generators distilled from diffusion models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-teacher", help="train an epsilon-prediction teacher on a data set")
    t.add_argument("--data", required=True, help="data spec, e.g. digits, mnist:path=DIR,pad=32, mog:dim=8")
    t.add_argument("--out", required=True, help="output directory (resumes if it holds a checkpoint)")
    t.add_argument("--model", choices=["mlp", "unet"], default=None, help="network (default: by data shape)")
    t.add_argument("--hidden", type=int_in(1, 1 << 16), default=None, help="MLP width")
    t.add_argument("--channels", type=int_list, default=None, help="UNet channels per level, e.g. 32,64,64")
    t.add_argument("--schedule", default="linear", choices=["linear", "scaled_linear", "cosine"])
    t.add_argument("--unconditional", action="store_true", help="ignore labels")
    t.add_argument("--label-dropout", type=float_in(0, 1, hi_open=True), default=0.1,
                   help="label dropout for CFG (default 0.1)")
    _train_args(t, max_steps=4000, batch_size=256, lr=1e-3, ema=0.999)
    t.set_defaults(func=cmd_train_teacher)

    d = sub.add_parser("distill", help="distil a teacher into a few-step student")
    d.add_argument("--method", required=True, help="one of: " + ", ".join(available_methods()))
    d.add_argument("--teacher", required=True, help="teacher directory, or 'exact' for mog data")
    d.add_argument("--data", required=True, help="data spec (the teacher's data)")
    d.add_argument("--out", required=True, help="output directory (resumes if it holds a checkpoint)")
    d.add_argument("--guidance", type=float_in(1, also=(0.0,)), default=1.0,
                   help="teacher CFG scale for targets and pairs (1 = none)")
    d.add_argument("--cache", default=None, help="directory for resumable pair/target caches")
    d.add_argument("--schedule", default="linear", choices=["linear", "scaled_linear", "cosine"],
                   help="noise schedule of the exact teacher")
    d.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option (repeat)")
    d.add_argument("--pool-size", type=int, default=None, metavar="N",
                   help="pairs (or RayFlow instances) in the method's training pool; sets option pool_size")
    sdg = d.add_argument_group("diffusers pipeline teachers (--teacher PIPE_DIR --data captions:path=DIR)")
    sdg.add_argument("--lora-rank", type=int, default=None, help="LoRA rank of the student (default 64)")
    sdg.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    sdg.add_argument("--lora-targets", default=None,
                     help="comma-separated module names for LoRA (default: attention, feed-forward, resnet convs)")
    sdg.add_argument("--full-finetune", action="store_true", help="train the whole UNet instead of a LoRA")
    sdg.add_argument("--resolution", type=int, default=None, help="image size (default: the UNet's)")
    sdg.add_argument("--random-crop", action="store_true", help="random instead of centre crops")
    sdg.add_argument("--random-flip", action="store_true", help="random horizontal flips")
    sdg.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for UNet memory")
    sdg.add_argument("--teacher-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                     help="frozen teacher UNet precision (auto: bf16 on CUDA)")
    sdg.add_argument("--validation-prompts", nargs="+", default=None, metavar="PROMPT",
                     help="prompts the student samples at 1, 2 and 4 steps every --validation-steps (PNG grids in "
                          "OUT/validation/, TensorBoard)")
    sdg.add_argument("--validation-steps", type=int_in(0), default=0, metavar="N",
                     help="optimizer steps between validation images (default 500 with --validation-prompts)")
    _train_args(d, max_steps=2000, batch_size=256, lr=5e-4, ema=0.999)
    d.set_defaults(func=cmd_distill)

    s = sub.add_parser("sample", help="generate samples from a teacher or a student")
    s.add_argument("--model", default=None, help="teacher or student directory")
    s.add_argument("--teacher", default=None, help="'exact' (with --data mog:...) to sample the exact teacher")
    s.add_argument("--data", default=None, help="data spec for --teacher exact")
    s.add_argument("--schedule", default="linear", choices=["linear", "scaled_linear", "cosine"])
    s.add_argument("--steps", type=int_in(1, 100_000), default=None, help="sampling steps (default: the model's)")
    s.add_argument("--num", type=int_in(1), default=64, help="number of samples")
    s.add_argument("--out", required=True,
                   help="output .npz (x float32; images uint8 NHWC; labels); a directory for --prompt/--prompts")
    s.add_argument("--prompt", action="append", default=None, help="prompt for a pipeline student (repeatable)")
    s.add_argument("--prompts", default=None, help="file of prompts, one per line (or JSON lines with text)")
    s.add_argument("--sampler", default=None, help="teachers only: ddim, dpm++2m, euler, heun")
    s.add_argument("--guidance", type=float_in(0), default=1.0, help="classifier-free guidance scale (1 = none)")
    s.add_argument("--labels", default="cycle", help="cycle | random | a class index")
    s.add_argument("--seed", type=int_in(0, MAX_SEED), default=0)
    s.add_argument("--batch-size", type=int_in(1), default=1000)
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    s.add_argument("--grid", default=None, help="also write a PNG grid of the first 64 images")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("eval", help="compare samples with reference data")
    e.add_argument("--samples", required=True, help=".npz written by rayflow sample")
    e.add_argument("--data", default=None, help="data spec of the reference")
    e.add_argument("--clip-model", default=None, help="local CLIP folder (CLIPModel + CLIPProcessor): adds the CLIP "
                   "score of prompt-conditioned samples; nothing is downloaded")
    e.add_argument("--prompts", default=None, help="prompts of the samples, one per line (default: prompts.txt "
                   "beside --samples)")
    e.add_argument("--split", default="test", choices=["train", "test"])
    e.add_argument("--teacher-samples", default=None, help=".npz of the teacher from the same noise (fidelity)")
    e.add_argument("--feature-net", default=None, help="directory of the feature classifier (trained if empty)")
    e.add_argument("--reference-num", type=int_in(1, 10_000_000), default=10000,
                   help="fresh true samples for mog data")
    e.add_argument("--method", default=None, help="row label (default: the samples file name)")
    e.add_argument("--nfe", type=int_in(0), default=None, help="row NFE label (default: recorded by rayflow sample)")
    e.add_argument("--seed", type=int_in(0, MAX_SEED), default=0)
    e.add_argument("--metric", default="fd", choices=["fd", "inception-fid"],
                   help="fd: rayflow's feature-net metrics (fd, kid, fd_classifier); inception-fid: also FID/KID "
                        "on InceptionV3 features (pip install 'rayflow[fid]'; images upsampled to 299 px, "
                        "comparable only with each other, not with published CIFAR/COCO FIDs)")
    e.add_argument("--out", required=True, help="directory for results.json / results.md (rows are merged)")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="write a Stable Diffusion student as a diffusers pipeline folder")
    x.add_argument("--model", required=True, help="student directory (rayflow distill --teacher PIPE_DIR ...)")
    x.add_argument("--out", required=True, help="pipeline folder to write (new, empty, or a previous export)")
    x.add_argument("--fuse", action="store_true", help="merge the LoRA into unet/ instead of a LoRA file")
    x.set_defaults(func=cmd_export)

    m = sub.add_parser("demo", help="the whole pipeline on the embedded data in a few minutes on a CPU")
    m.add_argument("--out", default="runs/demo")
    m.add_argument("--data", default="digits")
    m.add_argument("--methods", default=None, help="comma-separated subset of methods (default: all)")
    m.add_argument("--quick", action="store_true", help="a much smaller budget (for tests)")
    m.add_argument("--seed", type=int_in(0, MAX_SEED), default=0)
    m.set_defaults(func=cmd_demo)

    ls = sub.add_parser("methods", help="list the distillation methods")
    ls.set_defaults(func=cmd_methods)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except RayflowError as exc:
        _one_line_error(str(exc))
        return 2
    except OSError as exc:
        # a disk that fills, a folder made read-only mid-run, a path the checks could not foresee: the
        # file and the reason, never a traceback (what was written before stays: every write is atomic)
        where = f"{exc.filename}: " if exc.filename else ""
        _one_line_error(f"{where}{exc.strerror or exc}")
        return 2
    except MemoryError:
        _one_line_error("out of memory; use a smaller --batch-size, --num or data set")
        return 2
    except RuntimeError as exc:
        if not _is_allocation_failure(exc):
            raise  # a bug, not a user mistake: keep the traceback
        _one_line_error(f"out of memory ({str(exc).splitlines()[0][:160]}); use a smaller --batch-size, --num "
                        "or data set")
        return 2
    except KeyboardInterrupt:
        print("rayflow: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
