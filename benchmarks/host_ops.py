"""Host-side operators of one training step outside the network (issue #13; CPU, seconds).

Once the network's forward and backward replay from CUDA graphs, each remaining eager operator of a step costs
host time (a Python call and a kernel launch). This counts the ATen operators the teacher's objective
(:class:`rayflow.training.EpsilonObjective`), the timestep coefficients and RayFlow's VP-matched point (where its
student is evaluated, :func:`rayflow.schedulers.vp_matched`) dispatch per step, with the
network replaced by an identity, so the count is the objective's own; then one call of each method's objective
(built by ``distill`` on the exact Gaussian-mixture teacher, batch 256). Counted with ``torch.profiler`` on the
CPU, nested operators included (``aten::to`` and the ``aten::copy_`` it calls count twice); on a GPU each is a
kernel launch, a cheaper view op or host work. ``--trainer-overhead`` also times the host time the Trainer adds to
a step over a bare loop (:func:`trainer_overhead`).

    python benchmarks/host_ops.py
    python benchmarks/host_ops.py --trainer-overhead
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rayflow.schedulers import vp_matched  # noqa: E402
from rayflow.schedules import VPSchedule  # noqa: E402
from rayflow.training import EpsilonObjective  # noqa: E402

#: each method's objective at its defaults (small pools), on the exact Gaussian-mixture teacher
METHODS: tuple[tuple[str, dict[str, str]], ...] = (
    ("rayflow", {"pool_size": "512", "teacher_steps": "2"}),
    ("rayflow", {"pool_size": "512", "teacher_steps": "2", "time_sampler": "learned"}),
    ("reflow", {"pool_size": "512"}),
    ("rectified-diffusion", {"pool_size": "512"}),
    ("perflow", {"pool_size": "512", "solver_steps": "2"}),
    # the Fashion-MNIST benchmark's PeRFlow: a student initialised from an epsilon teacher reads window_epsilon
    ("perflow", {"pool_size": "512", "solver_steps": "2", "parameterization": "window_epsilon"}),
)
MOG = "mog:dim=4,modes=3,conditional=true,n=1024,seed=1"


class _Identity(torch.nn.Module):
    prediction_type = "epsilon"
    num_classes = 3

    def forward(self, x, t, c=None):  # noqa: D102 - the network's place in the step
        return x


def method_rows() -> dict[str, collections.Counter]:
    """One call of each method's objective (batch 256, the network an identity), built as ``distill`` builds it."""
    from rayflow.distillation import distill
    from rayflow.methods import get_method
    from rayflow.models import ModelConfig
    from rayflow.training import TrainConfig, Trainer

    grabbed: dict[str, object] = {}

    def grab(trainer, event, step):
        if event == "end":
            grabbed["objective"] = trainer.objective

    rows: dict[str, collections.Counter] = {}
    Trainer.callbacks.append(grab)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, options in METHODS:
                param = f", {options['parameterization']}" if "parameterization" in options else ""
                label = f"{name} objective ({options.get('time_sampler', 'default')} t{param}), one call"
                train = TrainConfig(max_steps=1, batch_size=256, lr=1e-4, checkpoint_every=0, log_every=0,
                                    progress=False)
                distill(get_method(name).from_options(options), "exact", MOG, Path(tmp) / label, train,
                        student_model=ModelConfig(kind="mlp", sample_shape=(4,), num_classes=3, hidden=16, depth=1),
                        progress=False)
                objective, g = grabbed.pop("objective"), torch.Generator().manual_seed(0)
                rows[label] = count_ops(lambda: objective(_Identity(), 1, g))  # noqa: B023 - called right here
    finally:
        Trainer.callbacks.remove(grab)
    return rows


def trainer_overhead(steps: int = 400, warmup: int = 50, repeats: int = 3) -> dict[str, float]:
    """Host time the Trainer adds to a step: ms per step of rayflow's Trainer and of a bare loop (the same tiny
    MLP, objective, clipping, AdamW and EMA; no logging) on the CPU, where a network this small makes a step
    almost all host work. Runs alternate; the median of ``repeats`` each."""
    import copy
    import statistics
    import time

    from rayflow.models import ModelConfig, build_model
    from rayflow.training import TrainConfig, Trainer

    sched = VPSchedule.linear()
    objective = EpsilonObjective(torch.randn(256, 2), None, sched, 4)
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="mlp", sample_shape=(2,), hidden=16, depth=1))
    config = TrainConfig(max_steps=warmup + steps, batch_size=4, lr=1e-4, ema_decay=0.999, grad_clip=1.0,
                         log_every=0, checkpoint_every=0, progress=False, compile="no")
    timed: dict[str, float] = {}

    def clock(trainer: Trainer, event: str, step: int) -> None:
        if event == "step" and step in (warmup, warmup + steps):
            timed[str(step)] = time.perf_counter()

    def with_trainer() -> float:
        with tempfile.TemporaryDirectory() as out:
            Trainer.callbacks.append(clock)
            try:
                Trainer(copy.deepcopy(model), objective, config, out, {"kind": "host-overhead"}).train()
            finally:
                Trainer.callbacks.remove(clock)
        return 1000 * (timed[str(warmup + steps)] - timed[str(warmup)]) / steps

    def bare(timed_steps: int = steps) -> float:
        net = copy.deepcopy(model)
        params = list(net.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4)
        ema = [p.detach().clone() for p in params]
        gen = torch.Generator().manual_seed(0)

        def step(k: int) -> None:
            objective(net, k, gen).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 1e-3)

        for k in range(warmup):
            step(k)
        t0 = time.perf_counter()
        for k in range(warmup, warmup + timed_steps):
            step(k)
        return 1000 * (time.perf_counter() - t0) / max(timed_steps, 1)

    trainer_ms, bare_ms = [], []
    for _ in range(repeats):
        trainer_ms.append(with_trainer())
        bare_ms.append(bare())
    t, b = statistics.median(trainer_ms), statistics.median(bare_ms)
    # the Trainer's ATen operators per step (nested included), counted in one more run: deterministic where the
    # times are noisy, so two versions of the Trainer compare
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU])

    def counted(trainer: Trainer, event: str, step: int) -> None:
        if event == "step" and step == warmup:
            prof.__enter__()
        elif event == "step" and step == warmup + steps:
            prof.__exit__(None, None, None)

    timed.clear()
    Trainer.callbacks.append(counted)
    try:
        with_trainer()
    finally:
        Trainer.callbacks.remove(counted)
    trainer_ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / steps
    return {"trainer_ms_per_step": round(t, 3), "bare_ms_per_step": round(b, 3), "overhead_ms": round(t - b, 3),
            "trainer_aten_ops_per_step": round(trainer_ops, 1)}


def count_ops(fn) -> collections.Counter:
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm (device tables, caches)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return collections.Counter(e.key for e in prof.key_averages() for _ in range(e.count)
                               if e.key.startswith("aten::"))


def main(argv: list[str] | None = None) -> int:
    import argparse
    import platform
    import subprocess

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=None, help="also write the counts as JSON here (with the commit)")
    p.add_argument("--trainer-overhead", action="store_true",
                   help="also time a step of the Trainer against a bare loop on a tiny MLP (host time; ~1 min)")
    args = p.parse_args(argv)
    sched = VPSchedule.linear()
    x = torch.randn(512, 1, 32, 32)
    labels = torch.arange(512) % 10
    objective = EpsilonObjective(x, labels, sched, 256, label_dropout=0.1, num_classes=10)
    net = _Identity()
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (256,))
    rows = {
        "teacher objective (EpsilonObjective), one call": count_ops(lambda: objective(net, 0, g)),
        "a(t) and s(t) at 256 integer timesteps": count_ops(lambda: (sched.a(t), sched.s(t))),
        "RayFlow's VP-matched point (vp_matched) at 256 integer timesteps": count_ops(lambda: vp_matched(sched, t)),
        **method_rows(),
    }
    out: dict = {what: {"aten_ops": sum(c.values()), "top": dict(c.most_common(8))} for what, c in rows.items()}
    if args.trainer_overhead:
        out["trainer host overhead (tiny MLP, CPU)"] = trainer_overhead()
    print(json.dumps(out, indent=1))
    if args.results:
        here = Path(__file__).resolve().parents[1]
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        doc = {"command": "python benchmarks/host_ops.py", "commit": commit, "torch": torch.__version__,
               "python": platform.python_version(), "rows": out}
        Path(args.results).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
