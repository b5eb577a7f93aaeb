#!/usr/bin/env python
"""Issue #14: RayFlow's readings of eps_mu against 2-RF, Rectified Diffusion and PeRFlow on two Fashion-MNIST teachers.

    python benchmarks/rayflow_readings.py --data FASHION_MNIST_DIR --out runs/readings            # every part
    python benchmarks/rayflow_readings.py ... --parts teacher-sd                                  # one part
    python benchmarks/rayflow_readings.py ... --parts students --readings start,reflow --seeds 0,1,2 --steps 2000
    python benchmarks/rayflow_readings.py ... --parts report
    python benchmarks/rayflow_readings.py --tiny --allow-cpu --data DIR --out /tmp/r              # CPU dry run

Teachers (``--teachers``): ``linear`` = the committed ``benchmarks/checkpoints/fashion-mnist-teacher`` (DDPM's
linear schedule, ``a_T = 0.0064``); ``sd`` = the same network trained here on Stable Diffusion's scaled-linear
schedule (``a_T = 0.068``). Both are scored by the committed feature net with the benchmark's own scoring path
(:class:`rayflow.comparison.Scorer`, so the project's default metric), against the 10 000 test images.

Parts (each resumes; what is done is skipped; each is sized for at most 10 minutes on one H200):

* ``teacher-sd``  trains the scaled-linear teacher with ``benchmarks/fashion_mnist.py``'s recipe (8000 steps).
* ``reference``   each teacher's 50-step DDIM and 25-step DPM-Solver++ rows (the targets' denominators).
* ``students``    every (teacher, reading, seed) student at one budget (``--steps`` updates of batch 256, the
  same for every reading and peer), then scored at 1, 2, 4, 8 NFE. ``--jobs`` students run as parallel
  processes on the one GPU with ``--threads`` CPU threads each (the trainer is CPU-bound); the first seed of
  each reading runs before its other seeds, which then reuse its eps_mu / pair pool (the pools do not depend
  on the student seed). Interrupted: run it again; finished students are kept.
* ``report``      ``benchmarks/results/rayflow_readings.json`` (rows ``reading, teacher, seed, nfe, fd, kid,
  accuracy, teacher_nfe`` and the scorer's other columns), ``rayflow_readings.md`` (mean ± std over seeds, the
  ratio to the teacher's 50-step DDIM FD, the paired seed difference of the Time Sampler), FD-against-NFE
  plots per teacher and per reading, and the learned Time Sampler's density per teacher.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def _load_fashion_mnist():
    """benchmarks/fashion_mnist.py as a module: its teacher recipe, scorer, references and student loop."""
    name = "bench_fashion_mnist"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "fashion_mnist.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fm = _load_fashion_mnist()

from rayflow.checkpoint import read_json, write_json_atomic  # noqa: E402
from rayflow.data import load_dataset  # noqa: E402
from rayflow.errors import RayflowError, require  # noqa: E402
from rayflow.evaluation import plot_metric_vs_nfe  # noqa: E402
from rayflow.schedules import VPSchedule  # noqa: E402

#: reading name -> (method, options). RayFlow rows are issue #14's readings (methods/rayflow/readings.py);
#: the peers keep their defaults. "-uniform-t" rows pair with their learned-Time-Sampler row, seed by seed.
READINGS: dict[str, tuple[str, dict[str, str]]] = {
    "average": ("rayflow", {}),  # K = 8 points a_k x0 + s_k eps (the reconstruction; the default before #14)
    "trajectory": ("rayflow", {"eps_mu_reading": "trajectory"}),
    "start": ("rayflow", {"eps_mu_reading": "start"}),
    "trajectory-consistency": ("rayflow", {"eps_mu_reading": "trajectory", "consistency_weight": "1"}),
    "start-consistency": ("rayflow", {"eps_mu_reading": "start", "consistency_weight": "1"}),
    "start-sigma": ("rayflow", {"eps_mu_reading": "start", "sigma": "0.05"}),
    "average-uniform-t": ("rayflow", {"time_sampler": "uniform"}),
    "trajectory-uniform-t": ("rayflow", {"eps_mu_reading": "trajectory", "time_sampler": "uniform"}),
    "start-uniform-t": ("rayflow", {"eps_mu_reading": "start", "time_sampler": "uniform"}),
    "start-no-reweight": ("rayflow", {"eps_mu_reading": "start", "reweight": "false"}),
    "start-conditioned-t": ("rayflow", {"eps_mu_reading": "start", "time_sampler_features": "true"}),
    "reflow": ("reflow", {}),
    "rectified-diffusion": ("rectified-diffusion", {}),
    "perflow": ("perflow", {}),
}
#: rows whose pools equal another row's (only the student's loss or time sampling differs) share its cache
SHARED_POOL = {"start-sigma": "start", "average-uniform-t": "average", "trajectory-uniform-t": "trajectory",
               "start-uniform-t": "start", "start-no-reweight": "start", "start-conditioned-t": "start"}
#: the default selection, chosen by the CPU screen (docs/rayflow.md §5.1): the best reading there (trajectory) with
#: its uniform-t pair for the Time Sampler's paired difference, the start-consistent reading, and the strongest peer
DEFAULT_READINGS = ("trajectory", "trajectory-uniform-t", "start", "reflow")
TEACHERS = ("linear", "sd")
PARTS = ("teacher-sd", "reference", "students", "report")
PREFIX = "rr-"  # the readings' names inside fashion_mnist.VARIANTS (so they never clash with its own)


def _register() -> None:
    """Add the readings to fashion_mnist's variant table, so its student loop (``_one_method``) runs them."""
    for name, (method, opts) in READINGS.items():
        fm.VARIANTS[PREFIX + name] = (method, opts)
        fm.SHARED_CACHE[PREFIX + name] = PREFIX + SHARED_POOL.get(name, name)


def teacher_run(out: Path, teacher: str) -> Path:
    """One fashion_mnist-style run directory per teacher: teacher/, feature-net/, rows/, students/, caches/."""
    return out / teacher


def _config(args: argparse.Namespace):
    cfg = fm.BenchConfig.dry_run() if args.tiny else fm.BenchConfig()
    if args.steps is not None:
        cfg.distill_steps = int(args.steps)
    if args.teacher_steps is not None:
        cfg.teacher_steps = int(args.teacher_steps)
    return cfg


# ---------------------------------------------------------------------- parts
def part_teacher_sd(out: Path, spec: str, cfg) -> None:
    run = teacher_run(out, "sd")
    if fm.done(run, "teacher_train"):
        print("  sd teacher: already trained")
        return
    fm.part_teacher(run, spec, cfg, schedule=VPSchedule.scaled_linear())


def part_reference(out: Path, spec: str, cfg, device: str, teachers: list[str]) -> None:
    for t in teachers:
        run = teacher_run(out, t)
        require((run / "teacher" / "model.safetensors").exists(),
                f"{run}/teacher: no teacher yet (run --parts teacher-sd first, or give --teacher for linear)")
        if not fm.done(run, "reference"):
            fm.part_reference(run, spec, cfg, device)


def _job_name(reading: str, seed: int, cfg) -> str:
    """fashion_mnist's row name: ``rr-READING`` for the run's own seed (0), ``rr-READING@seedN`` otherwise."""
    return fm.seeded_name(PREFIX + reading, seed, cfg)


def run_job(out: Path, spec: str, cfg, device: str, teacher: str, reading: str, seed: int) -> None:
    """One student: distil with fashion_mnist's loop and score it (rows/method-rr-READING@seedN.json)."""
    _register()
    run = teacher_run(out, teacher)
    if fm.done(run, f"method-{_job_name(reading, seed, cfg)}"):
        return
    scorer = fm._scorer(run, spec, cfg, device)
    ref = fm._reference(run, cfg, device)
    fm._one_method(run, cfg, device, load_dataset(spec), scorer, ref, PREFIX + reading, seed)


def part_students(out: Path, spec: str, cfg, device: str, args: argparse.Namespace, teachers: list[str],
                  readings: list[str], seeds: list[int]) -> None:
    """Every (teacher, reading, seed) student; the first seed of a reading first (it builds the shared pool)."""
    for t in teachers:
        require((teacher_run(out, t) / "teacher" / "model.safetensors").exists(),
                f"{teacher_run(out, t)}/teacher: no teacher yet (run --parts teacher-sd first)")
        fm._scorer(teacher_run(out, t), spec, cfg, device)  # once, before the workers need them
        fm._reference(teacher_run(out, t), cfg, device)
    todo = [(t, r, s) for t in teachers for r in readings for s in seeds
            if not fm.done(teacher_run(out, t), f"method-{_job_name(r, s, cfg)}")]
    first = {}
    for t, r, s in todo:
        first.setdefault((t, SHARED_POOL.get(r, r)), (t, r, s))
    waves = [[j for j in todo if first[(j[0], SHARED_POOL.get(j[1], j[1]))] == j],
             [j for j in todo if first[(j[0], SHARED_POOL.get(j[1], j[1]))] != j]]
    for wave in waves:
        if args.jobs <= 1:
            for t, r, s in wave:
                run_job(out, spec, cfg, device, t, r, s)
                print(f"  {t} {r} seed {s}: done", flush=True)
            continue
        _run_parallel(wave, args)


def _run_parallel(wave: list[tuple[str, str, int]], args: argparse.Namespace) -> None:
    """``args.jobs`` worker processes at a time, each with ``args.threads`` CPU threads, sharing the GPU."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TQDM_DISABLE": "1"}
    base = [sys.executable, str(Path(__file__).resolve()), "--data", args.data, "--out", args.out,
            "--threads", str(args.threads)] + (["--tiny"] if args.tiny else []) + \
        (["--allow-cpu"] if args.allow_cpu else []) + ([] if args.steps is None else ["--steps", str(args.steps)]) + \
        ([] if args.teacher_steps is None else ["--teacher-steps", str(args.teacher_steps)])
    pending, running, failed = list(wave), [], []
    while pending or running:
        while pending and len(running) < args.jobs:
            t, r, s = pending.pop(0)
            log = Path(args.out) / "logs" / f"{t}-{r}-seed{s}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            fh = log.open("a")
            running.append(((t, r, s), subprocess.Popen([*base, "--job", f"{t}:{r}:{s}"], env=env, stdout=fh,
                                                         stderr=subprocess.STDOUT), fh))
        time.sleep(1.0)
        for item in list(running):
            job, proc, fh = item
            if proc.poll() is not None:
                fh.close()
                running.remove(item)
                print(f"  {job[0]} {job[1]} seed {job[2]}: " + ("done" if proc.returncode == 0 else
                                                                 f"FAILED (exit {proc.returncode})"), flush=True)
                if proc.returncode != 0:
                    failed.append(job)
    require(not failed, f"{len(failed)} student(s) failed: {failed}; see {args.out}/logs (rerun to resume)")


# ---------------------------------------------------------------------- report
def collect_rows(out: Path, teachers: list[str], run_seed: int = 0) -> list[dict]:
    """The result rows: every student's rows (reading, teacher, seed, nfe, metrics, teacher_nfe) and each
    teacher's reference rows (reading ``teacher ddim-50`` / ``teacher dpm++2m-25``, seed None)."""
    rows: list[dict] = []
    for t in teachers:
        run = teacher_run(out, t)
        if fm.done(run, "reference"):
            for r in json.loads(fm.rows_path(run, "reference").read_text()):
                rows.append({"reading": r["method"], "teacher": t, "seed": None, **_metrics(r)})
        for path in sorted((run / "rows").glob(f"method-{PREFIX}*.json")):
            for r in json.loads(path.read_text()):
                name, _, seed = r["method"][len(PREFIX):].partition("@seed")
                rows.append({"reading": name, "teacher": t, "seed": int(seed) if seed else run_seed, **_metrics(r)})
    return rows


def _metrics(r: dict) -> dict:
    keep = {k: v for k, v in r.items() if k not in ("method", "sampler", "steps")}
    keep.setdefault("teacher_nfe", None)
    return keep


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def summarise(rows: list[dict]) -> str:
    """Markdown: FD mean ± std over seeds per (teacher, reading, NFE), the ratio of the best reading to the
    teacher's 50-step DDIM FD, and the Time Sampler's paired seed difference (``X-uniform-t`` minus ``X``)."""
    lines = ["# RayFlow readings (issue #14)", ""]
    for t in sorted({r["teacher"] for r in rows}):
        trows = [r for r in rows if r["teacher"] == t]
        ref = next((r["fd"] for r in trows if r["reading"] == "teacher ddim-50"), None)
        nfes = sorted({r["nfe"] for r in trows if r["seed"] is not None})
        readings = list(dict.fromkeys(r["reading"] for r in trows if r["seed"] is not None))
        lines += [f"## teacher `{t}`" + (f" (50-step DDIM FD {ref:.3f})" if ref is not None else ""), "",
                  "| reading | seeds | " + " | ".join(f"FD @{n}" for n in nfes) + " | teacher NFE |",
                  "|---|---:|" + "---:|" * len(nfes) + "---:|"]
        for name in readings:
            cells, n_seeds, tnfe = [], 0, None
            for n in nfes:
                v = [r["fd"] for r in trows if r["reading"] == name and r["nfe"] == n]
                if not v:
                    cells.append("–")
                    continue
                m, s = _mean_std(v)
                n_seeds = len(v)
                spread = f" ± {s:.3f}" if len(v) > 1 else ""  # one seed has no spread to show
                cells.append(f"{m:.3f}{spread}" + (f" ({m / ref:.2f}×)" if ref else ""))
                tnfe = next(r["teacher_nfe"] for r in trows if r["reading"] == name)
            lines.append(f"| {name} | {n_seeds} | " + " | ".join(cells) + f" | {tnfe} |")
        pairs = [(n[: -len("-uniform-t")], n) for n in readings if n.endswith("-uniform-t")
                 and n[: -len("-uniform-t")] in readings]
        for learned, uniform in pairs:
            lines += ["", f"Time Sampler, paired over seeds: FD({uniform}) − FD({learned}) (> 0: the learned "
                      "sampler helps)", ""]
            for n in nfes:
                by = {(r["reading"], r["seed"]): r["fd"] for r in trows if r["nfe"] == n}
                diffs = [by[(uniform, s)] - by[(learned, s)] for (name, s) in list(by) if name == learned
                         and (uniform, s) in by]
                if diffs:
                    m, s = _mean_std(diffs)
                    lines.append(f"- {n} NFE: {m:+.4f} ± {s:.4f} over {len(diffs)} seed(s): "
                                 + ", ".join(f"{d:+.4f}" for d in diffs))
        lines.append("")
    return "\n".join(lines)


def plot_time_sampler(out: Path, teachers: list[str], readings: list[str], path: Path) -> bool:
    """The learned Time Sampler's final density (first seed of each learned-sampler reading) per teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(teachers), figsize=(5 * len(teachers), 3.5), squeeze=False)
    drawn = False
    for ax, t in zip(axes[0], teachers):
        for student in sorted((teacher_run(out, t) / "students").glob(f"{PREFIX}*")):
            log = student / "time_sampler.json"
            if not log.exists() or student.name.partition("@seed")[0][len(PREFIX):] not in readings:
                continue
            data = read_json(log)
            if data.get("sampler") != "learned" or not data.get("snapshots"):
                continue
            probs = data["snapshots"][-1]["probs"]
            grid = [(i + 0.5) * data["num_timesteps"] / len(probs) for i in range(len(probs))]
            ax.plot(grid, probs, label=student.name[len(PREFIX):])
            drawn = True
        ax.set_title(f"teacher {t}: learned T_theta (last snapshot)")
        ax.set_xlabel("timestep t")
        ax.set_ylabel("probability per bin")
        ax.legend(fontsize=6)
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def part_report(out: Path, teachers: list[str], results: Path, run_seed: int = 0) -> None:
    rows = collect_rows(out, teachers, run_seed)
    require(any(r["seed"] is not None for r in rows), f"{out}: no student measured yet; run --parts students")
    results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(rows, results / "rayflow_readings.json")
    (results / "rayflow_readings.md").write_text(summarise(rows))
    readings = list(dict.fromkeys(r["reading"] for r in rows if r["seed"] is not None))
    for t in teachers:
        trows = [r for r in rows if r["teacher"] == t]
        ref = next((r["fd"] for r in trows if r["reading"] == "teacher ddim-50"), None)
        means = []
        for name in readings:
            for n in sorted({r["nfe"] for r in trows if r["reading"] == name}):
                v = [r["fd"] for r in trows if r["reading"] == name and r["nfe"] == n]
                means.append({"method": name, "nfe": n, "fd": statistics.fmean(v)})
        if means:
            plot_metric_vs_nfe(means, "fd", results / f"rayflow_readings_fd_{t}.png",
                               title=f"teacher {t}: FD against NFE (mean over seeds)",
                               reference=("teacher, 50 DDIM steps", ref) if ref else None, log_y=True)
    for name in readings:  # one plot per reading: its seeds on both teachers
        per = [{"method": f"{r['teacher']} seed {r['seed']}", "nfe": r["nfe"], "fd": r["fd"]}
               for r in rows if r["reading"] == name]
        plot_metric_vs_nfe(per, "fd", results / f"rayflow_readings_fd_{name}.png", title=f"{name}: FD against NFE",
                           log_y=True)
    plot_time_sampler(out, teachers, readings, results / "rayflow_readings_time_sampler.png")
    print((results / "rayflow_readings.md").read_text())


# ---------------------------------------------------------------------- entry point
def _list(text: str, allowed, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = sorted(set(items) - set(allowed))
    require(items and not bad, f"--{what}: unknown {what} {bad}; expected some of {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "fashion-mnist"))
    p.add_argument("--out", default="runs/rayflow-readings")
    p.add_argument("--parts", default="all", help=f"comma-separated subset of {', '.join(PARTS)} (default all)")
    p.add_argument("--teachers", default=",".join(TEACHERS))
    p.add_argument("--readings", default=",".join(DEFAULT_READINGS), help=f"some of {', '.join(READINGS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=None, help="student updates, shared by every row (default 2000)")
    p.add_argument("--teacher-steps", type=int, default=None, help="sd teacher updates (default 8000, as linear's)")
    p.add_argument("--jobs", type=int, default=8, help="students trained at once (processes sharing the GPU)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per student process")
    p.add_argument("--teacher", default=str(REPO / "benchmarks" / "checkpoints" / "fashion-mnist-teacher"),
                   help="the linear-schedule teacher (default: the committed one; ignored with --tiny)")
    p.add_argument("--feature-net", default=str(REPO / "benchmarks" / "checkpoints" / "fashion-mnist-feature-net"),
                   help="the feature classifier of the scores (default: the committed one; ignored with --tiny)")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--tiny", action="store_true", help="a tiny configuration, to check the script end to end")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (only sensible with --tiny)")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # TEACHER:READING:SEED, a worker process
    args = p.parse_args(argv)
    try:
        cfg = _config(args)
        parts = PARTS if args.parts == "all" else tuple(_list(args.parts, PARTS, "parts"))
        teachers = _list(args.teachers, TEACHERS, "teachers")
        readings = _list(args.readings, READINGS, "readings")
        try:
            seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            raise RayflowError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
        require(seeds, "--seeds: give at least one seed")
        require(cfg.distill_steps >= 1, f"--steps must be >= 1, got {cfg.distill_steps}")
        require(args.jobs >= 1 and args.threads >= 1, "--jobs and --threads must be >= 1")
        require(Path(args.data).is_dir(), f"--data {args.data}: no such directory (the Fashion-MNIST IDX files)")
        gpu = torch.cuda.is_available()
        require(gpu or (args.allow_cpu and args.tiny) or parts == ("report",),
                "no GPU found: this benchmark is sized for one H200 (use --tiny --allow-cpu for a dry run)")
        device = "cuda" if gpu else "cpu"
        torch.set_num_threads(args.threads if args.job else max(1, torch.get_num_threads()))
        if gpu:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        spec = fm.data_spec(args.data, cfg)
        out = Path(args.out)
        if args.job:  # a worker: one student, then exit
            t, r, s = args.job.split(":")
            run_job(out, spec, cfg, device, t, r, int(s))
            return 0
        report_only = parts == ("report",)  # the report reads rows only: no data, teacher or GPU needed
        if not report_only:
            load_dataset(spec, split="test")  # refuse a wrong path before any work
        out.mkdir(parents=True, exist_ok=True)
        cfg_path = out / "bench_config.json"
        cfg_now = json.loads(json.dumps(cfg.__dict__))
        if cfg_path.exists():
            require(read_json(cfg_path) == cfg_now,
                    f"{cfg_path}: this run directory was made with another configuration (--steps, --tiny); "
                    "use another --out")
        else:
            write_json_atomic(cfg_now, cfg_path)
        for t in [] if report_only else teachers:
            run = teacher_run(out, t)
            if not args.tiny:  # the committed feature net scores both teachers; the committed teacher is `linear`
                if not (run / "feature-net" / "feature_net.safetensors").exists():
                    fm.adopt(args.feature_net, run / "feature-net", ("feature_net.safetensors", "feature_net.json"))
                if t == "linear" and not (run / "teacher" / "model.safetensors").exists():
                    fm.adopt(args.teacher, run / "teacher", ("model.safetensors", "config.json"))
                    write_json_atomic({"reused": args.teacher}, run / "rows" / "teacher_train.json")
            elif t == "linear" and not fm.done(run, "teacher_train"):
                fm.part_teacher(run, spec, cfg)  # --tiny: a tiny linear teacher too
        for part in PARTS:
            if part not in parts:
                continue
            t0 = time.time()
            print(f"== {part}", flush=True)
            if part == "teacher-sd" and "sd" in teachers:
                part_teacher_sd(out, spec, cfg)
            elif part == "reference":
                part_reference(out, spec, cfg, device, teachers)
            elif part == "students":
                part_students(out, spec, cfg, device, args, teachers, readings, seeds)
            elif part == "report":
                part_report(out, teachers, Path(args.results), cfg.seed)
            seconds = time.time() - t0
            print(f"== {part} done in {seconds:.0f} s", flush=True)
            if part != "report":
                timing_path = out / "timing.json"
                timing = read_json(timing_path) if timing_path.exists() else {}
                timing[part] = round(timing.get(part, 0.0) + seconds, 1)
                write_json_atomic(timing, timing_path)
    except RayflowError as exc:
        print(f"rayflow_readings: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
