#!/usr/bin/env python
"""Multi-GPU scaling of rayflow's distillation under ``accelerate launch`` (issue #16).

One script, two roles:

* **worker** (``--worker``), run under ``accelerate launch --num_processes N``: measures, at this world size,
  (a) ``fm``: the Fashion-MNIST benchmark student trained on each method's objective (the rows of
  ``benchmarks/training_speed.py``, batch 256 per process, bf16, compiled) - samples/s over all processes and peak
  memory per GPU; (b) ``sd``: the SD1.5-configuration UNet with a rank-64 LoRA (random weights, 64x64x4 latents,
  batch 32 per process; the builder and RayFlow-Trainer loop of ``benchmarks/sd_lora_step.py``); (c) ``pairs``:
  each method's teacher-side pool (reflow pairs, PeRFlow window pairs, RayFlow's eps_mu) built into a fresh
  cache whose shards are split over the ranks (shard ``i`` on rank ``i % N``) - instances/s from a barrier
  before ``distill`` to the start of training (every rank has then read every shard). Rank 0 writes the rows
  to ``--frag`` as they finish.
* **driver** (the default): launches the workers for each ``--num-processes`` (``accelerate launch``, NCCL with
  NVLink multicast off), merges their rows into ``--results`` (under the key ``gpu``, or ``cpu`` for a CPU run,
  which measures nothing about GPUs), and computes the scaling efficiency ``rate(2) / (2 rate(1))`` where both
  are present. The ``resume`` part is the driver's alone: (d) a 2-process RayFlow distillation is run
  uninterrupted; the same run again with rank 1 killed (SIGKILL) just after its mid-run checkpoint, then
  relaunched: it must resume and end with the same weights; and 1-process runs with the same global batch
  (seeds 0..k-1) give the seed noise that the 2-process result's distance to them is compared with (distance:
  the mean squared difference of 4-step samples from one fixed set of noises).

    python benchmarks/scaling.py --num-processes 1                       # 1 GPU baseline, ~3 min on an H200
    python benchmarks/scaling.py --num-processes 2 --append              # 2 GPUs (fm, sd, pairs), same results file
    python benchmarks/scaling.py --num-processes 2 --parts resume --append   # (d) on 2 GPUs
    python benchmarks/scaling.py --tiny --allow-cpu        # CPU/gloo dry run of every part, 1 and 2 processes

A row that fails is recorded with its error and the rest go on; results are written after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import sd_lora_step  # noqa: E402  (the SD1.5 UNet + LoRA builder and its RayFlow-Trainer loop)
import training_speed  # noqa: E402  (the Fashion-MNIST rows and their step timer)
from rayflow.checkpoint import (  # noqa: E402
    load_safetensors,
    load_safetensors_with_metadata,
    read_json,
    write_json_atomic,
)
from rayflow.errors import RayflowError, require  # noqa: E402

PARTS = ("fm", "sd", "pairs", "resume")
WORKER_PARTS = ("fm", "sd", "pairs")
#: the issue's targets for the scaling efficiency on 2 GPUs
TARGETS = {"fm": 0.80, "sd": 0.90, "pairs": 0.95}
#: the pools of the pairs part: (method, options); the default cut of reflow / PeRFlow pools is 4096 items, so an
#: 8192-item pool is two shards, one per rank on 2 GPUs (RayFlow's cut is its cache_shard_size option)
PAIR_METHODS: dict[str, tuple[str, dict[str, str]]] = {
    "reflow": ("reflow", {"pool_size": "8192"}),
    "perflow": ("perflow", {"pool_size": "8192"}),
    "rayflow": ("rayflow", {"pool_size": "8192", "cache_shard_size": "1024"}),
}
#: tiny pools for the CPU dry run: RayFlow's is cut into four shards, so the ranks split it; the reflow and PeRFlow
#: pools are one shard each (their 4096-item cut would cost minutes on a CPU), which only rank 0 computes
TINY_PAIR_OPTIONS: dict[str, dict[str, str]] = {
    "reflow": {"pool_size": "64", "pair_steps": "2"},
    "perflow": {"pool_size": "64", "solver_steps": "2"},
    "rayflow": {"pool_size": "128", "cache_shard_size": "32", "teacher_steps": "2"},
}
#: NVLink multicast stays off (the device notes: a program using it can take the host's GPUs out of service)
SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# ---------------------------------------------------------------------- shared helpers
def versions() -> dict[str, str]:
    return sd_lora_step.versions()


def hardware() -> dict[str, Any]:
    hw: dict[str, Any] = {"cpu_count": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        hw.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                  gpus_on_host=torch.cuda.device_count())
    else:
        hw["gpu"] = None
    return hw


def dataset_spec(args: argparse.Namespace) -> str:
    return f"fashion-mnist:path={args.data},pad=32" + (",limit=256" if args.tiny else "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def method_options(name: str, options: dict[str, str], tiny: bool) -> dict[str, str]:
    """``options`` for a full run; with ``--tiny`` the pool options are the method's own ``tiny_options``."""
    from rayflow.methods import get_method

    if not tiny:
        return dict(options)
    kept = {k: v for k, v in options.items() if k not in ("pool_size", "cache_size", "num_pairs")}
    return {**kept, **get_method(name).tiny_options}


# ---------------------------------------------------------------------- the worker (one launch, one world size)
class Worker:
    """Runs the requested parts at this launch's world size; rank 0 writes ``<frag>/np<N>.json`` after each row."""

    def __init__(self, args: argparse.Namespace) -> None:
        from rayflow.training import distributed_state, launch_accelerator

        self.args = args
        self.state = distributed_state()
        self.world, self.rank = self.state.num_processes, self.state.process_index
        self.device = self.state.device
        self.cuda = self.device.type == "cuda"
        self.mp = "bf16" if self.cuda else "no"
        # the same precision at every world size (the launcher's --mixed_precision is not relied on)
        self.acc = launch_accelerator(self.mp)
        self.scratch = Path(args.scratch) / f"np{self.world}"
        self.frag = Path(args.frag) / f"np{self.world}.json"
        self.doc: dict[str, Any] = {"processes": self.world, "hardware": hardware(), "versions": versions(),
                                    "rows": []}
        self._dataset = None

    # -------------------------------------------------------------- collectives
    def barrier(self) -> None:
        self.state.wait_for_everyone()

    def gather(self, value: float) -> list[float]:
        """``value`` of every rank, in rank order."""
        if self.world == 1:
            return [float(value)]
        from accelerate.utils import gather_object

        return [float(v) for v in gather_object([float(value)])]

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peaks(self) -> list[float] | None:
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else 0.0
        every = self.gather(peak)
        return [round(p, 2) for p in every] if self.cuda else None

    def fresh_dir(self, path: Path) -> Path:
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        self.barrier()
        return path

    @property
    def dataset(self):
        if self._dataset is None:
            from rayflow.data import load_dataset

            self._dataset = load_dataset(dataset_spec(self.args))
        return self._dataset

    def record(self, part: str, what: str, fn) -> None:
        t0 = time.time()
        if self.rank == 0:
            print(f"== [{self.world} process(es)] {part}: {what}", flush=True)
        try:
            row = {"part": part, "what": what, "processes": self.world, **fn()}
        except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
            traceback.print_exc()
            row = {"part": part, "what": what, "processes": self.world, "error": f"{type(exc).__name__}: {exc}"}
        row["wall_s"] = round(time.time() - t0, 1)
        row["host"] = socket.gethostname()
        if self.rank == 0:
            self.doc["rows"] = [r for r in self.doc["rows"] if (r["part"], r["what"]) != (part, what)] + [row]
            write_json_atomic(self.doc, self.frag)
            print(f"   {json.dumps(row)}", flush=True)

    def train_config(self, steps: int, batch: int, **kw: Any):
        from rayflow.training import TrainConfig

        return TrainConfig(**{"max_steps": steps, "batch_size": batch, "lr": 1e-4, "ema_decay": 0.999,
                              "grad_clip": 1.0, "checkpoint_every": 0, "log_every": max(1, steps // 2),
                              "progress": False, "mixed_precision": self.mp, "compile": "auto", **kw})

    # -------------------------------------------------------------- (a) the Fashion-MNIST student
    def fm_row(self, name: str) -> dict[str, Any]:
        from rayflow.distillation import distill
        from rayflow.methods import get_method
        from rayflow.training import Trainer

        method_name, options = training_speed.METHODS[name]
        method = get_method(method_name).from_options(method_options(method_name, options, self.args.tiny))
        warmup, measure = self.args.warmup, self.args.measure
        # ProReflow splits the steps over its stages: its last stage must still reach warm-up + measure
        steps = (warmup + measure) * (3 if method_name == "proreflow" else 1)
        out = self.fresh_dir(self.scratch / "fm" / name)
        # teacher pools are cached per method (the RayFlow rows share theirs); ProReflow's later stages pool pairs
        # of the student just trained, which differs from run to run, so its cache starts empty every time
        cache = self.scratch / "fm-cache" / method_name
        if method_name == "proreflow":
            self.fresh_dir(cache)
        timer = training_speed.StepTimer(warmup, measure)
        Trainer.callbacks.append(timer)
        self.reset_peak()
        try:
            distill(method, self.args.teacher, self.dataset, out, self.train_config(steps, self.args.fm_batch),
                    cache_dir=cache, progress=False, accelerator=self.acc)
        finally:
            Trainer.callbacks.remove(timer)
        require(timer.rate is not None, "the step timer saw too few steps")
        rates = self.gather(timer.rate)  # per process; DDP steps in lockstep, so the slowest rank sets the pace
        return {"per_gpu_batch": self.args.fm_batch, "global_batch": self.args.fm_batch * self.world,
                "samples_per_s": round(min(rates) * self.world, 1), "per_rank_samples_per_s": [round(r, 1)
                                                                                             for r in rates],
                "peak_memory_gib_per_gpu": self.peaks(), "warmup_steps": warmup, "measured_steps": measure}

    # -------------------------------------------------------------- (b) the SD1.5 UNet with a LoRA
    def sd_row(self) -> dict[str, Any]:
        from rayflow.schedules import VPSchedule

        a = self.args
        tiny = a.tiny
        dtype = torch.bfloat16 if self.cuda else torch.float32
        cfg = sd_lora_step.TINY_UNET if tiny else sd_lora_step.SD15_UNET
        shape = (cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
        self.reset_peak()
        base = sd_lora_step.build_base(tiny, self.device, dtype, a.seed)
        unet = sd_lora_step.with_lora(base, a.lora_rank, a.seed + 3)
        del base
        g = torch.Generator().manual_seed(a.seed + 1)
        text_len = 8 if tiny else sd_lora_step.TEXT_LEN
        embeds = torch.randn(65, text_len, cfg["cross_attention_dim"], generator=g).to(self.device, dtype)
        pools = sd_lora_step.Pools(256, shape, 64, self.device, a.seed + 2)
        ns = SimpleNamespace(warmup=a.sd_warmup, steps=a.sd_steps, batch_size=a.sd_batch, dtype=dtype, seed=a.seed)
        out = self.fresh_dir(self.scratch / "sd")
        res = sd_lora_step.run_rayflow(unet, pools, embeds, VPSchedule.from_name("scaled_linear"), ns, self.device,
                                       a.sd_compile == "yes", out)
        rates = self.gather(res["samples_per_s"])
        trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        return {"per_gpu_batch": a.sd_batch, "global_batch": a.sd_batch * self.world, "latent_shape": list(shape),
                "lora_rank": a.lora_rank, "trainable_parameters": trainable, "compile": a.sd_compile == "yes",
                "samples_per_s": round(min(rates) * self.world, 2),
                "per_rank_samples_per_s": [round(r, 2) for r in rates],
                "peak_memory_gib_per_gpu": self.peaks(), "warmup_steps": a.sd_warmup, "measured_steps": a.sd_steps}

    # -------------------------------------------------------------- (c) pair and eps_mu generation
    def pairs_row(self, name: str) -> dict[str, Any]:
        from rayflow.distillation import distill
        from rayflow.methods import get_method
        from rayflow.training import Trainer

        method_name, options = PAIR_METHODS[name]
        options = {**options, **TINY_PAIR_OPTIONS[name]} if self.args.tiny else options
        method = get_method(method_name).from_options(options)
        cache = self.fresh_dir(self.scratch / "pairs-cache" / name)
        out = self.fresh_dir(self.scratch / "pairs" / name)
        marks: dict[str, float] = {}

        def pools_done(trainer: Trainer, event: str, step: int) -> None:
            if event == "start" and "t1" not in marks:
                self.sync()
                marks["t1"] = time.perf_counter()

        Trainer.callbacks.append(pools_done)
        self.reset_peak()
        try:
            self.barrier()
            t0 = time.perf_counter()
            # one training step: the Trainer's start marks the end of the pool stage (every shard built and read)
            distill(method, self.args.teacher, self.dataset, out, self.train_config(1, 4, compile="no"),
                    cache_dir=cache, progress=False, accelerator=self.acc)
        finally:
            Trainer.callbacks.remove(pools_done)
        require("t1" in marks, "the Trainer never started")
        seconds = max(self.gather(marks["t1"] - t0))
        items = int(options["pool_size"])
        shards = sorted(p.name for p in cache.rglob("shard-*.safetensors"))
        return {"instances": items, "shards": len(shards), "seconds": round(seconds, 3),
                "instances_per_s": round(items / seconds, 1), "peak_memory_gib_per_gpu": self.peaks(),
                "cache": str(cache)}

    def run(self) -> int:
        for part in self.args.parts:
            if part == "fm":
                for name in self.args.methods:
                    self.record("fm", f"{name} student training", lambda name=name: self.fm_row(name))
            elif part == "sd":
                self.record("sd", f"SD1.5 UNet + rank-{self.args.lora_rank} LoRA (RayFlow)", self.sd_row)
            elif part == "pairs":
                for name in self.args.pair_methods:
                    self.record("pairs", f"{name} pool", lambda name=name: self.pairs_row(name))
        self.barrier()
        return 0


# ---------------------------------------------------------------------- the resume run (one launch of it)
def resume_worker(args: argparse.Namespace) -> int:
    """One RayFlow distillation for part (d): ``--batch-size`` per process, ``--seed``; with ``--kill-at-step K``
    process ``--kill-rank`` kills itself (SIGKILL) once step ``K`` is done."""
    from rayflow.distillation import distill
    from rayflow.methods import get_method
    from rayflow.training import TrainConfig, Trainer, distributed_state, launch_accelerator

    state = distributed_state()
    mp = "bf16" if state.device.type == "cuda" else "no"
    if state.device.type == "cuda":
        # deterministic kernels (cuDNN's convolution backward may otherwise accumulate in another order), so the
        # resumed run can match the uninterrupted one bit for bit and a mismatch means a resume bug
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    acc = launch_accelerator(mp)
    options = method_options("rayflow", {"pool_size": "4096", "cache_shard_size": "1024"}, args.tiny)
    method = get_method("rayflow").from_options(options)
    steps = args.resume_steps
    # eager (compile="no"): a compiled run matches its resume only to rounding, an eager one bit for bit
    train = TrainConfig(max_steps=steps, batch_size=args.batch_size, lr=1e-4, seed=args.seed,
                        checkpoint_every=steps // 2, log_every=max(1, steps // 4), progress=False,
                        mixed_precision=mp, compile="no")
    if args.kill_at_step:
        def kill(trainer: Trainer, event: str, step: int) -> None:
            if event == "step" and step == args.kill_at_step and state.process_index == args.kill_rank:
                print(f"scaling: killing rank {args.kill_rank} after step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        Trainer.callbacks.append(kill)
    from rayflow.data import load_dataset

    distill(method, args.teacher, load_dataset(dataset_spec(args)), args.resume_run, train,
            cache_dir=Path(args.scratch) / "resume-cache", progress=False, accelerator=acc)
    state.wait_for_everyone()
    return 0


# ---------------------------------------------------------------------- the driver
class Driver:
    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.args = args
        self.cuda = torch.cuda.is_available()
        self.key = ("gpu-tiny" if args.tiny else "gpu") if self.cuda else "cpu"
        self.results = Path(args.results)
        self.scratch = Path(args.scratch)
        doc = read_json(self.results) if self.results.is_file() else {}
        self.doc: dict[str, Any] = doc
        entry = doc.get(self.key, {}) if args.append else {}
        command = "python benchmarks/scaling.py " + " ".join(argv)
        self.entry: dict[str, Any] = {
            "command": "; ".join(x for x in (entry.get("command"), command) if x),
            "hardware": hardware(), "versions": versions(), "rows": list(entry.get("rows", [])),
            "scaling": [], "resume": entry.get("resume"),
        }
        if self.key == "cpu":
            self.entry["note"] = ("CPU/gloo dry run with tiny models on a shared CPU: checks that every part runs "
                                  "on 1 and 2 processes; its rates and efficiencies say nothing about GPUs")

    def write(self) -> None:
        self.entry["scaling"] = scaling_table(self.entry["rows"])
        self.doc[self.key] = self.entry
        write_json_atomic(self.doc, self.results)

    def env(self) -> dict[str, str]:
        env = {**os.environ, **SAFE_NCCL_ENV}
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO / "src"), env.get("PYTHONPATH", "")) if x)
        if not self.cuda:
            env["OMP_NUM_THREADS"] = "1"  # two processes on a shared CPU: one thread each
        env.pop("WORLD_SIZE", None)
        return env

    def launch(self, n: int, extra: list[str], timeout: float) -> tuple[int, float]:
        """``accelerate launch`` this script with ``extra`` on ``n`` processes; returns (exit code, seconds)."""
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
        if n > 1:
            cmd.append("--multi_gpu")  # accelerate's torchrun path (gloo on a CPU, NCCL on GPUs)
        cmd += [str(Path(__file__).resolve()), *extra]
        print(f"scaling: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        try:
            code = subprocess.run(cmd, env=self.env(), timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
        return code, time.time() - t0

    def common(self, seed: bool = True) -> list[str]:
        a = self.args
        out = ["--data", a.data, "--teacher", a.teacher, "--scratch", str(self.scratch)]
        if seed:
            out += ["--seed", str(a.seed)]
        if a.tiny:
            out.append("--tiny")
        if a.allow_cpu:
            out.append("--allow-cpu")
        return out

    def prepare_teacher(self) -> None:
        """With ``--tiny``: a tiny teacher of the benchmark's kind (one training step), made once, here."""
        if not self.args.tiny:
            return
        from rayflow.distillation import train_teacher
        from rayflow.models import ModelConfig
        from rayflow.training import TrainConfig

        teacher = self.scratch / "tiny-teacher"
        if not (teacher / "model.safetensors").is_file():
            train_teacher(dataset_spec(self.args), teacher, TrainConfig(
                max_steps=1, batch_size=4, lr=1e-3, checkpoint_every=0, log_every=0, progress=False),
                model=ModelConfig(kind="unet", sample_shape=(1, 32, 32), channels=(4, 8), layers_per_block=1))
        self.args.teacher = str(teacher)

    def run_workers(self) -> None:
        a = self.args
        parts = [p for p in a.parts if p in WORKER_PARTS]
        if not parts:
            return
        for n in a.num_processes:
            frag_dir = self.scratch / "fragments"
            frag = frag_dir / f"np{n}.json"
            if frag.exists():
                frag.unlink()
            extra = ["--worker", "--parts", ",".join(parts), "--frag", str(frag_dir), "--methods", ",".join(a.methods),
                     "--pair-methods", ",".join(a.pair_methods),
                     "--warmup", str(a.warmup), "--measure", str(a.measure), "--fm-batch", str(a.fm_batch),
                     "--sd-batch", str(a.sd_batch), "--lora-rank", str(a.lora_rank), "--sd-steps", str(a.sd_steps),
                     "--sd-warmup", str(a.sd_warmup), "--sd-compile", a.sd_compile, *self.common()]
            code, seconds = self.launch(n, extra, a.timeout)
            rows = read_json(frag).get("rows", []) if frag.is_file() else []
            if code != 0:
                rows.append({"part": "launch", "what": f"{n}-process launch", "processes": n,
                             "error": f"the launch exited with {code} after {seconds:.0f} s"})
            for row in rows:
                self.entry["rows"] = [r for r in self.entry["rows"] if (r.get("part"), r.get("what"),
                                      r.get("processes")) != (row.get("part"), row.get("what"), n)] + [row]
            self.compare_caches()
            self.write()

    def compare_caches(self) -> None:
        """A pool built by N processes must hold the very shards one process builds (shard ``i`` depends on
        ``(seed, i)`` alone): compared file by file where both caches are on this machine."""
        ones = {r["what"]: r for r in self.entry["rows"] if r.get("part") == "pairs" and r.get("processes") == 1
                and "cache" in r}
        for r in self.entry["rows"]:
            one = ones.get(r.get("what"))
            if r.get("part") != "pairs" or r.get("processes") == 1 or one is None or "cache" not in r:
                continue
            mine, theirs = Path(r["cache"]), Path(one["cache"])
            if not (mine.is_dir() and theirs.is_dir()):
                continue
            names = sorted(p.relative_to(mine) for p in mine.rglob("shard-*.safetensors"))
            other = sorted(p.relative_to(theirs) for p in theirs.rglob("shard-*.safetensors"))
            r["shards_identical_to_1_process"] = bool(names) and names == other and all(
                same_shard(mine / x, theirs / x) for x in names)

    # -------------------------------------------------------------- (d) kill and resume
    def run_resume(self) -> None:
        a = self.args
        root = self.scratch / "resume"
        shutil.rmtree(root, ignore_errors=True)
        steps, batch = a.resume_steps, a.resume_batch
        kill_at = steps // 2 + 1  # just after the mid-run checkpoint
        res: dict[str, Any] = {"method": "rayflow", "steps": steps, "per_process_batch_2proc": batch,
                               "batch_1proc": 2 * batch, "kill": f"rank 1, SIGKILL after step {kill_at}",
                               "checkpoint_every": steps // 2}
        self.entry["resume"] = res

        def run(n: int, out: Path, seed: int, b: int, kill: bool = False) -> tuple[int, float]:
            extra = ["--resume-run", str(out), "--seed", str(seed), "--batch-size", str(b), "--resume-steps",
                     str(steps), *self.common(seed=False)]
            if kill:
                extra += ["--kill-at-step", str(kill_at), "--kill-rank", "1"]
                print("scaling: this launch kills its rank 1 on purpose: the launcher's failure report is expected",
                      flush=True)
            return self.launch(n, extra, a.timeout)

        try:
            code, res["uninterrupted_s"] = run(2, root / "two", 0, batch)
            require(code == 0, f"the uninterrupted 2-process run exited with {code}")
            code, res["killed_launch_s"] = run(2, root / "resumed", 0, batch, kill=True)
            res["killed_launch_exit_code"] = code
            require(code != 0, "the launch with a killed rank exited 0: the kill did not happen")
            ckpts = sorted(p.name for p in (root / "resumed" / "checkpoints").glob("step-*"))
            res["checkpoints_after_kill"] = ckpts
            res["final_model_after_kill"] = (root / "resumed" / "model.safetensors").exists()
            code, res["resumed_s"] = run(2, root / "resumed", 0, batch)
            require(code == 0, f"the resumed 2-process run exited with {code}")
            two = load_safetensors(root / "two" / "model.safetensors")
            again = load_safetensors(root / "resumed" / "model.safetensors")
            diff = max(float((two[k].float() - again[k].float()).abs().max()) for k in two)
            res["resumed_max_abs_weight_diff"] = diff
            res["resumed_bit_identical"] = all(torch.equal(two[k], again[k]) for k in two)
            self.write()
            ones = []
            for seed in range(a.resume_seeds):
                code, _ = run(1, root / f"one-seed{seed}", seed, 2 * batch)
                require(code == 0, f"the 1-process run with seed {seed} exited with {code}")
                ones.append(root / f"one-seed{seed}")
            res.update(compare_to_seed_noise(root / "two", ones, 64 if a.tiny else 512))
        except Exception as exc:  # noqa: BLE001 - recorded; the results written so far stay
            traceback.print_exc()
            res["error"] = f"{type(exc).__name__}: {exc}"
        self.write()

    def run(self) -> int:
        self.prepare_teacher()
        self.write()
        self.run_workers()
        if "resume" in self.args.parts:
            self.run_resume()
        self.write()
        print(json.dumps({"scaling": self.entry["scaling"], "resume": self.entry["resume"]}, indent=1))
        failed = [r for r in self.entry["rows"] if "error" in r] + (
            [1] if self.entry.get("resume") and "error" in self.entry["resume"] else [])
        return 1 if failed else 0


def same_shard(a: Path, b: Path) -> bool:
    """Two cache shards hold the same tensors, bit for bit, and the same metadata (the files' bytes may differ in
    the order their headers list them)."""
    ta, ma = load_safetensors_with_metadata(a)
    tb, mb = load_safetensors_with_metadata(b)
    return ma == mb and ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)


def samples(model_dir: Path, n: int) -> torch.Tensor:
    """4-step samples of a student from fixed noises and labels (the same for every run compared)."""
    from rayflow.distillation import load_generator

    gen = load_generator(model=str(model_dir), device="cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn(n, *gen.sample_shape, generator=g)
    cond = torch.arange(n) % gen.num_classes if gen.num_classes else None
    return gen.generate(noise, 4, cond).float()


def compare_to_seed_noise(two: Path, ones: list[Path], n: int) -> dict[str, Any]:
    """The 2-process result against 1-process results with the same global batch and seeds 0..k-1.

    ``d(u, v)`` = mean squared difference of 4-step samples from the same noises. The 2-process run counts as
    "the same within seed noise" when its mean distance to the 1-process runs is at most 1.5 times the mean
    distance between two 1-process runs of different seeds (a 2-process run draws other batches than any
    1-process run, so it is itself one more seed).
    """
    x2 = samples(two, n)
    xs = [samples(p, n) for p in ones]
    cross = [float((x2 - x).square().mean()) for x in xs]
    pairs = [float((xs[i] - xs[j]).square().mean()) for i in range(len(xs)) for j in range(i + 1, len(xs))]
    ratio = statistics.fmean(cross) / statistics.fmean(pairs) if pairs and statistics.fmean(pairs) > 0 else None
    return {"sample_distance_2proc_to_1proc_seeds": cross, "sample_distance_between_1proc_seeds": pairs,
            "distance_ratio": ratio, "within_seed_noise": ratio is not None and ratio <= 1.5,
            "eval_samples": n}


def scaling_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Efficiency ``rate(N) / (N rate(1))`` for every row measured on 1 and on N > 1 processes."""
    rate_key = {"pairs": "instances_per_s"}
    by: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for r in rows:
        if "error" in r or r.get("part") not in TARGETS:
            continue
        by.setdefault((r["part"], r["what"]), {})[int(r["processes"])] = r
    table = []
    for (part, what), runs in by.items():
        if 1 not in runs:
            continue
        key = rate_key.get(part, "samples_per_s")
        for n, r in sorted(runs.items()):
            if n == 1:
                continue
            eff = r[key] / (n * runs[1][key])
            table.append({"part": part, "what": what, "processes": n, f"{key}_1": runs[1][key], f"{key}_{n}": r[key],
                          "efficiency": round(eff, 3), "target": TARGETS[part], "meets_target": eff >= TARGETS[part],
                          "same_host": runs[1].get("host") == r.get("host")})
    return table


# ---------------------------------------------------------------------- command line
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-processes", default="1,2", help="driver: the world sizes to launch (default 1,2)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--methods", default=",".join(training_speed.METHODS),
                   help="fm part: the Fashion-MNIST rows (training_speed.py's names)")
    p.add_argument("--pair-methods", default=",".join(PAIR_METHODS),
                   help=f"pairs part: the pools built (of {', '.join(PAIR_METHODS)})")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "fashion-mnist"))
    p.add_argument("--teacher", default=str(training_speed.TEACHER))
    p.add_argument("--scratch", default="runs/scaling", help="the runs' files and caches")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "scaling.json"))
    p.add_argument("--append", action="store_true", help="keep this device's earlier rows in --results")
    p.add_argument("--warmup", type=int, default=None, help="fm: untimed steps, compilation included (default 20)")
    p.add_argument("--measure", type=int, default=None, help="fm: timed steps (default 80)")
    p.add_argument("--fm-batch", type=int, default=None, help="fm: batch per process (default 256)")
    p.add_argument("--sd-batch", type=int, default=None, help="sd: batch per process (default 32)")
    p.add_argument("--lora-rank", type=int, default=None, help="sd: LoRA rank (default 64)")
    p.add_argument("--sd-steps", type=int, default=None, help="sd: timed steps (default 10)")
    p.add_argument("--sd-warmup", type=int, default=None, help="sd: untimed steps (default 3)")
    p.add_argument("--sd-compile", choices=("yes", "no"), default="no", help="sd: torch.compile the UNet")
    p.add_argument("--resume-steps", type=int, default=None, help="resume: steps of each run (default 200)")
    p.add_argument("--resume-batch", type=int, default=None, help="resume: batch per process of the 2-process run")
    p.add_argument("--resume-seeds", type=int, default=3, help="resume: 1-process runs (seeds 0..k-1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed to one launch")
    p.add_argument("--tiny", action="store_true", help="tiny models and pools: a dry run of the script")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (only sensible with --tiny)")
    # the roles a launch plays (set by the driver)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--frag", default=None, help=argparse.SUPPRESS)
    p.add_argument("--resume-run", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--kill-at-step", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--kill-rank", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    t = args.tiny

    def pick(value: int | None, full: int, tiny: int) -> int:
        return value if value is not None else (tiny if t else full)

    args.warmup, args.measure = pick(args.warmup, 20, 1), pick(args.measure, 80, 2)
    args.fm_batch, args.sd_batch = pick(args.fm_batch, 256, 4), pick(args.sd_batch, 32, 2)
    args.lora_rank = pick(args.lora_rank, 64, 4)
    args.sd_steps, args.sd_warmup = pick(args.sd_steps, 10, 2), pick(args.sd_warmup, 3, 1)
    args.resume_steps, args.resume_batch = pick(args.resume_steps, 200, 6), pick(args.resume_batch, 128, 4)
    return args


def check(args: argparse.Namespace) -> None:
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in args.parts if x not in PARTS]
    require(args.parts and not bad, f"--parts: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(PARTS)}")
    args.methods = [x.strip() for x in args.methods.split(",") if x.strip()]
    bad = [x for x in args.methods if x not in training_speed.METHODS]
    require(not bad, f"--methods: unknown {', '.join(bad)}; choose from {', '.join(training_speed.METHODS)}")
    args.pair_methods = [x.strip() for x in args.pair_methods.split(",") if x.strip()]
    bad = [x for x in args.pair_methods if x not in PAIR_METHODS]
    require(not bad, f"--pair-methods: unknown {', '.join(bad)}; choose from {', '.join(PAIR_METHODS)}")
    try:
        args.num_processes = [int(x) for x in args.num_processes.split(",") if x.strip()]
    except ValueError:
        raise RayflowError(f"--num-processes must be comma-separated integers, got {args.num_processes!r}") from None
    require(args.num_processes and all(n >= 1 for n in args.num_processes),
            f"--num-processes: world sizes must be >= 1, got {args.num_processes}")
    for name in ("warmup", "measure", "fm_batch", "sd_batch", "lora_rank", "sd_steps", "resume_batch"):
        require(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    require(args.sd_warmup >= 0, f"--sd-warmup must be >= 0, got {args.sd_warmup}")
    require(args.resume_steps >= 4 and args.resume_steps % 2 == 0,
            f"--resume-steps must be an even number >= 4, got {args.resume_steps}")
    require(args.resume_seeds >= 2, f"--resume-seeds must be >= 2 (seed noise needs two), got {args.resume_seeds}")
    require(Path(args.data).is_dir(), f"--data {args.data}: no such directory (the Fashion-MNIST IDX files)")
    require(args.tiny or (Path(args.teacher) / "config.json").is_file(),
            f"--teacher {args.teacher}: no teacher directory (config.json) there")
    require(torch.cuda.is_available() or args.allow_cpu,
            "no GPU found: this benchmark measures GPUs (use --tiny --allow-cpu for a CPU dry run)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        check(args)
        for key, value in SAFE_NCCL_ENV.items():
            os.environ[key] = value
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if args.resume_run:
            return resume_worker(args)
        if args.worker:
            require(args.frag is not None, "--worker needs --frag DIR")
            return Worker(args).run()
        return Driver(args, argv).run()
    except RayflowError as exc:
        print(f"rayflow: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
