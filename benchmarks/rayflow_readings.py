#!/usr/bin/env python
"""Issue #14: RayFlow's readings of eps_mu against 2-RF, Rectified Diffusion and PeRFlow on two Fashion-MNIST teachers.

    python benchmarks/rayflow_readings.py --data FASHION_MNIST_DIR --out runs/readings --results DIR \
        --rows linear:reflow:1,linear:start:1,sd:start:0 --jobs 4 --budget-s 440 --pack $OUT    # one GPU call
    python benchmarks/rayflow_readings.py ... --readings start,reflow --seeds 0,1,2               # a cross product
    python benchmarks/rayflow_readings.py ... --parts report --merge benchmarks/results/rayflow_readings.json
    python benchmarks/rayflow_readings.py --tiny --allow-cpu --data DIR --out /tmp/r              # CPU dry run

Teachers (``--teachers``): ``linear`` = the committed ``benchmarks/checkpoints/fashion-mnist-teacher`` (DDPM's
linear schedule, ``a_T = 0.0064``); ``sd`` = the same network on Stable Diffusion's scaled-linear schedule
(``a_T = 0.068``), fine-tuned here from the linear teacher for 2000 updates (``--sd-init linear``, the default:
a quarter of a from-scratch teacher's cost, so it fits beside the students) or trained from scratch for 8000
(``--sd-init scratch``); ``--sd-teacher DIR`` reuses one from an earlier call. Both are scored by the committed
feature net with the benchmark's own scoring path (:class:`rayflow.comparison.Scorer`), against the 10 000 test
images; ``fd`` is rayflow's default (the early view of the committed autoencoder pair, ``fd_net2`` under its second
network) unless ``--fd-view multilayer`` asks for the view section 7 was measured with.

One command runs every part as a graph of worker processes on the GPU(s) (``--jobs`` long ones at a time, over
``--gpus``): the sd teacher (part ``teacher-sd``), each teacher's 50-step DDIM and 25-step DPM-Solver++ rows
(``reference``; the targets' denominators), each RayFlow reading's eps_mu pool (built once, shared by its seeds
and by the rows that differ only in training, while other students run), and every student (``students``: one
row ``TEACHER:READING:SEED`` of ``--rows``, in that priority order, at one budget of ``--steps`` updates of batch
256 shared by every reading and peer, scored at 1, 2, 4, 8 NFE). A student waits for its teacher's reference
only to score. ``--budget-s`` bounds the call: a long job starts only while its estimate (``--student-s``,
``--teacher-s``) fits, and what still runs at the budget is stopped; every finished student has written its rows.
Run again to resume (finished jobs are skipped); ``OUT/jobs.json`` says what each job came to.

The ``report`` part writes ``rayflow_readings.json`` (rows ``reading, teacher, seed, nfe, fd, kid, accuracy,
teacher_nfe`` and the scorer's other columns; with ``--merge``, an earlier call's rows that this run does not
measure again are kept, so seeds of several calls are summarised together), ``rayflow_readings.md`` (mean ± std
over seeds, the ratio to the teacher's 50-step DDIM FD, the paired seed difference of the Time Sampler),
FD-against-NFE plots per teacher and per reading, and the learned Time Sampler's density per teacher. ``--pack
DIR`` then writes ``readings.tar.gz`` (results, rows, logs) and ``sd-teacher.tar.gz`` there (each < 16 MiB).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
#: how the rows' fd is computed (``--fd-view``): ``early`` on the committed autoencoder pair is rayflow's default
#: fd since issue #11, the metric issue #14's targets are stated in; BENCHMARKS section 7's committed rows were
#: scored with the ``multilayer`` view of the committed classifier (``--fd-view multilayer --feature-net
#: benchmarks/checkpoints/fashion-mnist-feature-net``). A run directory and ``--merge`` never mix the two.
FD_VIEWS = ("early", "multilayer")
#: rows written before they carried ``feature_view`` (BENCHMARKS section 7) were scored with the multi-layer view
LEGACY_VIEW = "multilayer"

from rayflow.checkpoint import read_json, write_json_atomic  # noqa: E402
from rayflow.data import load_dataset  # noqa: E402
from rayflow.errors import RayflowError, require  # noqa: E402
from rayflow.evaluation import plot_metric_vs_nfe  # noqa: E402
from rayflow.schedules import VPSchedule  # noqa: E402

#: reading name -> (method, options). RayFlow rows are issue #14's readings (methods/rayflow/readings.py), each
#: with its reading and Time Sampler named, so a row means what it meant when it was measured whatever the
#: defaults; the peers keep their defaults. "-uniform-t" rows pair with their learned-Time-Sampler row, seed by seed.
READINGS: dict[str, tuple[str, dict[str, str]]] = {
    # K = 8 points a_k x0 + s_k eps (the reconstruction; the default before #14)
    "average": ("rayflow", {"eps_mu_reading": "average", "time_sampler": "learned"}),
    "trajectory": ("rayflow", {"eps_mu_reading": "trajectory", "time_sampler": "learned"}),
    "start": ("rayflow", {"eps_mu_reading": "start", "time_sampler": "learned"}),
    "trajectory-consistency": ("rayflow", {"eps_mu_reading": "trajectory", "consistency_weight": "1",
                                           "time_sampler": "learned"}),
    "start-consistency": ("rayflow", {"eps_mu_reading": "start", "consistency_weight": "1",
                                      "time_sampler": "learned"}),
    "start-sigma": ("rayflow", {"eps_mu_reading": "start", "sigma": "0.05", "time_sampler": "learned"}),
    "average-uniform-t": ("rayflow", {"eps_mu_reading": "average", "time_sampler": "uniform"}),
    "trajectory-uniform-t": ("rayflow", {"eps_mu_reading": "trajectory", "time_sampler": "uniform"}),
    # RayFlow's defaults since this script's 3-seed run (docs/rayflow.md §5.6)
    "start-uniform-t": ("rayflow", {"eps_mu_reading": "start", "time_sampler": "uniform"}),
    "start-no-reweight": ("rayflow", {"eps_mu_reading": "start", "reweight": "false", "time_sampler": "learned"}),
    "start-conditioned-t": ("rayflow", {"eps_mu_reading": "start", "time_sampler_features": "true",
                                        "time_sampler": "learned"}),
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
#: updates of the scaled-linear teacher fine-tuned from the linear one (--sd-init linear): a quarter of the
#: linear teacher's 8000 from scratch, so it fits beside the students in one call
SD_FINE_TUNE_STEPS = 2000
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
    if args.student_compile_mode is not None:
        cfg.student_compile_mode = args.student_compile_mode
    if args.teacher_steps is not None:
        cfg.teacher_steps = int(args.teacher_steps)
    elif args.sd_init == "linear" and not args.tiny:
        cfg.teacher_steps = SD_FINE_TUNE_STEPS
    return cfg


# ---------------------------------------------------------------------- jobs
# One command runs every part as a graph of jobs: worker processes on the one GPU, ``--jobs`` of the long ones
# (teacher training, students) at a time; the short GPU-bound ones (a teacher's reference samples, a RayFlow
# pool) start as soon as their inputs exist, beside them. Long jobs start in the order of ``--rows`` (priority),
# each only while its estimated time still fits the ``--budget-s`` wall-clock budget; at the budget what still
# runs is stopped (the rows already written are kept: every student writes its own as it finishes).
@dataclass
class Job:
    kind: str  # "teacher" (the scaled-linear teacher) | "reference" | "pool" | "student"
    teacher: str
    reading: str = ""
    seed: int = 0
    deps: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return ":".join([self.kind, self.teacher] + ([self.reading] if self.reading else [])
                        + ([str(self.seed)] if self.kind == "student" else []))

    @property
    def light(self) -> bool:
        return self.kind in ("reference", "pool")


def parse_job(text: str) -> Job:
    kind, teacher, *rest = text.split(":")
    return Job(kind, teacher, rest[0] if rest else "", int(rest[1]) if len(rest) > 1 else 0)


def pool_name(reading: str) -> str:
    """The RayFlow pool a reading trains on (its own, or the one it shares: SHARED_POOL)."""
    return SHARED_POOL.get(reading, reading)


def plan_jobs(out: Path, cfg, parts: tuple[str, ...], teachers: list[str], rows: list[tuple[str, str, int]]
              ) -> list[Job]:
    """The jobs still to do, in priority order: each student row in ``rows`` order, preceded by what it needs
    and is not there yet (the scaled-linear teacher, the teacher's reference, the reading's pool), then the
    reference of any teacher no row needs (``--parts reference``) and the sd teacher if asked for alone."""
    jobs: dict[str, Job] = {}

    def add(job: Job) -> str:
        jobs.setdefault(job.name, job)
        return job.name

    def teacher_deps(t: str) -> list[str]:
        if t != "sd" or fm.done(teacher_run(out, "sd"), "teacher_train"):
            return []
        require("teacher-sd" in parts, f"{teacher_run(out, 'sd')}/teacher: no teacher yet (add the teacher-sd part)")
        return [add(Job("teacher", "sd"))]

    def reference(t: str) -> None:
        if not fm.done(teacher_run(out, t), "reference"):
            add(Job("reference", t, deps=teacher_deps(t)))

    if "students" in parts:
        for t, r, s in rows:
            if fm.done(teacher_run(out, t), f"method-{_job_name(r, s, cfg)}"):
                continue
            deps = teacher_deps(t)
            reference(t)  # the student waits for it only to score, so it is no dependency
            if READINGS[r][0] == "rayflow":  # the pool is shared by seeds and by rows that differ in training only
                deps.append(add(Job("pool", t, pool_name(r), deps=teacher_deps(t))))
            add(Job("student", t, r, s, deps=deps))
    if "reference" in parts:
        for t in teachers:
            reference(t)
    if "teacher-sd" in parts and "sd" in teachers:
        teacher_deps("sd")
    return list(jobs.values())


def _job_name(reading: str, seed: int, cfg) -> str:
    """fashion_mnist's row name: ``rr-READING`` for the run's own seed (0), ``rr-READING@seedN`` otherwise."""
    return fm.seeded_name(PREFIX + reading, seed, cfg)


def _wait_for(path: Path, what: str, timeout: float = 900.0) -> None:
    """Block until another job has written ``path`` (files here are written atomically)."""
    t0 = time.time()
    while not path.exists():
        require(time.time() - t0 < timeout, f"{path}: {what} did not appear within {timeout:.0f} s")
        time.sleep(2.0)


def run_one(out: Path, spec: str, cfg, device: str, job: Job, args: argparse.Namespace) -> None:
    """One job in this process (a worker, or everything in turn with ``--jobs 1``)."""
    _register()
    run = teacher_run(out, job.teacher)
    if job.kind == "teacher":
        init = teacher_run(out, "linear") / "teacher" if args.sd_init == "linear" else None
        require(init is None or (init / "model.safetensors").exists(),
                f"{init}: --sd-init linear fine-tunes the linear teacher, which is not there")
        fm.part_teacher(run, spec, cfg, schedule=VPSchedule.scaled_linear(), init_from=init)
    elif job.kind == "reference":
        fm.part_reference(run, spec, cfg, device)
    elif job.kind == "pool":
        build_pool_only(run, spec, cfg, job.reading)
    elif job.kind == "student":
        if fm.done(run, f"method-{_job_name(job.reading, job.seed, cfg)}"):
            return

        def reference():  # written by this teacher's reference job, perhaps still running in another process
            _wait_for(fm.rows_path(run, "reference"), f"the {job.teacher} teacher's reference")
            return fm._reference(run, cfg, device)

        fm._one_method(run, cfg, device, load_dataset(spec), lambda: fm._scorer(run, spec, cfg, device), reference,
                       PREFIX + job.reading, job.seed)
    else:
        raise RayflowError(f"unknown job kind {job.kind!r}")


def build_pool_only(run: Path, spec: str, cfg, reading: str) -> None:
    """Fill a RayFlow reading's eps_mu pool in the run's cache (what its students then only read): a one-update
    distillation into a scratch directory, so the pool is built by exactly the code path of the students."""
    from rayflow.distillation import distill
    from rayflow.methods import get_method
    from rayflow.training import TrainConfig

    method_name, options = READINGS[reading]
    if cfg.tiny:
        options = {**options, **fm.tiny_options().get(method_name, {})}
    method = get_method(method_name).from_options(options)
    train = TrainConfig(max_steps=1, batch_size=cfg.distill_batch, lr=cfg.distill_lr, seed=cfg.seed,
                        checkpoint_every=1000, compile="no", mixed_precision="auto")
    distill(method, str(run / "teacher"), load_dataset(spec), run / "pool-builds" / reading, train,
            guidance=cfg.guidance, cache_dir=run / "caches" / (PREFIX + pool_name(reading)), progress=False)


def run_jobs(jobs: list[Job], out: Path, spec: str, cfg, device: str, args: argparse.Namespace) -> dict[str, str]:
    """Run ``jobs`` (priority order) and return each one's outcome: done, failed, stopped or skipped."""
    outcome: dict[str, str] = {}
    if args.jobs <= 1:  # in turn, in this process: teacher, references, pools, students (dependencies first)
        rank = {"teacher": 0, "reference": 1, "pool": 2, "student": 3}
        for job in sorted(jobs, key=lambda j: rank[j.kind]):
            t0 = time.time()
            run_one(out, spec, cfg, device, job, args)
            outcome[job.name] = "done"
            print(f"  {job.name}: done in {time.time() - t0:.0f} s", flush=True)
        return outcome
    return _schedule(jobs, args, outcome)


def worker_command(args: argparse.Namespace, job: Job) -> list[str]:
    """This script, run as the worker of one job."""
    return [sys.executable, str(Path(__file__).resolve()), "--data", args.data, "--out", args.out,
            "--threads", str(args.threads), "--sd-init", args.sd_init, "--teacher", args.teacher,
            "--job", job.name] + (["--tiny"] if args.tiny else []) + \
        (["--allow-cpu"] if args.allow_cpu else []) + ([] if args.steps is None else ["--steps", str(args.steps)]) + \
        ([] if args.teacher_steps is None else ["--teacher-steps", str(args.teacher_steps)]) + \
        ([] if args.student_compile_mode is None else ["--student-compile-mode", args.student_compile_mode]) + \
        ["--fd-view", args.fd_view]


def _schedule(jobs: list[Job], args: argparse.Namespace, outcome: dict[str, str],
              command: Callable[[argparse.Namespace, Job], list[str]] = worker_command, tick: float = 1.0
              ) -> dict[str, str]:
    """Workers in priority order under the rules of the module's job section; ``command`` makes a worker's
    command line (tests pass a stand-in). Each worker gets the GPU with the fewest workers (``--gpus``)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TQDM_DISABLE": "1"}
    estimate = {"teacher": args.teacher_s, "student": args.student_s, "reference": 0.0, "pool": 0.0}
    t_start = time.time()
    pending, running = list(jobs), []
    status_path = Path(args.out) / "jobs.json"

    def record() -> None:
        write_json_atomic({"elapsed_s": round(time.time() - t_start, 1), "outcome": outcome,
                           "running": [j.name for j, *_ in running], "pending": [j.name for j in pending]},
                          status_path)

    while pending or running:
        elapsed = time.time() - t_start
        for item in list(running):
            job, proc, fh, t0, _ = item
            if proc.poll() is None:
                continue
            fh.close()
            running.remove(item)
            outcome[job.name] = "done" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            print(f"  [{elapsed:5.0f} s] {job.name}: {outcome[job.name]} after {time.time() - t0:.0f} s",
                  flush=True)
        if args.budget_s and elapsed > args.budget_s:
            for _job, proc, *_ in running:  # the budget is spent: stop what still runs, keep what is written
                proc.terminate()
            for job, proc, fh, *_ in running:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                fh.close()
                outcome[job.name] = "stopped at the budget"
                print(f"  [{elapsed:5.0f} s] {job.name}: stopped at the budget", flush=True)
            running = []
            for job in pending:
                outcome[job.name] = "skipped (budget spent)"
            pending = []
            break
        free = args.jobs - sum(1 for j, *_ in running if not j.light)  # long jobs over all GPUs
        for job in list(pending):
            if any(outcome.get(d, "done") != "done" for d in job.deps if d in outcome):
                pending.remove(job)  # an input failed or never ran
                outcome[job.name] = "skipped (an input failed)"
                continue
            if not all(outcome.get(d) == "done" for d in job.deps):
                continue
            if not job.light:
                if free <= 0:
                    continue
                # keep a slot for every long job ahead in priority that waits for an input
                ahead = pending[: pending.index(job)]
                if free - 1 < sum(1 for j in ahead if not j.light):
                    continue
                if args.budget_s and elapsed + estimate[job.kind] > args.budget_s:
                    pending.remove(job)
                    outcome[job.name] = "skipped (would not finish within the budget)"
                    print(f"  [{elapsed:5.0f} s] {job.name}: {outcome[job.name]}", flush=True)
                    continue
                free -= 1
            pending.remove(job)
            log = Path(args.out) / "logs" / f"{job.name.replace(':', '-')}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            fh = log.open("a")
            gpu = min(range(args.gpus), key=lambda g: sum(1 for *_, g_ in running if g_ == g))
            job_env = {**env, "CUDA_VISIBLE_DEVICES": str(gpu)} if args.gpus > 1 else env
            running.append((job, subprocess.Popen(command(args, job), env=job_env, stdout=fh,
                                                  stderr=subprocess.STDOUT), fh, time.time(), gpu))
            print(f"  [{elapsed:5.0f} s] {job.name}: started" + (f" on GPU {gpu}" if args.gpus > 1 else ""),
                  flush=True)
        record()
        time.sleep(tick)
    record()
    return outcome


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


def _decimals(value: float, significant: int = 3) -> int:
    """Decimal places that show ``value`` to ``significant`` digits (0.0319 -> 4, 4.76 -> 2, 123 -> 0)."""
    return max(0, significant - 1 - math.floor(math.log10(abs(value)))) if value else significant


def summarise(rows: list[dict]) -> str:
    """Markdown: FD mean ± std over seeds per (teacher, reading, NFE), the ratio of the best reading to the
    teacher's 50-step DDIM FD, and the Time Sampler's paired seed difference (``X-uniform-t`` minus ``X``)."""
    lines = ["# RayFlow readings (issue #14)", ""]
    for t in sorted({r["teacher"] for r in rows}):
        trows = [r for r in rows if r["teacher"] == t]
        ref = next((r["fd"] for r in trows if r["reading"] == "teacher ddim-50"), None)
        nfes = sorted({r["nfe"] for r in trows if r["seed"] is not None})
        readings = list(dict.fromkeys(r["reading"] for r in trows if r["seed"] is not None))
        title = f"## teacher `{t}`" + (f" (50-step DDIM FD {ref:.{_decimals(ref)}f})" if ref is not None else "")
        lines += [title, "",
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
                d = _decimals(m)  # FDs span 0.01-6: three significant digits, the spread at least one
                spread = f" ± {s:.{max(d, _decimals(s, 1))}f}" if len(v) > 1 else ""  # one seed has no spread
                cells.append(f"{m:.{d}f}{spread}" + (f" ({m / ref:.2f}×)" if ref else ""))
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


def scored_with(rows: list[dict]) -> set[tuple[str | None, str]]:
    """The (feature network, view) pairs that scored ``rows``."""
    return {(r.get("feature_net"), r.get("feature_view", LEGACY_VIEW)) for r in rows}


def merge_rows(new: list[dict], old: list[dict]) -> list[dict]:
    """``new`` rows, plus the rows of ``old`` (an earlier call's results) that ``new`` does not measure again:
    one row per (teacher, reading, seed, NFE), so seeds measured in different calls are summarised together.
    Rows scored by another feature network or view are refused: their ``fd`` means something else."""
    require(not new or not old or scored_with(new) == scored_with(old),
            f"--merge: the earlier rows were scored with {sorted(scored_with(old), key=str)}, these with "
            f"{sorted(scored_with(new), key=str)}; their fd columns are not comparable (use another --results "
            "file, or --fd-view/--feature-net as the earlier call did)")
    key = lambda r: (r["teacher"], r["reading"], r["seed"], r["nfe"])  # noqa: E731
    have = {key(r) for r in new}
    return [r for r in old if key(r) not in have] + new


def part_report(out: Path, teachers: list[str], results: Path, run_seed: int = 0, merge: Path | None = None
                ) -> None:
    rows = collect_rows(out, teachers, run_seed)
    if merge is not None and merge.is_file():
        rows = merge_rows(rows, json.loads(merge.read_text()))
        print(f"merged with the rows of {merge}")
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


# ---------------------------------------------------------------------- packing
def pack(out: Path, results: Path, dest: Path) -> list[Path]:
    """What a GPU call brings back (at most 16 MiB a file): ``readings.tar.gz`` (the results, every job's rows,
    logs, the students' configs, training and Time Sampler logs, the sample grids) and ``sd-teacher.tar.gz`` (the
    scaled-linear teacher, for ``--sd-teacher`` in a later call). Weights of students and pools stay behind."""
    import tarfile

    dest.mkdir(parents=True, exist_ok=True)
    small = [results, out / "logs", out / "jobs.json", out / "timing.json", out / "bench_config.json"]
    for run in sorted(p for p in out.iterdir() if p.is_dir() and (p / "rows").is_dir()):
        small += [run / "rows", run / "grids", run / "teacher" / "config.json", run / "teacher" / "train_log.jsonl"]
        for student in sorted((run / "students").glob("*")):
            small += [student / n for n in ("config.json", "time_sampler.json", "train_log.jsonl")]
    written = [dest / "readings.tar.gz"]
    with tarfile.open(written[0], "w:gz") as tar:
        for path in small:
            if path.exists():
                tar.add(path, arcname=str(path.relative_to(out)) if path.is_relative_to(out)
                        else f"results/{path.relative_to(results)}" if path != results else "results")
    sd = out / "sd" / "teacher"
    if (out / "sd" / "rows" / "teacher_train.json").exists() and (sd / "model.safetensors").exists():
        written.append(dest / "sd-teacher.tar.gz")
        with tarfile.open(written[-1], "w:gz") as tar:
            for name in ("config.json", "model.safetensors", "train_log.jsonl"):
                if (sd / name).exists():
                    tar.add(sd / name, arcname=f"sd-teacher/{name}")
    return written


# ---------------------------------------------------------------------- entry point
def _list(text: str, allowed, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = sorted(set(items) - set(allowed))
    require(items and not bad, f"--{what}: unknown {what} {bad}; expected some of {', '.join(allowed)}")
    return items


def parse_rows(text: str, teachers: list[str]) -> list[tuple[str, str, int]]:
    """``--rows linear:start:1,sd:reflow:0`` -> [(teacher, reading, seed), ...] (priority order)."""
    rows = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        parts = item.split(":")
        try:
            t, r, s = parts[0], parts[1], int(parts[2])
            require(len(parts) == 3, "")
        except (IndexError, ValueError, RayflowError):
            raise RayflowError(f"--rows: {item!r} is not TEACHER:READING:SEED (e.g. linear:start:1)") from None
        require(t in teachers, f"--rows: {item!r}: teacher {t!r} is not among --teachers ({', '.join(teachers)})")
        require(r in READINGS, f"--rows: {item!r}: unknown reading {r!r}; expected one of {', '.join(READINGS)}")
        rows.append((t, r, s))
    require(rows, "--rows: give at least one TEACHER:READING:SEED")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "fashion-mnist"))
    p.add_argument("--out", default="runs/rayflow-readings")
    p.add_argument("--parts", default="all", help=f"comma-separated subset of {', '.join(PARTS)} (default all)")
    p.add_argument("--teachers", default=",".join(TEACHERS))
    p.add_argument("--readings", default=",".join(DEFAULT_READINGS), help=f"some of {', '.join(READINGS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rows", default=None,
                   help="the student rows in priority order, TEACHER:READING:SEED,... (default: every --seeds x "
                        "--teachers x --readings, seed by seed)")
    p.add_argument("--steps", type=int, default=None, help="student updates, shared by every row (default 2000)")
    p.add_argument("--student-compile-mode", default=None, choices=fm.COMPILE_MODES,
                   help="torch.compile mode of the students (reduce-overhead = CUDA graphs: BENCHMARKS §6.3)")
    p.add_argument("--teacher-steps", type=int, default=None,
                   help="sd teacher updates (default 2000 fine-tuning with --sd-init linear, 8000 from scratch)")
    p.add_argument("--sd-init", choices=("linear", "scratch"), default="linear",
                   help="the scaled-linear teacher starts from the linear teacher's weights (default) or afresh")
    p.add_argument("--jobs", type=int, default=8,
                   help="long jobs (teacher training, students) at once, as processes sharing the GPU")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per worker process")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs to spread the workers over (default: all visible; each worker sees one)")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="wall-clock budget of the jobs in seconds (0 = none): a long job starts only if its estimate "
                        "fits; what still runs at the budget is stopped")
    p.add_argument("--student-s", type=float, default=330.0, help="estimated seconds of one student (pool + train + "
                   "score; 2000 updates took 273-339 s on one H200 beside two others)")
    p.add_argument("--teacher-s", type=float, default=150.0, help="estimated seconds of the sd teacher's training")
    p.add_argument("--teacher", default=str(REPO / "benchmarks" / "checkpoints" / "fashion-mnist-teacher"),
                   help="the linear-schedule teacher (default: the committed one; ignored with --tiny)")
    p.add_argument("--fd-view", choices=FD_VIEWS, default="early",
                   help="early: rayflow's default fd (issue #11); multilayer: the fd of BENCHMARKS section 7")
    p.add_argument("--feature-net-2", default=str(fm.FEATURE_NET_2),
                   help="the second network of fd_net2 (default: the committed autoencoder pair's second)")
    p.add_argument("--feature-net", default=str(fm.FEATURE_NET),
                   help="the feature network of fd (default: the committed autoencoder pair's first; with "
                        "--fd-view multilayer, section 7 used benchmarks/checkpoints/fashion-mnist-feature-net; "
                        "ignored with --tiny)")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--merge", default=None,
                   help="an earlier call's rayflow_readings.json whose rows the report keeps where this run has none "
                        "(e.g. benchmarks/results/rayflow_readings.json: seeds of earlier calls)")
    p.add_argument("--sd-teacher", default=None,
                   help="reuse this scaled-linear teacher directory (an earlier call's sd-teacher.tar.gz, unpacked)")
    p.add_argument("--pack", default=None,
                   help="at the end, write readings.tar.gz and sd-teacher.tar.gz here (e.g. $OUT on the GPU machine)")
    p.add_argument("--tiny", action="store_true", help="a tiny configuration, to check the script end to end")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (only sensible with --tiny)")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # KIND:TEACHER[:READING[:SEED]], a worker
    args = p.parse_args(argv)
    try:
        fm.FD_VIEW = args.fd_view  # workers too: they score what they train
        cfg = _config(args)
        parts = PARTS if args.parts == "all" else tuple(_list(args.parts, PARTS, "parts"))
        teachers = _list(args.teachers, TEACHERS, "teachers")
        readings = _list(args.readings, READINGS, "readings")
        try:
            seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            raise RayflowError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
        require(seeds, "--seeds: give at least one seed")
        rows = parse_rows(args.rows, teachers) if args.rows is not None else [
            (t, r, s) for s in seeds for t in teachers for r in readings]
        require(cfg.distill_steps >= 1, f"--steps must be >= 1, got {cfg.distill_steps}")
        require(cfg.teacher_steps >= 1, f"--teacher-steps must be >= 1, got {cfg.teacher_steps}")
        require(args.jobs >= 1 and args.threads >= 1, "--jobs and --threads must be >= 1")
        require(args.budget_s >= 0 and args.student_s >= 0 and args.teacher_s >= 0,
                "--budget-s, --student-s and --teacher-s must be >= 0")
        require(Path(args.data).is_dir(), f"--data {args.data}: no such directory (the Fashion-MNIST IDX files)")
        gpu = torch.cuda.is_available()
        require(gpu or (args.allow_cpu and args.tiny) or parts == ("report",),
                "no GPU found: this benchmark is sized for one H200 (use --tiny --allow-cpu for a dry run)")
        device = "cuda" if gpu else "cpu"
        visible = torch.cuda.device_count() if gpu else 1
        args.gpus = visible if args.gpus is None else args.gpus
        require(1 <= args.gpus <= visible, f"--gpus {args.gpus}: {visible} GPU(s) visible")
        torch.set_num_threads(args.threads if args.job else max(1, torch.get_num_threads()))
        if gpu:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        spec = fm.data_spec(args.data, cfg)
        out = Path(args.out)
        if args.job:  # a worker: one job, then exit
            run_one(out, spec, cfg, device, parse_job(args.job), args)
            return 0
        report_only = parts == ("report",)  # the report reads rows only: no data, teacher or GPU needed
        if not report_only:
            load_dataset(spec, split="test")  # refuse a wrong path before any work
        out.mkdir(parents=True, exist_ok=True)
        cfg_path = out / "bench_config.json"
        cfg_now = {**json.loads(json.dumps(cfg.__dict__)), "sd_init": args.sd_init, "fd_view": args.fd_view}
        if cfg_path.exists():
            old = read_json(cfg_path)
            old.setdefault("fd_view", LEGACY_VIEW)  # run directories from before --fd-view
            old.setdefault("student_compile_mode", "default")  # ... and before --student-compile-mode
            require(old == cfg_now,
                    f"{cfg_path}: this run directory was made with another configuration (--steps, --tiny, "
                    "--teacher-steps, --sd-init, --fd-view, --student-compile-mode); use another --out")
        else:
            write_json_atomic(cfg_now, cfg_path)
        # the linear teacher: the committed one (or, --tiny, a tiny one); --sd-init linear fine-tunes it
        need_linear = "linear" in teachers or ("sd" in teachers and args.sd_init == "linear"
                                               and not fm.done(teacher_run(out, "sd"), "teacher_train"))
        for t in [] if report_only else teachers:
            run = teacher_run(out, t)
            if not args.tiny:  # a run directory keeps the networks it was scored with (a changed one is refused)
                fm.adopt_feature_net(args.feature_net, run / "feature-net")
                fm.adopt_feature_net(args.feature_net_2, run / "feature-net-2")
        sd_run = teacher_run(out, "sd")
        if args.sd_teacher and "sd" in teachers and not report_only and not fm.done(sd_run, "teacher_train"):
            fm.adopt(args.sd_teacher, sd_run / "teacher", ("model.safetensors", "config.json"))
            kind = read_json(sd_run / "teacher" / "config.json").get("schedule", {}).get("kind")
            require(kind == "scaled_linear", f"--sd-teacher {args.sd_teacher}: its schedule is {kind!r}, not "
                    "scaled_linear")
            write_json_atomic({"reused": args.sd_teacher}, sd_run / "rows" / "teacher_train.json")
        linear = teacher_run(out, "linear")
        if need_linear and not report_only and not fm.done(linear, "teacher_train"):
            if args.tiny:
                fm.part_teacher(linear, spec, cfg)
            else:
                fm.adopt(args.teacher, linear / "teacher", ("model.safetensors", "config.json"))
                write_json_atomic({"reused": args.teacher}, linear / "rows" / "teacher_train.json")
        t0 = time.time()
        if not report_only:
            jobs = plan_jobs(out, cfg, parts, teachers, rows)
            print(f"== {len(jobs)} job(s): " + ", ".join(j.name for j in jobs), flush=True)
            outcome = run_jobs(jobs, out, spec, cfg, device, args)
            seconds = time.time() - t0
            print(f"== jobs done in {seconds:.0f} s", flush=True)
            timing_path = out / "timing.json"
            timing = read_json(timing_path) if timing_path.exists() else {}
            timing["jobs"] = round(timing.get("jobs", 0.0) + seconds, 1)
            write_json_atomic(timing, timing_path)
            failed = [n for n, o in outcome.items() if o.startswith("failed")]
            if failed and "report" not in parts:
                raise RayflowError(f"{len(failed)} job(s) failed: {failed}; see {out}/logs (rerun to resume)")
        try:
            if "report" in parts:
                part_report(out, teachers, Path(args.results), cfg.seed,
                            merge=Path(args.merge) if args.merge else None)
        finally:  # whatever was measured comes back, also when the report has nothing to show
            if args.pack:
                for path in pack(out, Path(args.results), Path(args.pack)):
                    print(f"packed {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    except RayflowError as exc:
        print(f"rayflow_readings: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
