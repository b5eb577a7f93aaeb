"""``rayflow sample``: samples of a teacher or a student to ``.npz``, or prompt samples of a Stable Diffusion
teacher pipeline or student to a folder."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from rayflow.errors import RayflowError, require
from rayflow.validate import check_device, check_fits_memory, check_output_file


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
