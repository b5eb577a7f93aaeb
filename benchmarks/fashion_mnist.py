#!/usr/bin/env python
"""The head-to-head benchmark: Fashion-MNIST 32x32, class-conditional, every method at 1, 2, 4 and 8 NFE.

    python benchmarks/fashion_mnist.py --data ../shared/data/fashion-mnist --out runs/bench-fm
    python benchmarks/fashion_mnist.py ... --parts teacher,reference,samplers,speed      # in resumable parts
    python benchmarks/fashion_mnist.py ... --parts methods --methods rayflow,perflow
    python benchmarks/fashion_mnist.py ... --jobs 7 --threads 2      # the variants side by side on one GPU
    python benchmarks/fashion_mnist.py ... --teacher benchmarks/checkpoints/fashion-mnist-teacher  # reuse it
    python benchmarks/fashion_mnist.py ... --parts report                                # tables + plots
    python benchmarks/fashion_mnist.py --tiny --allow-cpu ...                            # a dry run on a CPU

Parts (each resumes; a finished part is skipped):

* ``teacher``   a class-conditional epsilon UNet (diffusers UNet2DModel, 32x32 padded) trained with bf16 and
  torch.compile, label dropout 0.1 for CFG; seeded, so the same command gives the same teacher.
* ``reference`` the teacher at 50 DDIM steps and 25 DPM-Solver++ steps. Every row is scored against the 10 000
  test images with the committed pair of feature networks (``--feature-net``/``--feature-net-2``, copied into the
  run): ``fd``/``kid`` on network 1's early view, ``fd_net2`` the same on network 2 (the report's Kendall tau
  between them), ``fd_multilayer`` and ``fd_classifier`` for continuity, class accuracy.
* ``samplers``  DDIM and DPM-Solver++ on the teacher at 1, 2, 4, 8 NFE.
* ``methods``   the issue's seven distillation variants (``--methods`` adds the two RayFlow ablations) with one
  budget (same student updates, batch size and CFG setting), then evaluated at 1, 2, 4, 8 NFE: FD, KID, class
  accuracy, fidelity to the teacher's 50-step samples from the same noise, seconds per image, teacher NFEs
  spent, training throughput.
* ``speed``     1-NFE throughput at a large batch and latency at batch 1 of the benchmark UNet: eager,
  torch.compile, CUDA graphs, and both together, beside the roofline (FLOPs per image over the measured bf16
  matmul rate).
* ``report``    merges every part's rows into ``benchmarks/results/fashion_mnist.json`` and draws the plots.

Every evaluation uses the noise and labels of ``rayflow sample --seed SEED --num N --labels cycle``, so one
command regenerates the ``.npz`` of any row from the saved checkpoints (printed by ``report``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from rayflow.checkpoint import read_json, write_json_atomic  # noqa: E402
from rayflow.comparison import Scorer, compare  # noqa: E402
from rayflow.data import load_dataset, to_uint8_images  # noqa: E402
from rayflow.distillation import distill, load_generator, train_teacher  # noqa: E402
from rayflow.errors import RayflowError, require  # noqa: E402
from rayflow.evaluation import plot_metric_vs_nfe, save_grid_by_method, write_results  # noqa: E402
from rayflow.methods import available_methods, get_method  # noqa: E402
from rayflow.models import ModelConfig  # noqa: E402
from rayflow.models.speed import release_compiled_state  # noqa: E402
from rayflow.schedules import VPSchedule  # noqa: E402
from rayflow.training import TrainConfig  # noqa: E402
from rayflow.training.config import COMPILE_MODES  # noqa: E402


def variants() -> dict[str, tuple[str, dict[str, str]]]:
    """Row name -> (method, options), from the registry: each method declares its rows (its ablations among them)."""
    out: dict[str, tuple[str, dict[str, str]]] = {}
    for name in available_methods():
        for row, options in get_method(name).variants().items():
            out[row] = (name, dict(options))
    return out


def tiny_options() -> dict[str, dict[str, str]]:
    """--tiny: pools small enough for a CPU dry run (the real run keeps every method's defaults)."""
    return {name: dict(get_method(name).tiny_options) for name in available_methods()}


#: the distilled variants: the seven of the issue and opt-in RayFlow ablations
VARIANTS = variants()
#: the seven rows the benchmark exists for; the rest are opt-in ablations (``--methods``)
ISSUE_VARIANTS = ("rayflow", "rayflow-learned-time-sampler", "rayflow-no-instance-target", "proreflow-ii",
                  "perflow", "reflow", "rectified-diffusion")
TINY_OPTIONS = tiny_options()
#: variants whose teacher targets equal another's reuse its cache (each still reports the teacher NFEs it needs)
SHARED_CACHE: dict[str, str] = {name: "rayflow" for name in (
    "rayflow-learned-time-sampler", "rayflow-epsilon-head", "rayflow-matched-start")}
PARTS = ("teacher", "reference", "samplers", "methods", "speed", "report")
#: the committed feature networks of the default fd and fd_net2 (benchmarks/ae_feature_nets.py; issue 11). Rows of
#: runs before the switch were scored with the classifiers benchmarks/checkpoints/fashion-mnist-feature-net{,-2}
FEATURE_NET = REPO / "benchmarks" / "checkpoints" / "fashion-mnist-ae-feature-net"
FEATURE_NET_2 = REPO / "benchmarks" / "checkpoints" / "fashion-mnist-ae-feature-net-2"
FEATURE_NET_FILES = ("feature_net.safetensors", "feature_net.json")
#: the feature view of every row's fd/kid/fd_net2 (rayflow's default; benchmarks/rayflow_readings.py sets its own)
FD_VIEW = "early"


@dataclass
class BenchConfig:
    teacher_steps: int = 8000
    teacher_batch: int = 256
    teacher_lr: float = 3e-4
    channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 1
    distill_steps: int = 2000
    distill_batch: int = 256
    distill_lr: float = 1e-4
    guidance: float = 1.0  # the same CFG setting for every row: the conditional teacher, no guidance
    num_eval: int = 10000
    nfes: tuple[int, ...] = (1, 2, 4, 8)
    feature_steps: int = 2000
    seed: int = 0
    data_limit: int = 0  # 0 = all 60 000 training images
    tiny: bool = False
    student_compile: str = "auto"  # the students' TrainConfig.compile (the run of 2026-11-22: "no")
    #: the students' TrainConfig.compile_mode: "reduce-overhead" replays each step from CUDA graphs (2x faster for one
    #: process on an H200, BENCHMARKS §6.3, but every worker then keeps its graphs' memory)
    student_compile_mode: str = "default"
    #: the teacher's TrainConfig.compile_mode (one process: "reduce-overhead" is the fast one, BENCHMARKS §6.4)
    teacher_compile_mode: str = "default"

    @classmethod
    def dry_run(cls) -> BenchConfig:
        return cls(teacher_steps=30, teacher_batch=32, channels=(16, 32, 32), distill_steps=6, distill_batch=16,
                   num_eval=64, feature_steps=20, data_limit=512, tiny=True)


def data_spec(path: str, cfg: BenchConfig) -> str:
    return f"fashion-mnist:path={path},pad=32" + (f",limit={cfg.data_limit}" if cfg.data_limit else "")


def eval_inputs(cfg: BenchConfig, shape: tuple[int, ...], num_classes: int):
    """Exactly the noise and labels of ``rayflow sample --seed SEED --num N --labels cycle``."""
    g = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn(cfg.num_eval, *shape, generator=g)
    return noise, torch.arange(cfg.num_eval) % num_classes


def rows_path(run: Path, name: str) -> Path:
    return run / "rows" / f"{name}.json"


def save_rows(run: Path, name: str, rows: list[dict]) -> None:
    write_json_atomic(rows, rows_path(run, name))


def done(run: Path, name: str) -> bool:
    return rows_path(run, name).exists()


# ---------------------------------------------------------------------- parts
def part_teacher(run: Path, spec: str, cfg: BenchConfig, schedule: VPSchedule | None = None,
                 init_from: Path | None = None) -> None:
    """Train the teacher (DDPM's linear schedule unless ``schedule``: rayflow_readings.py's second teacher),
    from scratch or, with ``init_from``, fine-tuned from a saved teacher."""
    model = None if init_from is not None else ModelConfig(
        kind="unet", sample_shape=(1, 32, 32), num_classes=10, channels=cfg.channels,
        layers_per_block=cfg.layers_per_block)
    train = TrainConfig(max_steps=cfg.teacher_steps, batch_size=cfg.teacher_batch, lr=cfg.teacher_lr,
                        warmup_steps=min(500, cfg.teacher_steps // 10), ema_decay=0.9995, seed=cfg.seed,
                        checkpoint_every=2000, compile="auto", compile_mode=cfg.teacher_compile_mode,
                        mixed_precision="auto")
    t0 = time.time()
    train_teacher(spec, run / "teacher", train, model=model, schedule=schedule or VPSchedule.linear(),
                  label_dropout=0.1, init_from=init_from)
    log = [json.loads(line) for line in (run / "teacher" / "train_log.jsonl").read_text().splitlines()]
    write_json_atomic({"wall_seconds": round(time.time() - t0, 1), "final_loss": log[-1]["loss"],
                       "samples_per_s": cfg.teacher_steps * cfg.teacher_batch / max(log[-1]["time"], 1e-9)},
                      run / "rows" / "teacher_train.json")


def adopt(source: str, target: Path, files: tuple[str, ...]) -> None:
    """Copy a saved model directory (the committed teacher, a feature net) into the run instead of training it."""
    src = Path(source)
    missing = [f for f in files if not (src / f).is_file()]
    require(not missing, f"{src}: not a saved model directory (missing {', '.join(missing)})")
    target.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(src / f, target / f)


def adopt_feature_net(source: str, target: Path, check_only: bool = False) -> None:
    """Copy the feature network ``source`` into the run (``target``), or check that the run already holds it.

    A run whose rows were scored with another network is refused rather than mixed: its ``fd`` would mean two
    things. ``check_only`` (a report-only call, which scores nothing) does neither; the report lists the
    networks named in the rows.
    """
    if check_only:
        return
    src = Path(source)
    if not (target / FEATURE_NET_FILES[0]).exists():
        adopt(source, target, FEATURE_NET_FILES)
        return
    missing = [f for f in FEATURE_NET_FILES if not (src / f).is_file()]
    require(not missing, f"{src}: not a saved feature network (missing {', '.join(missing)})")
    require((target / FEATURE_NET_FILES[0]).read_bytes() == (src / FEATURE_NET_FILES[0]).read_bytes(),
            f"{target} holds another feature network than {src} (this run's rows were scored with it); "
            f"pass --feature-net{'-2' if target.name.endswith('-2') else ''} {target} to keep it, or use "
            "another --out")


def _scorer(run: Path, spec: str, cfg: BenchConfig, device: str) -> Scorer:
    scorer = Scorer.for_data(spec, run / "feature-net", feature_steps=cfg.feature_steps, seed=cfg.seed,
                             device=device)
    # Every row also gets fd_net2, the fd under an independently trained network (--feature-net-2, or trained here
    # once with another width, head and seed), and the report the Kendall tau between the two (issue 11's target).
    from rayflow.comparison import ensure_second_feature_net

    scorer.second_net = ensure_second_feature_net(load_dataset(spec, split="train"), run / "feature-net-2",
                                                  steps=cfg.feature_steps, seed=cfg.seed + 1, device=device)
    scorer.view = FD_VIEW
    return scorer


def _teacher_ddim50(run: Path, cfg: BenchConfig, device: str) -> torch.Tensor:
    teacher = load_generator(model=str(run / "teacher"), device=device)
    noise, labels = eval_inputs(cfg, teacher.sample_shape, teacher.num_classes)
    return teacher.generate(noise, 50, cond=labels, guidance=cfg.guidance, sampler="ddim", batch_size=2000)


def _reference(run: Path, cfg: BenchConfig, device: str) -> torch.Tensor:
    """The teacher's 50-step DDIM samples from the evaluation noise, the target of every row's fidelity.

    Regenerated from the teacher when missing, so a run directory may travel without this 41 MB file.
    """
    from safetensors.torch import load_file, save_file

    path = run / "reference_ddim50.safetensors"
    if not path.exists():
        save_file({"x": _teacher_ddim50(run, cfg, device).contiguous()}, str(path))
    return load_file(str(path))["x"]


def part_reference(run: Path, spec: str, cfg: BenchConfig, device: str) -> None:
    from safetensors.torch import save_file

    teacher = load_generator(model=str(run / "teacher"), device=device)
    scorer = _scorer(run, spec, cfg, device)
    noise, labels = eval_inputs(cfg, teacher.sample_shape, teacher.num_classes)
    rows = []
    for sampler, steps in (("ddim", 50), ("dpm++2m", 25)):
        t0 = time.perf_counter()
        x = teacher.generate(noise, steps, cond=labels, guidance=cfg.guidance, sampler=sampler, batch_size=2000)
        sec = (time.perf_counter() - t0) / cfg.num_eval
        if sampler == "ddim":
            save_file({"x": x.contiguous()}, str(run / "reference_ddim50.safetensors"))
        rows.append({"method": f"teacher {sampler}-{steps}", "nfe": steps, "steps": steps, "sampler": sampler,
                     **scorer.score(x, labels), "sec_per_sample": sec})
    save_rows(run, "reference", rows)


def part_samplers(run: Path, spec: str, cfg: BenchConfig, device: str) -> None:
    teacher = load_generator(model=str(run / "teacher"), device=device)
    scorer = _scorer(run, spec, cfg, device)
    noise, labels = eval_inputs(cfg, teacher.sample_shape, teacher.num_classes)
    rows = compare({s: (teacher, s) for s in ("ddim", "dpm++2m")}, list(cfg.nfes), noise, scorer, labels,
                   _reference(run, cfg, device), batch_size=2000)
    save_rows(run, "samplers", rows)


def seeded_name(name: str, seed: int, cfg: BenchConfig) -> str:
    """The row / student name of ``name`` trained with ``seed`` (the run's own seed keeps the plain name)."""
    return name if seed == cfg.seed else f"{name}@seed{seed}"


def part_methods(run: Path, spec: str, cfg: BenchConfig, device: str, names: list[str],
                 seeds: tuple[int, ...] = (), jobs: int = 1, worker_argv: list[str] | None = None,
                 threads: int = 2) -> None:
    """Distil and evaluate each variant, once per student seed (the evaluation noise is the same for all).

    With ``jobs > 1`` the variants run as that many worker processes of this script at once (see
    :func:`run_parallel`); otherwise one after another in this process.
    """
    units = [(base, seed) for seed in (seeds or (cfg.seed,)) for base in names]
    units = [u for u in units if not done(run, f"method-{seeded_name(u[0], u[1], cfg)}")] or units
    if jobs > 1 and len(units) > 1:
        _reference(run, cfg, device)  # once, before the workers, which all read it
        run_parallel(run, cfg, units, jobs, worker_argv or [], threads)
    else:
        part_methods_units(run, spec, cfg, device, units)


def part_methods_units(run: Path, spec: str, cfg: BenchConfig, device: str, units: list[tuple[str, int]]) -> None:
    """A worker's share of the methods part: these (variant, seed) units, in order."""
    scorer = _scorer(run, spec, cfg, device)
    ref = _reference(run, cfg, device)
    dataset = load_dataset(spec)
    for base, seed in units:
        _one_method(run, cfg, device, dataset, scorer, ref, base, seed)


def cache_key(base: str, seed: int, cfg: BenchConfig) -> str:
    """The pair / eps_mu cache directory a unit trains from (see :func:`_one_method`)."""
    method_name = {**VARIANTS, **variants()}[base][0]
    cache = SHARED_CACHE.get(base, base)
    return cache if method_name == "rayflow" else seeded_name(cache, seed, cfg)


def job_plan(units: list[tuple[str, int]], cfg: BenchConfig) -> list[tuple[tuple[str, int], tuple[str, int] | None]]:
    """One job per unit, with the unit it waits for: units that share a cache wait until its first unit (which
    builds it) has started training, so the cache is built once and the students still train side by side.
    Builders first, RayFlow's (the biggest teacher-side job) before the rest."""
    builders: dict[str, tuple[str, int]] = {}
    # the builder of a cache: the variant it is named after when that one runs (e.g. rayflow), else the first
    for base, seed in sorted(units, key=lambda u: (u[0] != cache_key(u[0], u[1], cfg), u[1])):
        builders.setdefault(cache_key(base, seed, cfg), (base, seed))
    plan = []
    for base, seed in units:
        builder = builders[cache_key(base, seed, cfg)]
        plan.append(((base, seed), None if builder == (base, seed) else builder))
    return sorted(plan, key=lambda p: (p[1] is not None, not p[0][0].startswith("rayflow")))


def _training_started(run: Path, unit: tuple[str, int], cfg: BenchConfig) -> bool:
    """Whether ``unit``'s student has begun training (its pool is then complete): its first log line exists."""
    return any((run / "students" / seeded_name(unit[0], unit[1], cfg)).rglob("train_log.jsonl"))


def run_parallel(run: Path, cfg: BenchConfig, units: list[tuple[str, int]], jobs: int, worker_argv: list[str],
                 threads: int, script: Path | None = None) -> None:
    """Run ``units`` as worker processes of this script, ``jobs`` at a time, each with ``threads`` CPU threads.

    Training a student of this size is bound by the host (Python, kernel launches), not by the GPU, so several
    students share one GPU well. A unit whose cache another unit builds starts once that one trains (see
    :func:`job_plan`). Each job's output goes to ``run/logs/methods-<unit>.log``; its wall seconds to
    ``rows/timing_methods.json``. A failed job is reported (the tail of its log) and the others go on; the part
    then fails, keeping every finished row. ``script``: the worker program (this file; tests pass a stand-in).
    """
    import subprocess

    plan = job_plan(units, cfg)
    logs = run / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TORCHINDUCTOR_COMPILE_THREADS": str(threads)}
    pending, running, failed, finished = list(plan), [], [], set()
    timing_path = run / "rows" / "timing_methods.json"
    timing = read_json(timing_path) if timing_path.exists() else {}
    timing.update(parallel_jobs=min(jobs, len(plan)), threads_per_job=threads)
    print(f"  {len(plan)} variant(s) as worker processes, {min(jobs, len(plan))} at a time, {threads} CPU threads "
          "each", flush=True)
    t_part = time.time()
    try:
        while pending or running:
            for item in list(pending):
                unit, after = item
                if len(running) >= jobs:
                    break
                if after is not None and after not in finished and not _training_started(run, after, cfg):
                    continue
                pending.remove(item)
                name = seeded_name(*unit, cfg)
                log = open(logs / f"methods-{name.replace('@', '_')}.log", "w")
                cmd = [sys.executable, str(script or Path(__file__).resolve()), *worker_argv, "--parts", "methods",
                       "--units", f"{unit[0]}:{unit[1]}", "--worker"]
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append((proc, unit, name, log, time.time()))
                print(f"  [{time.time() - t_part:5.0f} s] started {name}", flush=True)
            time.sleep(0.5)
            for item in list(running):
                proc, unit, name, log, t0 = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                finished.add(unit)
                log.close()
                seconds = round(time.time() - t0, 1)
                timing[name] = seconds
                write_json_atomic(timing, timing_path)
                if proc.returncode == 0:
                    print(f"  [{time.time() - t_part:5.0f} s] finished {name} in {seconds:.0f} s", flush=True)
                else:
                    failed.append(name)
                    tail = Path(log.name).read_text(errors="replace").strip().splitlines()[-15:]
                    print(f"  FAILED {name} (exit {proc.returncode}) after {seconds:.0f} s; last lines of {log.name}:",
                          flush=True)
                    for line in tail:
                        print(f"    {line}", flush=True)
    finally:  # interrupted (Ctrl-C, a timeout): the workers this part started stop with it
        for proc, *_ in running:
            proc.terminate()
    require(not failed, f"methods part: {len(failed)} job(s) failed ({', '.join(failed)}); their logs are in "
                        f"{logs}; finished rows are kept, run the part again to redo the rest")


def _one_method(run: Path, cfg: BenchConfig, device: str, dataset, scorer: Scorer | Callable[[], Scorer],
                ref: torch.Tensor | Callable[[], torch.Tensor], base: str, seed: int) -> None:
    """Distil one variant and score it. ``scorer`` and ``ref`` may be callables, called only after the
    distillation (rayflow_readings.py's workers: another process writes the reference meanwhile)."""
    name = seeded_name(base, seed, cfg)
    if done(run, f"method-{name}"):
        print(f"  {name}: already evaluated")
        return
    # the registry's rows, plus rows that companion scripts (rayflow_readings.py) add to VARIANTS
    method_name, options = {**VARIANTS, **variants()}[base]
    if cfg.tiny:
        options = {**options, **tiny_options().get(method_name, {})}
    method = get_method(method_name).from_options(options)
    student_dir = run / "students" / name
    # compile="auto": the student is compiled on a GPU (its graphs are the same for every method, so parallel
    # workers share Inductor's on-disk cache), not on a CPU
    train = TrainConfig(max_steps=cfg.distill_steps, batch_size=cfg.distill_batch, lr=cfg.distill_lr,
                        ema_decay=0.999, seed=seed, checkpoint_every=500, compile=cfg.student_compile,
                        compile_mode=cfg.student_compile_mode,
                        mixed_precision="auto")
    t0 = time.time()
    # RayFlow's eps_mu pool has its own seed (pool_seed), so every student seed shares it; the reflow family
    # draws its pairs from the training seed, so each further seed needs its own pair cache
    cache = SHARED_CACHE.get(base, base)
    if method_name != "rayflow":
        cache = seeded_name(cache, seed, cfg)
    distill(method, str(run / "teacher"), dataset, student_dir, train, guidance=cfg.guidance,
            cache_dir=run / "caches" / cache)
    wall = time.time() - t0
    release_compiled_state()  # the training's CUDA graphs, before this worker samples beside the others
    scorer = scorer() if callable(scorer) else scorer
    ref = ref() if callable(ref) else ref
    config = read_json(student_dir / "config.json")
    train_seconds = _train_seconds(student_dir)
    gen = load_generator(model=str(student_dir), device=device)
    noise, labels = eval_inputs(cfg, gen.sample_shape, gen.num_classes)
    keep: dict = {}
    extra = {name: {"teacher_nfe": config.get("teacher_nfe"), "distill_wall_s": round(wall, 1),
                    "train_samples_per_s": round(cfg.distill_steps * cfg.distill_batch / train_seconds, 1)}}
    t_eval = time.time()
    rows = compare({name: (gen, None)}, list(cfg.nfes), noise, scorer, labels, ref, batch_size=2000,
                   keep=keep, extra=extra)
    for row in rows:
        row["eval_wall_s"] = round(time.time() - t_eval, 1)  # the four NFEs' sampling and scoring together
    grid = {f"{name} {nfe} NFE": to_uint8_images(keep[(name, nfe)][:20]) for nfe in (1, 2, 4)
            if (name, nfe) in keep}
    save_grid_by_method(grid, run / "grids" / f"{name}.png")
    save_rows(run, f"method-{name}", rows)
    summary = ", ".join(f"{r['nfe']} NFE fd {r['fd']:.2f}" for r in rows)
    print(f"  {name}: {summary}")


def _train_seconds(student_dir: Path) -> float:
    """Seconds spent in student updates: every training stage's last logged time (ProReflow logs per stage)."""
    total = 0.0
    for log_path in student_dir.rglob("train_log.jsonl"):
        log = [json.loads(line) for line in log_path.read_text().splitlines() if line]
        total += log[-1]["time"] if log else 0.0
    return total or float("nan")


@torch.no_grad()
def part_speed(run: Path, cfg: BenchConfig, device: str) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    require(device.startswith("cuda"), "the speed part measures a GPU")
    teacher = load_generator(model=str(run / "teacher"), device=device)
    net = teacher.model.eval()
    shape = teacher.sample_shape

    def inputs(bs: int):
        return (torch.randn(bs, *shape, device=device), torch.full((bs,), 999.0, device=device),
                torch.arange(bs, device=device) % 10)

    with FlopCounterMode(display=False) as fc:
        net(*inputs(1))
    flops = fc.get_total_flops()
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    matmul_rate = 10 * 2 * 8192**3 / (time.perf_counter() - t0)

    def timed(fn, bs: int, iters: int) -> float:
        args = inputs(bs)
        for _ in range(3):
            fn(*args)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn(*args)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / iters

    def bf16(fn):
        def run_(*args):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return fn(*args)
        return run_

    def graphed(bs: int):
        args = inputs(bs)
        f = bf16(net)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                f(*args)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            f(*args)
        return lambda *_: g.replay()

    rows = []
    compiled = torch.compile(net)
    # torch.compile's "reduce-overhead" mode replays its fused kernels from CUDA graphs: both gains at once
    compiled_graphs = torch.compile(net, mode="reduce-overhead")
    for label, make in (("eager bf16", lambda bs: bf16(net)), ("torch.compile bf16", lambda bs: bf16(compiled)),
                        ("CUDA graph bf16", graphed),
                        ("torch.compile + CUDA graphs bf16", lambda bs: bf16(compiled_graphs))):
        for bs, iters in ((1, 200), (2048, 20)):
            sec = timed(make(bs), bs, iters)
            rows.append({"variant": label, "batch": bs, "sec_per_batch": sec, "images_per_s": bs / sec,
                         "latency_ms": sec * 1000})
    write_json_atomic({"flops_per_image": flops, "matmul_bf16_flops_per_s": matmul_rate,
                       "roofline_images_per_s": matmul_rate / flops, "rows": rows,
                       "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}, run / "rows" / "speed.json")


def write_seed_summary(rows: list[dict], results: Path) -> None:
    """Mean and sample std of FD over student seeds, for every variant trained with more than one seed."""
    groups: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        groups.setdefault((r["method"].split("@seed")[0], r["nfe"]), []).append(float(r["fd"]))
    bases = sorted({r["method"].split("@seed")[0] for r in rows if "@seed" in r["method"]})
    nfes = sorted({n for (b, n) in groups if b in bases})
    summary = []
    for b in bases:
        for n in nfes:
            v = torch.tensor(groups[(b, n)], dtype=torch.float64)
            summary.append({"method": b, "nfe": n, "seeds": len(v), "fd_mean": float(v.mean()),
                            "fd_std": float(v.std()) if len(v) > 1 else float("nan"), "fd": v.tolist()})
    write_json_atomic(summary, results / "fashion_mnist_seeds.json")
    lines = ["| method | seeds | " + " | ".join(f"FD @{n}" for n in nfes) + " |",
             "|---|---:|" + "---:|" * len(nfes)]
    for b in bases:
        cells = [f"{x['fd_mean']:.3f} ± {x['fd_std']:.3f}" for x in summary if x["method"] == b]
        lines.append(f"| {b} | {len(groups[(b, nfes[0])])} | " + " | ".join(cells) + " |")
    (results / "fashion_mnist_seeds.md").write_text("\n".join(lines) + "\n")


def part_report(run: Path, cfg: BenchConfig, results: Path) -> None:
    rows: list[dict] = []
    seeded = sorted(p.stem for p in (run / "rows").glob("method-*@seed*.json"))
    for name in ("reference", "samplers", *[f"method-{n}" for n in variants()], *seeded):
        if done(run, name):
            rows += json.loads(rows_path(run, name).read_text())
    require(rows, f"{run}/rows: nothing measured yet; run the other parts first")
    by_seed = [r for r in rows if "@seed" in r["method"]]
    rows_one_seed = [r for r in rows if "@seed" not in r["method"]]
    results.mkdir(parents=True, exist_ok=True)
    meta = {"config": dataclasses.asdict(cfg), "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}
    for extra in ("speed", "teacher_train", "timing", "timing_methods"):
        p = run / "rows" / f"{extra}.json"
        if p.exists():
            meta[extra] = json.loads(p.read_text())
    if "speed" in meta:  # the report may be drawn on another machine than the one that measured
        meta.update(gpu=meta["speed"]["gpu"], measured_with_torch=meta["speed"]["torch"])
    write_json_atomic(rows, results / "fashion_mnist.json")
    write_json_atomic(meta, results / "fashion_mnist_meta.json")
    write_results(rows, results, name="fashion_mnist_table")
    ref = next((r["fd"] for r in rows if r["method"] == "teacher ddim-50"), None)
    if by_seed:
        write_seed_summary(rows_one_seed + by_seed, results)
    curve = [r for r in rows_one_seed if r["nfe"] <= 8]
    both = [r for r in rows_one_seed if "fd" in r and "fd_net2" in r]
    if len(both) >= 2:  # do two independently trained feature nets rank the rows alike? (issue 11's target)
        from rayflow.metrics import kendall_tau

        meta["kendall_tau_fd_vs_fd_net2"] = kendall_tau([r["fd"] for r in both], [r["fd_net2"] for r in both])
        meta["kendall_tau_rows"] = len(both)
        print(f"Kendall tau between fd and fd_net2 over {len(both)} rows: {meta['kendall_tau_fd_vs_fd_net2']:.3f}")
    # which networks and view the fd columns are (rows of older runs: fd was another view of other networks)
    scored_with = sorted({(str(r.get("feature_net")), str(r.get("feature_net_2")), str(r.get("feature_view")))
                          for r in rows})
    meta["scored_with"] = [{"feature_net": a, "feature_net_2": b, "feature_view": v} for a, b, v in scored_with]
    if len(scored_with) > 1:
        print(f"warning: the rows were scored with {len(scored_with)} different networks/views: {scored_with}")
    write_json_atomic(meta, results / "fashion_mnist_meta.json")
    # fd: FD of the early view (the default since issue 11); fd_multilayer and fd_classifier: the earlier defaults
    for metric in ("fd", "fd_net2", "fd_multilayer", "fd_classifier", "kid", "accuracy", "fidelity"):
        if not any(metric in r for r in curve):
            continue  # rows scored before the column existed
        plot_metric_vs_nfe(curve, metric, results / f"fashion_mnist_{metric}.png",
                           title=f"Fashion-MNIST: {metric} against NFE",
                           reference=("teacher, 50 DDIM steps", ref) if metric == "fd" and ref else None,
                           log_y=metric in ("fd", "fd_net2", "fd_multilayer", "fd_classifier", "kid"))
    for grid in sorted((run / "grids").glob("*.png")):
        if "@seed" not in grid.stem:  # one grid per variant is enough to look at
            shutil.copyfile(grid, results / f"fashion_mnist_grid_{grid.stem}.png")
    # the learned Time Sampler's density: its own variant since uniform t became RayFlow's default (issue #14);
    # runs from before then learned it in the plain "rayflow" variant
    sampler_plot = next((p for p in (run / "students" / name / "time_sampler.png"
                                     for name in ("rayflow-learned-time-sampler", "rayflow")) if p.exists()), None)
    if sampler_plot is not None:
        shutil.copyfile(sampler_plot, results / "fashion_mnist_time_sampler.png")
    print("regenerate any row's samples with:")
    print(f"  teacher rows: rayflow sample --model {run}/teacher --sampler SAMPLER --steps N --num {cfg.num_eval} "
          f"--seed {cfg.seed} --out row.npz")
    print(f"  method rows:  rayflow sample --model {run}/students/NAME --steps N --num {cfg.num_eval} "
          f"--seed {cfg.seed} --out row.npz")


# ---------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "fashion-mnist"))
    p.add_argument("--out", default="runs/bench-fashion-mnist")
    p.add_argument("--parts", default="all", help=f"comma-separated subset of {', '.join(PARTS)} (default all)")
    p.add_argument("--methods", default=",".join(ISSUE_VARIANTS),
                   help=f"variants for the methods part (default: the issue's seven; all: {', '.join(variants())})")
    p.add_argument("--seeds", default="",
                   help="student seeds for the methods part, e.g. 0,1,2 (default: the run's seed); other seeds' rows "
                        "are named VARIANT@seedN and summarised as mean ± std by the report")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--tiny", action="store_true", help="a tiny configuration, to check the script end to end")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (only sensible with --tiny)")
    p.add_argument("--teacher", default=None,
                   help="reuse this teacher directory (e.g. benchmarks/checkpoints/fashion-mnist-teacher) "
                        "instead of training one")
    p.add_argument("--feature-net", default=str(FEATURE_NET),
                   help="the feature network of fd/kid/accuracy, copied into the run (default: the committed "
                        "autoencoder-trained network); 'train': train one in the run (autoencoder term, "
                        "feature_steps)")
    p.add_argument("--feature-net-2", default=str(FEATURE_NET_2),
                   help="the second, independently trained network of fd_net2 (default: the committed one, width 24, "
                        "64-d, another seed); 'train': train one in the run (width 24, 64-d, seed+1); the report "
                        "writes the Kendall tau between fd and fd_net2")
    p.add_argument("--teacher-steps", type=int, default=None)
    p.add_argument("--distill-steps", type=int, default=None)
    p.add_argument("--student-compile-mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode of the students (default: default; reduce-overhead = CUDA graphs)")
    p.add_argument("--teacher-compile-mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode of the teacher's training (default: default; reduce-overhead: graphs)")
    p.add_argument("--jobs", type=int, default=1,
                   help="run the methods part as this many worker processes at once, one per variant (one "
                        "H200: 7 for the seven)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each methods worker (with --jobs > 1)")
    p.add_argument("--units", default="", help=argparse.SUPPRESS)  # a worker's variants: NAME:SEED,...
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        cfg = BenchConfig.dry_run() if args.tiny else BenchConfig()
        if args.teacher_steps is not None:
            cfg.teacher_steps = args.teacher_steps
        if args.distill_steps is not None:
            cfg.distill_steps = args.distill_steps
        if args.student_compile_mode is not None:
            cfg.student_compile_mode = args.student_compile_mode
        if args.teacher_compile_mode is not None:
            cfg.teacher_compile_mode = args.teacher_compile_mode
        parts = PARTS if args.parts == "all" else tuple(x.strip() for x in args.parts.split(","))
        unknown = sorted(set(parts) - set(PARTS))
        require(not unknown, f"--parts: unknown part(s) {unknown}; expected {', '.join(PARTS)}")
        try:
            seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip())
        except ValueError:
            raise RayflowError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
        bad = sorted(set(names) - set(variants()))
        require(not bad, f"--methods: unknown variant(s) {bad}; expected {', '.join(variants())}")
        require(args.jobs >= 1 and args.threads >= 1, "--jobs and --threads must be >= 1")
        units = [(u.split(":")[0], int(u.split(":")[1])) for u in args.units.split(",") if u.strip()]
        require(all(b in variants() for b, _ in units), f"--units {args.units!r}: unknown variant")
        if args.worker:
            torch.set_num_threads(args.threads)
        require(Path(args.data).is_dir(), f"--data {args.data}: no such directory (the Fashion-MNIST IDX files)")
        gpu = torch.cuda.is_available()
        require(gpu or args.allow_cpu or parts == ("report",),
                "no GPU found: this benchmark is sized for one H200 (use --tiny --allow-cpu for a dry run)")
        device = "cuda" if gpu else "cpu"
        if gpu:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        spec = data_spec(args.data, cfg)
        load_dataset(spec, split="test")  # refuse a wrong path before any work
        run = Path(args.out)
        run.mkdir(parents=True, exist_ok=True)
        cfg_path = run / "bench_config.json"
        if cfg_path.exists():
            old = read_json(cfg_path)
            require(old == json.loads(json.dumps(dataclasses.asdict(cfg))),
                    f"{cfg_path}: this run directory was made with another configuration; use another --out")
        else:
            write_json_atomic(dataclasses.asdict(cfg), cfg_path)
        if args.teacher and not (run / "teacher" / "model.safetensors").exists():
            adopt(args.teacher, run / "teacher", ("model.safetensors", "config.json"))
            write_json_atomic({"reused": args.teacher}, run / "rows" / "teacher_train.json")
        for given, target in ((args.feature_net, run / "feature-net"), (args.feature_net_2, run / "feature-net-2")):
            if given != "train":
                adopt_feature_net(given, target, check_only=parts == ("report",))
        for part in PARTS:
            if part not in parts:
                continue
            t0 = time.time()
            print(f"== {part}", flush=True)
            if part == "teacher" and not done(run, "teacher_train"):
                part_teacher(run, spec, cfg)
            elif part == "reference" and not done(run, "reference"):
                part_reference(run, spec, cfg, device)
            elif part == "samplers" and not done(run, "samplers"):
                part_samplers(run, spec, cfg, device)
            elif part == "methods" and units:  # a worker of run_parallel
                part_methods_units(run, spec, cfg, device, units)
            elif part == "methods":
                worker_argv = ["--data", args.data, "--out", str(run), "--teacher-steps", str(cfg.teacher_steps),
                               "--distill-steps", str(cfg.distill_steps), "--threads", str(args.threads),
                               "--student-compile-mode", cfg.student_compile_mode,
                               "--teacher-compile-mode", cfg.teacher_compile_mode,
                               *(["--tiny"] if args.tiny else []), *(["--allow-cpu"] if args.allow_cpu else [])]
                part_methods(run, spec, cfg, device, names, seeds, jobs=args.jobs, worker_argv=worker_argv,
                             threads=args.threads)
            elif part == "speed" and gpu and not (run / "rows" / "speed.json").exists():
                part_speed(run, cfg, device)
            elif part == "report":
                part_report(run, cfg, Path(args.results))
            seconds = time.time() - t0
            print(f"== {part} done in {seconds:.0f} s", flush=True)
            if part != "report" and not args.worker:  # wall seconds per part, summed over resumed calls
                timing_path = run / "rows" / "timing.json"
                timing = read_json(timing_path) if timing_path.exists() else {}
                timing[part] = round(timing.get(part, 0.0) + seconds, 1)
                write_json_atomic(timing, timing_path)
        if not args.worker and (run / "rows" / "timing.json").exists():
            timing = read_json(run / "rows" / "timing.json")
            print("== wall seconds per part (all calls): " + ", ".join(f"{k} {v:.0f}" for k, v in timing.items())
                  + f"; total {sum(timing.values()):.0f}", flush=True)
    except RayflowError as exc:
        print(f"fashion_mnist: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
