"""The floor of one training step (issue #13): is the batch-256 step bound by the host or by the GPU?

The Fashion-MNIST teacher's network (the committed teacher's config, freshly initialised), its epsilon objective
on random data, batch 256, bf16 autocast, clipping, fused AdamW and an EMA, in variants timed one after another
in one process (run nothing else on the machine: host-bound rows are sensitive to it):

* ``base``: the bare loop of ``training_speed.py`` (network compiled with ``mode="reduce-overhead"``: forward and
  backward replayed from CUDA graphs, the optimizer, clipping and EMA eager), on ``models.to_channels_last``;
* ``base-plain``: the same on ``Module.to(memory_format=torch.channels_last)`` alone, without the layout fixes
  of ``models.speed.keep_channels_last`` (their effect, in the same run);
* ``step``: **the whole step captured as one CUDA graph** (network compiled with ``mode="default"``; objective,
  backward, clipping, a capturable fused AdamW with a tensor lr and the EMA inside the graph): per step the host
  only reseeds the generator and replays, so its time is the GPU's. ``base`` as fast as ``step`` means the
  ordinary step is bound by the GPU, not the host;
* ``step-eager``: the same capture of the uncompiled network.

Checks written with the rows: the generator's draws replayed from a graph equal eager draws for the same seed;
the ``step`` variants' first five losses and weights against eager steps from the same state. ``--profile``
adds each variant's kernels per step, kernel time, and the same-dtype copies and scatter-adds among them.

    python benchmarks/step_floor.py                                   # one H200: about 2 minutes
    python benchmarks/step_floor.py --variants step --kernel-tuning coordinate-descent   # tuned floor (~5 min)
    python benchmarks/step_floor.py --variants base,base-plain --profile
    python benchmarks/step_floor.py --tiny --allow-cpu               # a dry run on a CPU (no graphs, no compile)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from rayflow.checkpoint import read_json, write_json_atomic  # noqa: E402
from rayflow.models import ModelConfig, build_model, to_channels_last  # noqa: E402
from rayflow.models.speed import KERNEL_TUNING_CHOICES, compile_network  # noqa: E402
from rayflow.schedules import VPSchedule  # noqa: E402
from rayflow.training import EpsilonObjective  # noqa: E402
from training_speed import WindowClock  # noqa: E402  (the windowed timing of the Trainer rows)

TEACHER = REPO / "benchmarks" / "checkpoints" / "fashion-mnist-teacher"
VARIANTS = ("base", "base-plain", "step", "step-eager")
LR, EMA_WEIGHT, CLIP = 3e-4, 1e-3, 1.0


class Floor:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        self.batch = 8 if args.tiny else args.batch
        model_cfg = read_json(TEACHER / "config.json")["model"]
        if args.tiny:
            model_cfg = {**model_cfg, "channels": [8, 16, 16], "hidden": 32}
        self.model_cfg = ModelConfig.from_dict(model_cfg)
        shape = tuple(self.model_cfg.sample_shape)
        g = torch.Generator().manual_seed(0)
        n = 64 if args.tiny else 60000
        data = torch.rand(n, *shape, generator=g) * 2 - 1
        labels = torch.randint(0, self.model_cfg.num_classes, (n,), generator=g)
        self.objective = EpsilonObjective(data, labels, VPSchedule.from_config(read_json(TEACHER / "config.json")
                                                                               ["schedule"]),
                                          self.batch, label_dropout=0.1, num_classes=self.model_cfg.num_classes)
        torch.manual_seed(0)
        self.init = build_model(self.model_cfg)
        self.results = Path(args.results)
        self.doc: dict[str, Any] = {
            "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
            "hardware": {"cpu": platform.machine(), "python": platform.python_version(),
                         "gpu": torch.cuda.get_device_name() if self.cuda else None},
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda},
            "batch": self.batch, "warmup_steps": args.warmup, "measured_steps": args.measure,
            "kernel_tuning": args.kernel_tuning, "rows": []}

    def log(self, **row: Any) -> None:
        print(json.dumps(row), flush=True)
        self.doc["rows"].append(row)
        write_json_atomic(self.doc, self.results)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def autocast(self, cache: bool = True) -> Any:
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.cuda, cache_enabled=cache)

    def network(self, plain: bool) -> torch.nn.Module:
        model = copy.deepcopy(self.init).to(self.device).train()
        if plain:
            model.to(memory_format=torch.channels_last)
        else:
            to_channels_last(model)
        return model

    def compiled(self, model: torch.nn.Module, mode: str) -> torch.nn.Module:
        if not self.cuda:  # a dry run: compiling on a CPU takes minutes and says nothing about the GPU
            return model
        return compile_network(model, mode, force_layout=True, kernel_tuning=self.args.kernel_tuning)

    # ------------------------------------------------------------------ variants
    def base(self, plain: bool) -> tuple[Callable[[int], torch.Tensor], dict[str, Any]]:
        model = self.network(plain)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, **({"fused": True} if self.cuda else {}))
        ema = [p.detach().clone() for p in params]
        net = self.compiled(model, "reduce-overhead")
        gen = torch.Generator(device=self.device)

        def step(k: int) -> torch.Tensor:
            gen.manual_seed(k)
            if self.cuda:
                torch.compiler.cudagraph_mark_step_begin()
            loss = self.eager_step(net, params, opt, gen, k)
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, EMA_WEIGHT)
            return loss
        return step, {}

    def eager_step(self, net: torch.nn.Module, params: list[torch.Tensor], opt: torch.optim.Optimizer,
                   gen: torch.Generator, k: int) -> torch.Tensor:
        """The objective's loss, backward, clipping and the optimizer step; returns the detached loss."""
        with self.autocast():
            loss = self.objective(net, k, gen).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def step_graph(self, compile_network_: bool) -> tuple[Callable[[int], torch.Tensor], dict[str, Any]]:
        """The whole step as one CUDA graph; checked against eager steps from the same state."""
        dev = self.device
        model = self.network(plain=False)
        params = [p for p in model.parameters() if p.requires_grad]
        lr = torch.tensor(LR, device=dev)  # tensors: a replay reads them, so a schedule could refill them
        weight = torch.tensor(EMA_WEIGHT, device=dev)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True, capturable=True)
        ema = [p.detach().clone() for p in params]
        net = self.compiled(model, "default") if compile_network_ else model
        gen = torch.Generator(device=dev)

        def body(k: int) -> torch.Tensor:
            with self.autocast(cache=False):  # autocast's weight cache must not outlive a capture
                loss = self.objective(net, k, gen).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
            opt.step()
            with torch.no_grad():  # ema += w (p - ema), with w a tensor
                diff = torch._foreach_sub(params, ema)
                torch._foreach_mul_(diff, weight)
                torch._foreach_add_(ema, diff)
            return loss.detach()

        t0 = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (and compilation) off the capture stream, as CUDA graphs need
            for k in range(3):
                gen.manual_seed(k)
                opt.zero_grad(set_to_none=True)
                body(k)
        torch.cuda.current_stream().wait_stream(side)
        self.sync()
        warm_s = time.perf_counter() - t0
        reference = copy.deepcopy(model)
        reference_opt_state = copy.deepcopy(opt.state_dict())
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(gen)  # a replay reads the generator's seed and offset as set before it
        opt.zero_grad(set_to_none=True)
        gen.manual_seed(3)
        with torch.cuda.graph(graph):
            static_loss = body(3)
        # capturing ran nothing: replays of steps 3..7 against eager steps from the same state
        graph_losses = []
        for k in range(3, 8):
            gen.manual_seed(k)
            graph.replay()
            graph_losses.append(float(static_loss))
        ref_params = [p for p in reference.parameters() if p.requires_grad]
        ref_opt = torch.optim.AdamW(ref_params, lr=torch.tensor(LR, device=dev), weight_decay=0.0, fused=True,
                                    capturable=True)
        ref_opt.load_state_dict(reference_opt_state)
        eager_gen = torch.Generator(device=dev)
        eager_losses = []
        for k in range(3, 8):
            eager_gen.manual_seed(k)
            eager_losses.append(float(self.eager_step(reference, ref_params, ref_opt, eager_gen, k)))
        check = {"losses_graph": graph_losses, "losses_eager": eager_losses,
                 "param_max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(params, ref_params)),
                 "eager_warm_s": round(warm_s, 1)}

        def step(k: int) -> torch.Tensor:
            gen.manual_seed(k)
            graph.replay()
            return static_loss
        return step, check

    # ------------------------------------------------------------------ measurement
    def rng_check(self) -> None:
        """A generator registered with a graph: its replayed draws equal eager draws for each seed set before."""
        dev, gen = self.device, torch.Generator(device=self.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            gen.manual_seed(1)
            torch.randn(1000, generator=gen, device=dev)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(gen)
        gen.manual_seed(1)
        with torch.cuda.graph(graph):
            ints = torch.randint(0, 1000, (300,), generator=gen, device=dev)
            normals = torch.randn(1000, generator=gen, device=dev)
        same = []
        for seed in (5, 17, 5):
            gen.manual_seed(seed)
            graph.replay()
            eager = torch.Generator(device=dev).manual_seed(seed)
            same.append(torch.equal(ints, torch.randint(0, 1000, (300,), generator=eager, device=dev))
                        and torch.equal(normals, torch.randn(1000, generator=eager, device=dev)))
        self.log(what="rng replay equals eager per seed", ok=same)

    def time(self, name: str, step: Callable[[int], torch.Tensor], extra: dict[str, Any]) -> None:
        args = self.args
        t0 = time.perf_counter()
        for k in range(100, 100 + args.warmup):
            step(k)
        self.sync()
        warm_s = time.perf_counter() - t0
        # five windows, as training_speed.py times its rows: a window in which something else took the shared host
        # shows as an outlier
        clock = WindowClock(args.measure, 5, self.batch, self.device)
        clock.at(0)
        for k in range(args.measure):
            step(1000 + k)
            clock.at(k + 1)
        timing = clock.summary()
        label = name if args.kernel_tuning == "none" else f"{name}+{args.kernel_tuning}"
        self.log(what=label, samples_per_s=round(1000 * self.batch / timing["wall_ms_per_step"], 1),
                 ms_per_step=timing["wall_ms_per_step"], window_samples_per_s=timing["window_rates"],
                 host_cpu_ms_per_step=timing["host_cpu_ms_per_step"], warm_s=round(warm_s, 1),
                 peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None, **extra)
        if args.profile:
            self.profile(label, step)

    def profile(self, label: str, step: Callable[[int], torch.Tensor], steps: int = 3) -> None:
        from torch.profiler import ProfilerActivity, profile

        activity = ProfilerActivity.CUDA if self.cuda else ProfilerActivity.CPU
        with profile(activities=[activity]) as prof:
            for k in range(5000, 5000 + steps):
                step(k)
            self.sync()
        kind = torch.autograd.DeviceType.CUDA if self.cuda else torch.autograd.DeviceType.CPU
        kernels = [e for e in prof.events() if e.device_type == kind]

        def ms(events: list[Any]) -> float:
            return round(sum(getattr(e, "device_time", 0.0) for e in events) / 1000 / steps, 3)

        copies = [e for e in kernels if "direct_copy" in e.name]
        scatters = [e for e in kernels if "index_put" in e.name]
        self.log(what=f"{label} profile ({steps} steps)", kernels_per_step=len(kernels) / steps,
                 kernel_ms_per_step=ms(kernels), copies_per_step=len(copies) / steps, copy_ms_per_step=ms(copies),
                 index_put_per_step=len(scatters) / steps, index_put_ms_per_step=ms(scatters))

    def run(self, variants: list[str]) -> None:
        if self.cuda:
            try:
                self.rng_check()
            except Exception as exc:  # noqa: BLE001 - recorded, the variants still run
                self.log(what="rng replay equals eager per seed", error=repr(exc)[:2000])
        for name in variants:
            if name.startswith("step") and not self.cuda:
                print(f"step_floor: note: {name}: CUDA graphs need a GPU; skipped", file=sys.stderr, flush=True)
                self.log(what=name, skipped="CUDA graphs need a GPU")
                continue
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                step, extra = (self.base(plain=name == "base-plain") if name.startswith("base")
                               else self.step_graph(compile_network_=name == "step"))
                self.time(name, step, {**extra, "build_s": round(time.perf_counter() - t0, 1)})
            except Exception as exc:  # noqa: BLE001 - a failed variant is recorded with its error
                self.log(what=name, error=repr(exc)[:2000], traceback=traceback.format_exc()[-3000:])
            torch.compiler.reset()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--warmup", type=int, default=20, help="steps before timing (compilation included)")
    p.add_argument("--measure", type=int, default=200, help="timed steps")
    p.add_argument("--kernel-tuning", default="none", choices=KERNEL_TUNING_CHOICES)
    p.add_argument("--profile", action="store_true", help="kernels per step, copies and scatter-adds among them")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "step_floor.json"))
    p.add_argument("--tiny", action="store_true", help="a small network, batch 8 (a dry run)")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a dry run: no compile, no graphs)")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        print(f"step_floor: error: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("step_floor: error: no GPU; pass --allow-cpu for a dry run", file=sys.stderr)
        return 2
    os.makedirs(Path(args.results).parent, exist_ok=True)
    Floor(args).run(variants)
    return 0


if __name__ == "__main__":
    sys.exit(main())
