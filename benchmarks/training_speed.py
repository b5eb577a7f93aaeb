"""Training speed on one GPU (issue #13): rayflow's Trainer against a bare PyTorch loop, and the teacher side.

For the Fashion-MNIST benchmark's network (the committed teacher, a 4.2 M-parameter class-conditional UNet on
32x32x1, batch 256, bf16), in one command:

* **teacher training** and **each method's student training**: samples/s through rayflow's Trainer (measured
  on the steps after a warm-up, which includes compilation) and through a bare PyTorch loop of the same
  network, loss (the method's own objective, called directly), optimizer (fused AdamW, the same lr and
  clipping), EMA, batch and compile settings, in the same process; peak GPU memory; the share of the roofline
  (training FLOPs per sample counted by ``torch.utils.flop_counter`` over the bf16 matmul rate measured here);
* **the teacher side** of each method (pairs, eps_mu, teacher-ODE x0): teacher evaluations per second while
  building its pool, against the compiled 1-NFE inference rate of the same teacher (bf16, torch.compile with
  CUDA graphs, batch 2048) - the rate a pool build could reach. In a method row this is the distillation's wall
  time less its training, so it includes loading, compiling and capturing the teacher;
* **the teacher side at steady state** (row ``teacher-pool``): the fixed cost (load, compile, capture every
  static batch shape, a small pool of each kind), then RayFlow's eps_mu pool (data x0, K = 8), its default pool
  (teacher x0) and 2-RF's pairs, ``--pool-size`` instances each (60 000 by default), built in memory at
  ``--gen-batch`` rows per teacher call: wall seconds, NFE/s and their ratio to the inference rate;
* **CUDA graphs for the student step** (rows ``<method>-graphs`` for every method row, and ``teacher-graphs``:
  ``compile_mode="reduce-overhead"``, the bare loop likewise); where graphs cannot run (a CPU) the row is
  measured without them, with a one-line notice and ``graphs_fallback`` in the row;
* **a torch.profiler summary of one step** (CPU ms, GPU ms, kernel launches, dtype copies per step) of the
  old-style eager step (autocast over float32 weights, foreach AdamW, a host read of the loss and gradient
  norm every step, the EMA rebuilt by name) and of the Trainer's step now (row ``profile``), and of the Trainer's
  step replayed from CUDA graphs (row ``profile-graphs``); with ``--profile-steps N``, the same summary of N
  steps of every training row's own step (key ``profile`` in its row), taken after its timed steps: where one
  method's step spends the GPU time another's does not.

Settings for finding where a step's time goes: ``--trace DIR`` (each profiled row also as a Chrome trace),
``--channels-last``, ``--layout-optimization``, ``--kernel-tuning``, ``--cudnn-benchmark``, ``--graphs-mode
max-autotune``, ``--no-bare``, ``--batch`` (a step that trains more samples per second at a larger batch was bound
by the host, not the GPU).
Several variants in one GPU session: one process each with ``--timing-lock PATH --ready N``; they compile side by
side and time (and profile) their steps one at a time, after all N have compiled or ``--ready-timeout`` seconds
(counted from each process's own arrival: a slow-compiling variant holds the others that long).

Rows go to ``benchmarks/results/training_speed.json`` as they finish (with the command, hardware and
versions); a row that fails is recorded with its error and the script goes on.

    python benchmarks/training_speed.py                      # one H200: about 5 minutes
    python benchmarks/training_speed.py --rows teacher,rayflow --append   # redo some rows, keep the others
    python benchmarks/training_speed.py --rows teacher-pool --pool-size 60000 --gen-batch 2048 --append
    python benchmarks/training_speed.py --rows rayflow-graphs,reflow-graphs --profile-steps 10   # where the time goes
    python benchmarks/training_speed.py --tiny --allow-cpu   # a dry run of every row on a CPU (seconds)
    # two variants side by side, timed one after the other:
    python benchmarks/training_speed.py --rows teacher-graphs --no-bare --timing-lock /tmp/gpu.lock --ready 2 &
    python benchmarks/training_speed.py --rows teacher-graphs --no-bare --timing-lock /tmp/gpu.lock --ready 2 \
        --layout-optimization inductor --results /tmp/inductor.json --out /tmp/inductor &
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import os
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from rayflow.checkpoint import read_json, unwrap_denoiser, write_json_atomic  # noqa: E402
from rayflow.data import load_dataset  # noqa: E402
from rayflow.distillation import distill, distill_context, load_teacher, train_teacher  # noqa: E402
from rayflow.errors import RayflowError, require  # noqa: E402
from rayflow.methods import get_method  # noqa: E402
from rayflow.models import ModelConfig, build_model, prepare_frozen_teacher, to_channels_last  # noqa: E402
from rayflow.models.speed import KERNEL_TUNING_CHOICES, FrozenTeacher, compile_network, has_convolutions  # noqa: E402
from rayflow.schedules import VPSchedule  # noqa: E402
from rayflow.training import EpsilonObjective, TrainConfig, Trainer  # noqa: E402

TEACHER = REPO / "benchmarks" / "checkpoints" / "fashion-mnist-teacher"
#: the methods timed, with pools small enough for the time budget (the rate does not depend on the pool size)
_METHOD_ROWS: dict[str, tuple[str, dict[str, str]]] = {
    "rayflow": ("rayflow", {"pool_size": "8192"}),
    "rayflow-learned-time-sampler": ("rayflow", {"pool_size": "8192", "time_sampler": "learned"}),
    "reflow": ("reflow", {"pool_size": "4096"}),
    "rectified-diffusion": ("rectified-diffusion", {"pool_size": "4096"}),
    "perflow": ("perflow", {"pool_size": "4096"}),
    "proreflow-ii": ("proreflow", {"preset": "II", "pool_size": "4096"}),
}
#: the methods timed, with pools small enough for the time budget (the rate does not depend on the pool size), and
#: each again as ``<row>-graphs``: the student's step (and the bare loop's) replayed from CUDA graphs
#: (TrainConfig.compile_mode="reduce-overhead"), which took the step off the host bound (BENCHMARKS §6.3)
METHODS: dict[str, tuple[str, dict[str, str]]] = {
    **_METHOD_ROWS, **{f"{row}-graphs": spec for row, spec in _METHOD_ROWS.items()}}
#: rows whose student step is compiled with CUDA graphs
GRAPH_ROWS = tuple(row for row in METHODS if row.endswith("-graphs"))
#: the teacher-side pools timed at steady state (row ``teacher-pool``): (label, method, options); each mirrors what
#: the method builds before training
POOLS: tuple[tuple[str, str, dict[str, str]], ...] = (
    # the target: a 60 000-instance eps_mu pool with K = 8 (the paper's data x0, the K-point average)
    ("rayflow eps_mu, data x0, K=8 average", "rayflow",
     {"x0_source": "data", "eps_mu_reading": "average", "k_timesteps": "8"}),
    # RayFlow's defaults: the teacher's x0 (DPM-Solver++ 2M, 25 steps) and the start reading of eps_mu
    ("rayflow default, teacher x0 (dpm++2m 25)", "rayflow", {}),
    # 2-Rectified Flow's global pairs (DPM-Solver++ 2M, 25 steps, label dropout 0.1)
    ("2-RF pairs (dpm++2m 25)", "reflow", {}),
)
TINY_OPTIONS: dict[str, dict[str, str]] = {
    "rayflow": {"pool_size": "16", "teacher_steps": "2"},
    "reflow": {"pool_size": "16", "distill_num_pairs": "16"},
    "rectified-diffusion": {"pool_size": "16"},
    "perflow": {"pool_size": "16"},
    "proreflow": {"pool_size": "16"},
}
ROWS = ("inference", "teacher-pool", "teacher", "teacher-graphs", *METHODS, "profile", "profile-graphs")


# ---------------------------------------------------------------------- measurement helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def matmul_rate(device: torch.device, tiny: bool) -> float:
    """FLOP/s of a square bf16 matmul (8192^3 on a GPU): the roofline's denominator."""
    n = 512 if tiny else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ a
    sync(device)
    iters = 3 if tiny else 20
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ a
    sync(device)
    return iters * 2 * n**3 / (time.perf_counter() - t0)


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


class TimingLock:
    """Several processes measuring on one GPU, one at a time: each compiles and warms up in parallel with the
    others, then holds an exclusive ``flock`` on ``path`` over its timed (and profiled) steps, so no other
    process's kernels share the GPU while it is timed. The first time, it also waits (at most ``ready_timeout_s``)
    until ``ready`` processes have reached their timed steps, so nobody is timed while another still compiles.
    Without ``path`` it does nothing. Re-entrant: a nested acquire of the same process is a no-op."""

    def __init__(self, path: str | None, ready: int = 1, ready_timeout_s: float = 300.0) -> None:
        self.path, self.ready, self.ready_timeout_s = path, max(1, ready), ready_timeout_s
        self._fd: int | None = None
        self._depth = 0
        self._waited = path is None

    def _barrier(self) -> None:
        assert self.path is not None
        Path(f"{self.path}.ready.{os.getpid()}.{id(self)}").touch()
        t0 = time.time()
        parent = Path(self.path).parent
        name = Path(self.path).name
        while len(list(parent.glob(f"{name}.ready.*"))) < self.ready and time.time() - t0 < self.ready_timeout_s:
            time.sleep(0.5)
        self._waited = True

    def __enter__(self) -> TimingLock:
        if self.path is None:
            return self
        if not self._waited:
            self._barrier()
        if self._depth == 0:
            self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.path is None or self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class WindowClock:
    """Times ``measure`` steps in ``windows`` equal windows (the device synchronised at each window's edges) and
    reports the **median** window's rate: a window in which something else took the host (this machine's CPUs
    are shared) shows as an outlier instead of lowering the whole row. Also the host's CPU time per step (the
    process's ``time.process_time``, every thread): one well below the wall time shows the host's slack, but one
    close to it proves nothing on a GPU, where the host spins while it waits for the device (BENCHMARKS §6.7)."""

    def __init__(self, measure: int, windows: int, samples_per_step: int, device: torch.device) -> None:
        self.windows = max(1, min(windows, measure))
        self.edges = [round(i * measure / self.windows) for i in range(self.windows + 1)]
        self.samples_per_step, self.device = samples_per_step, device
        self.marks: list[tuple[int, float, float]] = []  # (steps done, wall, host CPU) at each edge

    def at(self, done: int) -> None:
        """Call with the number of timed steps done so far (0 .. measure); marks the window edges."""
        if done in self.edges and (not self.marks or self.marks[-1][0] != done):
            sync(self.device)
            self.marks.append((done, time.perf_counter(), time.process_time()))

    @property
    def complete(self) -> bool:
        return len(self.marks) == len(self.edges)

    def window_rates(self) -> list[float]:
        return [(b[0] - a[0]) * self.samples_per_step / (b[1] - a[1]) for a, b in zip(self.marks, self.marks[1:])]

    def rate(self) -> float | None:
        """The median window's samples/s (None until every window is done)."""
        if not self.complete:
            return None
        rates = sorted(self.window_rates())
        mid = len(rates) // 2
        return rates[mid] if len(rates) % 2 else (rates[mid - 1] + rates[mid]) / 2

    def summary(self) -> dict[str, Any]:
        """Every window's rate and the host's CPU and wall ms per timed step."""
        if not self.complete:
            return {}
        (n0, w0, c0), (n1, w1, c1) = self.marks[0], self.marks[-1]
        steps = max(1, n1 - n0)
        return {"windows": self.windows, "window_rates": [round(r, 1) for r in self.window_rates()],
                "host_cpu_ms_per_step": round(1000 * (c1 - c0) / steps, 3),
                "wall_ms_per_step": round(1000 * (w1 - w0) / steps, 3)}


class StepTimer:
    """A Trainer callback that times steps ``warmup .. warmup + measure`` of each Trainer run in ``windows``
    windows (:class:`WindowClock`: the device synchronised only at the windows' edges) and keeps the last trainer
    it saw, for the bare loop to reuse."""

    def __init__(self, warmup: int, measure: int, lock: TimingLock | None = None, windows: int = 1) -> None:
        self.warmup, self.measure, self.windows = warmup, measure, windows
        self.lock = lock  # held from the first timed step to the end of the Trainer run (profiled steps included)
        self.trainer: Trainer | None = None
        self.start_step = 0
        self.clock: WindowClock | None = None  # this Trainer run's
        self.timed: WindowClock | None = None  # the clock of the run that gave ``rate`` (a stage of ProReflow)
        self.rate: float | None = None
        self.train_seconds = 0.0  # all Trainer runs (start -> end), to separate the teacher side
        self._t_run = 0.0
        self.hook: Callable[[Trainer, int], None] | None = None  # extra per-step hook (the profiler)

    def __call__(self, trainer: Trainer, event: str, step: int) -> None:
        if event == "start":
            self.trainer, self.start_step = trainer, step
            per_step = trainer.config.batch_size * trainer.config.gradient_accumulation_steps
            self.clock = WindowClock(self.measure, self.windows, per_step, trainer.device)
            self._t_run = time.perf_counter()
            return
        if event == "end":
            sync(trainer.device)
            self.train_seconds += time.perf_counter() - self._t_run
            if self.lock is not None:
                self.lock.__exit__(None, None, None)
            return
        done = step - self.start_step
        if done == self.warmup and self.lock is not None:
            self.lock.__enter__()
        if self.hook is not None:
            self.hook(trainer, done)
        if self.clock is not None and self.warmup <= done <= self.warmup + self.measure:
            self.clock.at(done - self.warmup)
            if done == self.warmup + self.measure:
                self.rate, self.timed = self.clock.rate(), self.clock


def _gpu_us(event: Any) -> float:
    return getattr(event, "self_device_time_total", 0) or 0


def trace_name(trainer: Trainer) -> str:
    """A file name for a Trainer run's trace: its method and stage, from the run config."""
    method = trainer.run_config.get("method")
    parts = [method.get("name") if isinstance(method, dict) else trainer.run_config.get("kind"),
             trainer.run_config.get("stage")]
    return "-".join(str(p) for p in parts if p) or "run"


def profile_summary(prof: Any, label: str, steps: int, device: torch.device) -> dict[str, Any]:
    """Per-step means of a torch.profiler run over ``steps`` training steps: CPU and GPU ms, kernel launches, dtype
    copies, host reads of device values, device waits, and the ten ops that took the most GPU time."""
    events = prof.key_averages()
    top = [e for e in sorted(events, key=lambda e: -_gpu_us(e))[:10] if _gpu_us(e) > 0]
    cpu_us = sum(e.self_cpu_time_total for e in events)
    gpu_us = sum(_gpu_us(e) for e in events)
    launches = sum(e.count for e in events if "LaunchKernel" in e.key or "GraphLaunch" in e.key)
    copies = sum(e.count for e in events if e.key in ("aten::_to_copy",))
    # host reads of device values (.item(), float(t), bool(t)) and explicit waits for the device
    reads = sum(e.count for e in events if e.key == "aten::_local_scalar_dense")
    waits = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                     "cudaEventSynchronize"))
    return {"what": label, "cpu_ms_per_step": round(cpu_us / 1000 / steps, 2),
            "gpu_ms_per_step": round(gpu_us / 1000 / steps, 2) if device.type == "cuda" else None,
            "kernel_launches_per_step": round(launches / steps, 1),
            "dtype_copies_per_step": round(copies / steps, 1),
            "host_reads_per_step": round(reads / steps, 2), "device_waits_per_step": round(waits / steps, 2),
            # where the GPU time goes: the next thing to speed up (and in how many calls)
            "top_gpu_ops_ms_per_step": {e.key[:80]: round(_gpu_us(e) / 1000 / steps, 3) for e in top},
            "top_gpu_ops_calls_per_step": {e.key[:80]: round(e.count / steps, 1) for e in top}}


def profiler_hook(start: int, steps: int, device: torch.device, activities: list[Any],
                  state: dict[str, Any]) -> Callable[[Trainer, int], None]:
    """A :class:`StepTimer` hook that runs torch.profiler over the Trainer's steps ``start .. start + steps``
    (counted from each Trainer run's first step) and leaves the profile in ``state["prof"]``. A method with
    several stages (ProReflow) is profiled in each; the last stage's profile is kept, and one cut short by the
    end of its stage is closed before the next opens."""
    from torch.profiler import profile

    def hook(trainer: Trainer, done: int) -> None:
        if done == start:
            if state.pop("open", False):
                state["prof"].__exit__(None, None, None)
            sync(device)
            state["prof"] = profile(activities=activities)
            state["prof"].__enter__()
            state["open"] = True
        elif done == start + steps and state.pop("open", False):
            sync(device)
            state["prof"].__exit__(None, None, None)

    return hook


def bare_loop(model: torch.nn.Module, objective: Any, train: TrainConfig, device: torch.device, warmup: int,
              measure: int, compile_model: bool, bf16: bool, cuda_graphs: bool = False,
              compile_mode: str = "reduce-overhead", lock: TimingLock | None = None,
              channels_last: bool | None = None, force_layout: bool = False,
              windows: int = 1) -> WindowClock:
    """samples/s of the plainest loop doing the Trainer's work: the objective's loss, backward, clipping, fused
    AdamW, a foreach EMA, the objective's ``after_step``; the same compile setting (``cuda_graphs``: torch.compile's
    ``compile_mode``, one that replays CUDA graphs); one generator; no logging, checks or checkpoints. ``lock``: the
    timed steps hold it (other processes of the same measurement wait). ``channels_last``: as the Trainer had it
    (None: on a GPU for a convolutional network, the Trainer's default); ``force_layout``: as the Trainer had it
    (TrainConfig.layout_optimization); the kernel tuning is the Trainer's config's. Timed in ``windows`` windows
    (:class:`WindowClock`, whose ``rate()`` is the median window's), as the Trainer's steps are."""
    model = copy.deepcopy(unwrap_denoiser(model)).to(device).train().requires_grad_(True)
    if channels_last if channels_last is not None else (device.type == "cuda" and has_convolutions(model)):
        to_channels_last(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay,
                            **({"fused": True} if device.type == "cuda" else {}))
    ema = [p.detach().clone() for p in params]
    if compile_model:  # as the Trainer compiles (its layout setting included)
        net = compile_network(model, compile_mode if cuda_graphs else "default", force_layout=force_layout,
                              kernel_tuning=train.kernel_tuning if device.type == "cuda" else "none")
    else:
        net = model
    gen = torch.Generator(device=device).manual_seed(0)

    def step(k: int) -> None:
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, bf16):
            loss = objective(net, k, gen).loss
        loss.backward()
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - train.ema_decay)
        if hasattr(objective, "after_step"):  # e.g. RayFlow's Time Sampler update: part of the method's step
            objective.after_step(net, k, gen)

    for k in range(warmup):
        step(k)
    clock = WindowClock(measure, windows, train.batch_size, device)
    with lock if lock is not None else contextlib.nullcontext():
        clock.at(0)
        for k in range(warmup, warmup + measure):
            step(k)
            clock.at(k + 1 - warmup)
    return clock


def train_flops_per_sample(model: torch.nn.Module, objective: Any, device: torch.device, batch: int,
                           bf16: bool) -> float:
    """FLOPs of one training step per sample (forward + backward of the objective, teacher calls included)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(unwrap_denoiser(model)).to(device).train().requires_grad_(True)
    gen = torch.Generator(device=device).manual_seed(0)
    with FlopCounterMode(display=False) as fc:
        with autocast(device, bf16):
            loss = objective(model, 0, gen).loss
        loss.backward()
    return fc.get_total_flops() / batch


# ---------------------------------------------------------------------- the benchmark
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tiny = args.tiny
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.bf16 = self.device.type == "cuda"
        self.compile = self.device.type == "cuda"
        self.warmup, self.measure = (1, 1) if self.tiny else (args.warmup, args.measure)
        self.windows = max(1, getattr(args, "windows", 1))
        # --profile-steps N: the training rows profile N steps after a gap step following the timed ones, so the
        # profiler never runs inside the timed window; their Trainer runs N + 1 steps more
        self.profile_steps = max(0, getattr(args, "profile_steps", 0))
        self.extra_steps = self.profile_steps + 1 if self.profile_steps else 0
        self.batch = 4 if self.tiny else args.batch
        self.out = Path(args.out)
        self.results = Path(args.results)
        self.doc: dict[str, Any] = {
            "command": "python " + " ".join([sys.argv[0] if sys.argv[0] else "benchmarks/training_speed.py",
                                             *(args.argv or [])]),
            "hardware": self.hardware(), "versions": self.versions(), "batch": self.batch,
            "warmup_steps": self.warmup, "measured_steps": self.measure, "rows": [], "profile": [],
        }
        if args.append and self.results.is_file():  # a run split over several calls: keep the other rows
            old = read_json(self.results)
            self.doc["rows"], self.doc["profile"] = list(old.get("rows", [])), list(old.get("profile", []))
            self.doc["command"] = "; ".join(x for x in (old.get("command"), self.doc["command"]) if x)
        self.lock = TimingLock(args.timing_lock, args.ready, args.ready_timeout)
        self.doc["settings"] = {"graphs_mode": args.graphs_mode, "cudnn_benchmark": bool(args.cudnn_benchmark),
                                "bare_loop": not args.no_bare, "channels_last": args.channels_last,
                                "layout_optimization": args.layout_optimization, "kernel_tuning": args.kernel_tuning}
        self.matmul: float | None = None
        self.inference_rate: float | None = None
        self.inference_flops: float | None = None

    @staticmethod
    def hardware() -> dict[str, Any]:
        hw: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            hw.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1))
        return hw

    @staticmethod
    def versions() -> dict[str, str]:
        out = {"torch": torch.__version__, "cuda": str(torch.version.cuda)}
        for name in ("diffusers", "accelerate", "safetensors"):
            try:
                out[name] = __import__(name).__version__
            except ImportError:
                out[name] = "absent"
        return out

    def write(self) -> None:
        write_json_atomic(self.doc, self.results)

    def record(self, what: str, fn: Callable[[], dict[str, Any]], key: str = "rows") -> None:
        """Run one row; its failure is recorded (with the error) and the benchmark goes on."""
        t0 = time.time()
        print(f"== {what}", flush=True)
        try:
            row = {"what": what, **fn()}
        except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
            traceback.print_exc()
            row = {"what": what, "error": f"{type(exc).__name__}: {exc}"}
        row["wall_s"] = round(time.time() - t0, 1)
        self.doc[key] = [r for r in self.doc[key] if r.get("what") != what] + [row]
        self.write()
        print(f"   {json.dumps(row)}", flush=True)

    # ------------------------------------------------------------------ set-up
    def prepare(self) -> None:
        spec = f"fashion-mnist:path={self.args.data},pad=32" + (",limit=256" if self.tiny else "")
        self.dataset = load_dataset(spec)
        if self.tiny:  # a tiny teacher of the same kind, trained for two steps here
            teacher_dir = self.out / "tiny-teacher"
            if not (teacher_dir / "model.safetensors").exists():
                train_teacher(self.dataset, teacher_dir, TrainConfig(
                    max_steps=1, batch_size=4, lr=1e-3, checkpoint_every=0, log_every=0, progress=False),
                    model=ModelConfig(kind="unet", sample_shape=(1, 32, 32), channels=(4, 8),
                                      layers_per_block=1))
            self.teacher_dir = teacher_dir
        else:
            self.teacher_dir = Path(self.args.teacher)
        self.teacher_config = read_json(self.teacher_dir / "config.json")
        self.matmul = matmul_rate(self.device, self.tiny)
        self.doc["matmul_flops_per_s"] = self.matmul
        self.write()

    def train_config(self, steps: int, lr: float, compile_mode: str = "default") -> TrainConfig:
        return TrainConfig(max_steps=steps, batch_size=self.batch, lr=lr, ema_decay=0.999, grad_clip=1.0,
                           checkpoint_every=0, log_every=max(1, steps // 2), progress=False,
                           mixed_precision="bf16" if self.bf16 else "no", compile="auto", compile_mode=compile_mode,
                           channels_last=self.args.channels_last, layout_optimization=self.args.layout_optimization,
                           kernel_tuning=self.args.kernel_tuning, step_graph=self.args.step_graph)

    def roofline(self, samples_per_s: float | None, flops: float) -> float | None:
        if samples_per_s is None or not self.matmul:
            return None
        return samples_per_s * flops / self.matmul

    # ------------------------------------------------------------------ rows
    def row_inference(self) -> dict[str, Any]:
        """1-NFE rate of the frozen teacher: eager bf16, and compiled with CUDA graphs (batch 2048) twice: with
        Inductor's layout heuristic and with the layout as the training rows have it (``--layout-optimization``)."""
        net, _, _ = load_teacher(str(self.teacher_dir), self.dataset)
        bs = 8 if self.tiny else 2048
        shape = tuple(self.teacher_config["model"]["sample_shape"])
        x = torch.randn(bs, *shape, device=self.device)
        t = torch.full((bs,), 999.0, device=self.device)
        c = torch.arange(bs, device=self.device) % 10
        out: dict[str, Any] = {"batch": bs}
        variants: tuple[tuple[str, dict[str, Any]], ...] = (
            ("eager", {}),
            ("compiled_graphs_inductor_layout", {"cuda_graphs": True, "kernel_tuning": self.args.kernel_tuning}),
            ("compiled_graphs", {"cuda_graphs": True, "force_layout": self.args.layout_optimization == "force",
                                 "kernel_tuning": self.args.kernel_tuning}))
        for label, kw in variants:
            teacher = prepare_frozen_teacher(copy.deepcopy(net), self.device,
                                             dtype=torch.bfloat16 if self.bf16 else None, **kw)
            with torch.no_grad():
                for _ in range(3):
                    teacher(x, t, c)
                sync(self.device)
                iters = 2 if self.tiny else 20
                t0 = time.perf_counter()
                for _ in range(iters):
                    teacher(x, t, c)
                sync(self.device)
            out[f"{label}_images_per_s"] = round(iters * bs / (time.perf_counter() - t0), 1)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc, torch.no_grad():
            net.to(self.device)(x[:1], t[:1], c[:1])
        self.inference_rate = out["compiled_graphs_images_per_s"]
        self.inference_flops = fc.get_total_flops()
        out.update(samples_per_s=self.inference_rate, bare_samples_per_s=None, flops_per_sample=fc.get_total_flops(),
                   roofline_share=self.roofline(self.inference_rate, fc.get_total_flops()))
        return out

    def activities(self) -> list[Any]:
        from torch.profiler import ProfilerActivity

        return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])

    def _train_row(self, trainer_run: Callable[[StepTimer], None], lr: float) -> dict[str, Any]:
        timer = StepTimer(self.warmup, self.measure, self.lock, self.windows)
        profiled: dict[str, Any] = {}
        if self.profile_steps:
            timer.hook = profiler_hook(self.warmup + self.measure + 1, self.profile_steps, self.device,
                                       self.activities(), profiled)
        Trainer.callbacks.append(timer)
        reset_peak(self.device)
        t0 = time.perf_counter()
        try:
            trainer_run(timer)
        finally:
            Trainer.callbacks.remove(timer)
        total = time.perf_counter() - t0
        peak = peak_memory_gib(self.device)
        require(timer.trainer is not None, "no Trainer ran")
        trainer = timer.trainer
        obj, model = trainer.objective, trainer.raw_model
        flops = train_flops_per_sample(model, obj, self.device, self.batch, self.bf16)
        reset_peak(self.device)
        bare_clock = None if self.args.no_bare else bare_loop(
            model, obj, trainer.config, self.device, self.warmup, self.measure, self.compile, self.bf16,
            # the bare loop as a user writes it: the network compiled with the run's graph mode (a Trainer that
            # captures its whole step compiles the network without graphs of its own)
            cuda_graphs=trainer.cuda_graphs or trainer.step_graph, compile_mode=trainer.config.compile_mode,
            lock=self.lock,
            channels_last=trainer.channels_last, force_layout=trainer.force_layout, windows=self.windows)
        rate = timer.rate
        bare = None if bare_clock is None else bare_clock.rate()
        timing = {"trainer": timer.timed.summary() if timer.timed is not None else {},
                  "bare": bare_clock.summary() if bare_clock is not None else {}}
        extra: dict[str, Any] = {}
        if self.profile_steps:
            require("prof" in profiled and not profiled.get("open"),
                    "the profiler did not run to its end (the Trainer stopped before its profiled steps)")
            extra["profile"] = profile_summary(profiled["prof"], "Trainer step", self.profile_steps, self.device)
            if self.args.trace:  # the whole timeline, for chrome://tracing or Perfetto
                Path(self.args.trace).mkdir(parents=True, exist_ok=True)
                profiled["prof"].export_chrome_trace(str(Path(self.args.trace) / f"{trace_name(trainer)}.json"))
        return {"samples_per_s": None if rate is None else round(rate, 1),
                "bare_samples_per_s": None if bare is None else round(bare, 1),
                "trainer_over_bare": None if rate is None or bare is None else round(rate / bare, 3),
                "roofline_share": self.roofline(rate, flops), "bare_roofline_share": self.roofline(bare, flops),
                "flops_per_sample": flops, "peak_memory_gib": peak,
                "bare_peak_memory_gib": None if bare is None else peak_memory_gib(self.device),
                "total_s": round(total, 1), "train_s": round(timer.train_seconds, 1), "timing": timing, **extra,
                "_timer": timer}

    def row_teacher(self, compile_mode: str = "default") -> dict[str, Any]:
        """Teacher training; ``compile_mode="reduce-overhead"``: the step's forward and backward replayed from CUDA
        graphs (TrainConfig.compile_mode; a notice and no graphs on a CPU)."""
        model_cfg = ModelConfig.from_dict(self.teacher_config["model"])
        schedule = VPSchedule.from_config(self.teacher_config["schedule"])

        def run(timer: StepTimer) -> None:
            shutil.rmtree(self.out / "teacher-training", ignore_errors=True)  # a fresh run, not a resume
            torch.manual_seed(0)
            objective = EpsilonObjective(self.dataset.x, self.dataset.labels, schedule, self.batch,
                                         label_dropout=0.1, num_classes=model_cfg.num_classes)
            Trainer(build_model(model_cfg), objective,
                    self.train_config(self.warmup + self.measure + self.extra_steps, 3e-4, compile_mode),
                    self.out / "teacher-training", {"kind": "speed-teacher"}).train()

        row = self._train_row(run, 3e-4)
        row["compile_mode"] = compile_mode
        row.update(graph_fields(row.pop("_timer").trainer))
        return row

    def row_method(self, name: str) -> dict[str, Any]:
        method_name, options = METHODS[name]
        if self.tiny:
            options = {k: v for k, v in options.items() if k != "pool_size"}
            options.update(TINY_OPTIONS.get(method_name, {}))
        method = get_method(method_name).from_options(options)
        # ProReflow splits the steps over its stages: give its last stage enough to be measured
        steps = (self.warmup + self.measure + self.extra_steps) * (3 if method_name == "proreflow" else 1)
        compile_mode = self.args.graphs_mode if name in GRAPH_ROWS else "default"
        result: dict[str, Any] = {}

        def run(timer: StepTimer) -> None:
            shutil.rmtree(self.out / "students" / name, ignore_errors=True)  # a fresh run, not a resume
            t0 = time.perf_counter()
            res = distill(method, str(self.teacher_dir), self.dataset, self.out / "students" / name,
                          self.train_config(steps, 1e-4, compile_mode), gen_batch=self.args.gen_batch)
            result["distill_s"] = time.perf_counter() - t0
            result["teacher_nfe"] = int(res.teacher_nfe)

        row = self._train_row(run, 1e-4)
        timer = row.pop("_timer")
        row.update(compile_mode=compile_mode, **graph_fields(timer.trainer))
        if compile_mode != "default" and not (timer.trainer.cuda_graphs or timer.trainer.step_graph):
            # the Trainer said why when it compiled (accumulation, a CPU); uncompiled (a CPU), it had nothing to say
            why = "not compiled on a CPU" if not timer.trainer.compiled else "the Trainer fell back (see its note)"
            print(f"training_speed: note: {name}: measured without CUDA graphs ({why})", file=sys.stderr, flush=True)
            row["graphs_fallback"] = why
        side = result["distill_s"] - timer.train_seconds  # pool building: pairs, eps_mu, teacher-ODE x0
        nfe_rate = result["teacher_nfe"] / side if side > 0 else None
        row.update(teacher_nfe=result["teacher_nfe"], teacher_side_s=round(side, 2),
                   teacher_side_nfe_per_s=None if nfe_rate is None else round(nfe_rate, 1),
                   teacher_side_over_inference=None if (nfe_rate is None or not self.inference_rate)
                   else round(nfe_rate / self.inference_rate, 3))
        return row

    def pool_rows(self) -> None:
        """The teacher side at steady state: the pools a method builds before training, timed after a warm-up that
        pays loading, compilation and CUDA-graph capture, against the 1-NFE inference rate of the same run.

        One record for the fixed cost (load + prepare the frozen teacher, then every static batch shape of it
        called twice and a small pool of each kind built: what compiles and captures), then one per pool of
        ``--pool-size`` instances (built in memory, as ``distill`` does without ``--cache``): its wall seconds,
        teacher NFEs (counted rows, padding excluded), NFE/s and that rate over the inference rate (the issue's
        target is >= 0.7), and the host seconds spent drawing RayFlow's per-row noise (one generator per row, in
        threads), during which the GPU waits.
        """
        from rayflow.methods.kit import make_pairs
        from rayflow.methods.rayflow import targets as rayflow_targets
        from rayflow.methods.rayflow.method import epsilon_teacher

        size = 24 if self.tiny else self.args.pool_size
        warm_size = 8 if self.tiny else min(size, 4096)
        state: dict[str, Any] = {}

        def methods(n: int) -> list[tuple[str, Any]]:
            out = []
            for label, name, options in POOLS:
                options = {**options, "pool_size": str(n)}
                if self.tiny:
                    options.update({"teacher_steps": "2"} if name == "rayflow" else {"pair_steps": "2"})
                out.append((label, get_method(name).from_options(options)))
            return out

        def build(ctx: Any, method: Any) -> int:
            """One pool as the method builds it; returns its rows."""
            if method.name == "rayflow":
                teacher = epsilon_teacher(ctx.teacher, ctx.schedule)
                pool = method.build_pool(ctx, teacher, method.needed_sources()[0], None)
                return next(iter(pool.values())).shape[0]
            return len(make_pairs(ctx, method.pair_spec()))  # Reflow.distill's first pool

        def fixed() -> dict[str, Any]:
            t0 = time.perf_counter()
            ctx = distill_context(str(self.teacher_dir), self.dataset, self.out / "pools", self.train_config(1, 1e-4),
                                  progress=False, gen_batch=self.args.gen_batch)
            sync(self.device)
            load_s = time.perf_counter() - t0
            frozen = ctx.teacher  # the FrozenTeacher inside the counting (and epsilon-view) wrappers
            while not isinstance(frozen, FrozenTeacher) and isinstance(getattr(frozen, "model", None),
                                                                       torch.nn.Module):
                frozen = frozen.model
            sizes = frozen.batch_sizes() if isinstance(frozen, FrozenTeacher) else ()
            t1 = time.perf_counter()
            shape = tuple(self.teacher_config["model"]["sample_shape"])
            classes = max(1, int(ctx.teacher.num_classes))
            with torch.no_grad():
                for n in sizes:  # every static shape: compiled and captured once, replayed once
                    for _ in range(2):
                        frozen(torch.randn(n, *shape, device=self.device), torch.full((n,), 999.0, device=self.device),
                               torch.arange(n, device=self.device) % classes if ctx.teacher.num_classes else None)
            sync(self.device)
            shapes_s = time.perf_counter() - t1
            for _, method in methods(warm_size):  # the samplers' and pools' own first calls
                build(ctx, method)
            sync(self.device)
            state["ctx"] = ctx
            return {"load_s": round(load_s, 2), "warm_shapes_s": round(shapes_s, 2),
                    "fixed_s": round(time.perf_counter() - t0, 2), "static_batch_sizes": list(sizes),
                    "gen_batch": ctx.gen_batch, "compiled": bool(getattr(frozen, "compiled", False)),
                    "cuda_graphs": bool(getattr(frozen, "cuda_graphs", False)), "warmup_pool_size": warm_size,
                    "samples_per_s": None, "bare_samples_per_s": None, "roofline_share": None}

        def timed(label: str, method: Any) -> dict[str, Any]:
            require("ctx" in state, "the fixed-cost record failed: no teacher to build pools with")
            ctx = state["ctx"]
            noise = {"s": 0.0}
            real = rayflow_targets._noise_from_seeds

            def counted(seeds: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
                t = time.perf_counter()
                try:
                    return real(seeds, shape)
                finally:
                    noise["s"] += time.perf_counter() - t

            before = ctx.teacher.evaluations
            rayflow_targets._noise_from_seeds = counted
            try:
                sync(self.device)
                t0 = time.perf_counter()
                rows = build(ctx, method)
                sync(self.device)
                wall = time.perf_counter() - t0
            finally:
                rayflow_targets._noise_from_seeds = real
            nfe = ctx.teacher.evaluations - before
            rate = nfe / wall if wall > 0 else None
            return {"pool_size": rows, "teacher_nfe": nfe, "nfe_per_instance": round(nfe / rows, 2),
                    "pool_s": round(wall, 3), "teacher_nfe_per_s": None if rate is None else round(rate, 1),
                    "over_inference": None if (rate is None or not self.inference_rate)
                    else round(rate / self.inference_rate, 3),
                    "host_noise_s": round(noise["s"], 6), "samples_per_s": round(rows / wall, 1),
                    "bare_samples_per_s": None,
                    "roofline_share": None if rate is None else self.roofline(rate, self.inference_flops or 0.0)}

        self.record("teacher pool: fixed cost (load, compile, capture)", fixed)
        for label, method in methods(size):
            self.record(f"teacher pool: {label}", lambda label=label, method=method: timed(label, method))

    def row_profile(self, compile_mode: str = "default") -> None:
        """torch.profiler over a few steps of the old-style eager step and of the Trainer's step (teacher loss);
        ``compile_mode="reduce-overhead"``: the Trainer's step replayed from CUDA graphs only (row ``profile-graphs``:
        does the host still take longer than the GPU?)."""
        from torch.profiler import profile

        model_cfg = ModelConfig.from_dict(self.teacher_config["model"])
        schedule = VPSchedule.from_config(self.teacher_config["schedule"])
        steps = 1 if self.tiny else 10
        activities = self.activities()

        def objective() -> EpsilonObjective:
            return EpsilonObjective(self.dataset.x, self.dataset.labels, schedule, self.batch, label_dropout=0.1,
                                    num_classes=model_cfg.num_classes)

        def old_style() -> dict[str, Any]:
            """The step as it was: eager fp32 weights under autocast, foreach AdamW, EMA dicts rebuilt per step,
            the loss and gradient norm read on the host every step."""
            torch.manual_seed(0)
            model = build_model(model_cfg).to(self.device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
            ema_model = copy.deepcopy(model).requires_grad_(False)
            obj = objective()

            def step(k: int) -> None:
                gen = torch.Generator(device=self.device).manual_seed(k)
                with autocast(self.device, self.bf16):
                    loss = obj(model, k, gen).loss
                float(loss.detach())
                loss.backward()
                float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
                opt.step()
                opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    params, shadow = dict(model.named_parameters()), dict(ema_model.named_parameters())
                    names = list(params)
                    torch._foreach_lerp_([shadow[n] for n in names], [params[n].detach() for n in names], 0.001)

            for k in range(self.warmup):
                step(k)
            sync(self.device)
            with profile(activities=activities) as prof:
                for k in range(self.warmup, self.warmup + steps):
                    step(k)
                sync(self.device)
            return profile_summary(prof, "old-style eager step", steps, self.device)

        def new_style() -> dict[str, Any]:
            state: dict[str, Any] = {}
            timer = StepTimer(self.warmup, steps)
            timer.hook = profiler_hook(self.warmup, steps, self.device, activities, state)
            Trainer.callbacks.append(timer)
            try:
                shutil.rmtree(self.out / "profile-training", ignore_errors=True)
                torch.manual_seed(0)
                Trainer(build_model(model_cfg), objective(),
                        self.train_config(self.warmup + steps + 1, 3e-4, compile_mode),
                        self.out / "profile-training", {"kind": "speed-profile"}).train()
            finally:
                Trainer.callbacks.remove(timer)
            require("prof" in state, "the profiler did not run")
            graphs = timer.trainer is not None and (timer.trainer.cuda_graphs or timer.trainer.step_graph)
            whole = timer.trainer is not None and timer.trainer.step_graph
            fell_back = ", CUDA graphs asked for: fell back" if compile_mode != "default" else ""
            suffix = ", whole-step CUDA graph" if whole else ", CUDA graphs" if graphs else fell_back
            label = "Trainer step (" + ("torch.compile, fused AdamW, channels-last, bf16" if self.compile
                                        else "eager, CPU") + suffix + ")"
            return {**profile_summary(state["prof"], label, steps, self.device), "compile_mode": compile_mode,
                    "cuda_graphs": graphs}

        if compile_mode == "default":
            self.record("old-style eager step", old_style, key="profile")
            self.record("Trainer step", new_style, key="profile")
        else:
            self.record("Trainer step, CUDA graphs", new_style, key="profile")

    def run(self, rows: list[str]) -> None:
        self.prepare()
        if "inference" in rows or "teacher-pool" in rows or any(r in METHODS for r in rows):
            self.record("teacher inference, 1 NFE", self.row_inference)
        if "teacher-pool" in rows:
            self.pool_rows()
        if "teacher" in rows:
            self.record("teacher training", self.row_teacher)
        if "teacher-graphs" in rows:
            self.record("teacher training, CUDA graphs", lambda: self.row_teacher(self.args.graphs_mode))
        for name in METHODS:
            if name in rows:
                self.record(f"{name} student training", lambda name=name: self.row_method(name))
        if "profile" in rows:
            self.row_profile()
        if "profile-graphs" in rows:
            self.row_profile(self.args.graphs_mode)


def graph_fields(trainer: Trainer) -> dict[str, Any]:
    """How a Trainer row's step ran: the network's CUDA graphs, or the whole step as one graph (captured at which
    step, or why the capture failed)."""
    fields: dict[str, Any] = {"cuda_graphs": bool(trainer.cuda_graphs or trainer.step_graph),
                              "step_graph": bool(trainer.step_graph)}
    for key in ("step_graph_captured_at", "step_graph_failed", "step_graph_failed_traceback"):
        if key in trainer.stats:
            fields[key] = trainer.stats[key]
    return fields


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "fashion-mnist"))
    p.add_argument("--teacher", default=str(TEACHER))
    p.add_argument("--out", default="runs/training-speed", help="scratch directory for the runs' files")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "training_speed.json"))
    p.add_argument("--rows", default="all", help=f"comma-separated subset of {', '.join(ROWS)} (default all)")
    p.add_argument("--warmup", type=int, default=30, help="Trainer steps before timing (compilation included)")
    p.add_argument("--measure", type=int, default=150, help="Trainer steps timed")
    p.add_argument("--windows", type=int, default=5,
                   help="timed steps split into this many windows; a row's rate is the median window's (robust to a "
                        "window in which something else took the shared host)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="also profile this many Trainer steps of every training row, after the timed ones (each row "
                        "gets a 'profile' entry: CPU/GPU ms, launches, the top GPU ops)")
    p.add_argument("--tiny", action="store_true", help="a tiny configuration, to check the script end to end")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (only sensible with --tiny)")
    p.add_argument("--pool-size", type=int, default=60000,
                   help="instances per pool of the teacher-pool rows (default 60000: the issue's eps_mu target)")
    p.add_argument("--gen-batch", default="auto",
                   help="rows per teacher call for pools (distill's gen_batch): auto (2048 on CUDA) or an integer")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of an existing --results file (a run split with --rows over several calls)")
    p.add_argument("--graphs-mode", default="reduce-overhead", choices=("reduce-overhead", "max-autotune"),
                   help="torch.compile mode of the CUDA-graph rows (-graphs, profile-graphs): Trainer and bare loop")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True (cuDNN times its algorithms once per shape)")
    p.add_argument("--step-graph", default="auto", choices=("auto", "no"),
                   help="TrainConfig.step_graph of the Trainer rows: auto = the whole step captured as one CUDA graph "
                        "where it can be (the -graphs rows of capturable objectives), no = the network's graphs only")
    p.add_argument("--no-bare", action="store_true",
                   help="skip the bare loops (rows then have only the Trainer's rate)")
    p.add_argument("--channels-last", default="auto", choices=("auto", "yes", "no"),
                   help="TrainConfig.channels_last of every training row (the bare loop follows the Trainer)")
    p.add_argument("--layout-optimization", default="force", choices=("force", "inductor"),
                   help="TrainConfig.layout_optimization of every training row (the bare loop follows the Trainer)")
    p.add_argument("--kernel-tuning", default="none", choices=KERNEL_TUNING_CHOICES,
                   help="TrainConfig.kernel_tuning of every row (the bare loop and the compiled teacher follow it)")
    p.add_argument("--trace", default=None,
                   help="with --profile-steps: also write each row's profile as a Chrome trace in this directory")
    p.add_argument("--timing-lock", default=None,
                   help="a lock file shared by several processes measuring on one GPU: each times its steps alone")
    p.add_argument("--ready", type=int, default=1,
                   help="with --timing-lock: wait until this many processes reach their timed steps before the first")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds --ready waits at most")
    p.add_argument("--batch", type=int, default=256,
                   help="training batch (the issue's rows: 256; a larger one tells whether a step is bound by the "
                        "GPU or by the host)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rows = list(ROWS) if args.rows == "all" else [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = sorted(set(rows) - set(ROWS))
        require(not unknown, f"--rows: unknown row(s) {unknown}; expected {', '.join(ROWS)}")
        require(args.warmup >= 1 and args.measure >= 1, "--warmup and --measure must be >= 1")
        require(args.batch >= 1, f"--batch must be >= 1, got {args.batch}")
        require(args.pool_size >= 1, f"--pool-size must be >= 1, got {args.pool_size}")
        if args.gen_batch != "auto":
            require(args.gen_batch.isdigit() and int(args.gen_batch) >= 1,
                    f"--gen-batch must be auto or an integer >= 1, got {args.gen_batch!r}")
            args.gen_batch = int(args.gen_batch)
        require(Path(args.data).is_dir(), f"--data {args.data}: no such directory (the Fashion-MNIST IDX files)")
        require(args.tiny or (Path(args.teacher) / "config.json").is_file(),
                f"--teacher {args.teacher}: no teacher directory (config.json) there")
        require(torch.cuda.is_available() or args.allow_cpu,
                "no GPU found: this benchmark measures one GPU (use --tiny --allow-cpu for a dry run)")
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if args.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        Bench(args).run(rows)
    except RayflowError as exc:
        print(f"training_speed: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
