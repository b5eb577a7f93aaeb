"""``rayflow demo``: the whole pipeline on the embedded data, on a laptop CPU, in a few minutes.

1. train an epsilon-prediction teacher (class-conditional, label dropout) on the data;
2. train the feature network the image metrics use (a classifier with an autoencoder term; the held-out test
   split is the reference);
3. sample the teacher at 50 DDIM steps (the quality and fidelity reference);
4. run every training-free sampler and every registered distillation method at 1, 2, 4 and 8 NFE from the
   same noise and labels, with the same student budget for every method;
5. print the table and write ``results.json`` / ``results.md``, a plot of quality against NFE and sample grids.

Everything resumes: rerunning the command reuses the teacher, the classifier and finished students.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rayflow.checkpoint import read_json
from rayflow.comparison import Scorer, compare
from rayflow.data import load_dataset, to_uint8_images
from rayflow.distillation import distill, load_generator, train_teacher
from rayflow.evaluation import (
    format_comparison,
    format_table,
    plot_metric_vs_nfe,
    save_grid_by_method,
    scatter_2d,
    write_results,
)
from rayflow.methods import available_methods, get_method
from rayflow.training import TrainConfig

SAMPLERS = ("ddim", "dpm++2m", "euler", "heun")
SAMPLER_NAMES = {"ddim": "DDIM (teacher)", "dpm++2m": "DPM-Solver++(2M) (teacher)", "euler": "Euler (teacher)",
                 "heun": "Heun (teacher)"}
NFES = [1, 2, 4, 8]


@dataclass
class DemoBudget:
    teacher_steps: int = 3000
    distill_steps: int = 600
    batch_size: int = 128
    num_eval: int = 2000
    feature_steps: int = 600
    teacher_lr: float = 2e-3
    distill_lr: float = 5e-4

    @classmethod
    def quick(cls) -> DemoBudget:
        return cls(teacher_steps=150, distill_steps=40, batch_size=64, num_eval=200, feature_steps=60)


def demo_methods() -> list[str]:
    """The methods the demo runs by default: every registered one, each with its own ``demo_options``."""
    return available_methods()


def run_demo(out: str | Path, data: str = "digits", quick: bool = False, methods: list[str] | None = None,
             seed: int = 0, budget: DemoBudget | None = None) -> list[dict]:
    out = Path(out)
    budget = budget or (DemoBudget.quick() if quick else DemoBudget())
    methods = methods if methods is not None else demo_methods()
    for name in methods:
        get_method(name)  # fail fast on a typo, before any training
    t_start = time.time()
    dataset = load_dataset(data)

    print(f"[1/4] teacher on {dataset.spec} ({budget.teacher_steps} steps)")
    train_teacher(dataset, out / "teacher", TrainConfig(
        max_steps=budget.teacher_steps, batch_size=budget.batch_size, lr=budget.teacher_lr, ema_decay=0.999,
        warmup_steps=min(200, budget.teacher_steps // 10), checkpoint_every=1000, seed=seed))
    teacher = load_generator(model=str(out / "teacher"))

    print("[2/4] reference: feature network and the teacher at 50 DDIM steps")
    scorer = Scorer.for_data(dataset.spec, out / "feature-net", feature_steps=budget.feature_steps, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(budget.num_eval, *dataset.sample_shape, generator=g)
    labels = torch.arange(budget.num_eval) % dataset.num_classes if dataset.num_classes else None
    t0 = time.perf_counter()
    ref = teacher.generate(noise, 50, cond=labels, sampler="ddim")
    ref_seconds = (time.perf_counter() - t0) / budget.num_eval
    rows = [{"method": "teacher ddim-50", "nfe": 50, "steps": 50, "sampler": "ddim",
             **scorer.score(ref, labels), "sec_per_sample": ref_seconds}]

    print(f"[3/4] training-free samplers at NFE {NFES}")
    keep: dict[tuple[str, int], torch.Tensor] = {}
    rows += compare({s: (teacher, s) for s in SAMPLERS}, NFES, noise, scorer, labels, ref, keep=keep)

    print(f"[4/4] distillation methods ({budget.distill_steps} student steps each): {', '.join(methods)}")
    train = TrainConfig(max_steps=budget.distill_steps, batch_size=budget.batch_size, lr=budget.distill_lr,
                        ema_decay=0.99, checkpoint_every=0, seed=seed)
    extra = {}
    students = {}
    for name in methods:
        t0 = time.time()
        student_dir = out / "students" / name
        cls = get_method(name)
        method = cls.from_options(dict(cls.demo_options))  # each method declares its demo preset
        distill(method, str(out / "teacher"), dataset, student_dir, train, progress=False)
        extra[name] = {"teacher_nfe": read_json(student_dir / "config.json").get("teacher_nfe"),
                       "train_seconds": round(time.time() - t0, 1)}
        students[name] = (load_generator(model=str(student_dir)), None)
    rows += compare(students, NFES, noise, scorer, labels, ref, keep=keep, extra=extra)

    write_results(rows, out)
    metric = "fd" if dataset.kind == "image" else "sw"
    # log axis: the competitive methods are not squashed under a training-free sampler's 1-step value
    plot_metric_vs_nfe([r for r in rows if r["nfe"] <= 8], metric, out / f"{metric}_vs_nfe.png",
                       title=f"{dataset.spec}: {metric} against NFE (lower is better)",
                       reference=("teacher, 50 DDIM steps", rows[0][metric]), log_y=True)
    show = {"teacher ddim-50": ref[:10]}
    for nfe in (1, 4):
        for name in ["ddim", *methods]:
            if (name, nfe) in keep:
                show[f"{name} {nfe} NFE"] = keep[(name, nfe)][:10]
    if dataset.kind == "image":
        save_grid_by_method({k: to_uint8_images(v) for k, v in show.items()}, out / "samples.png")
    elif dataset.sample_shape[0] >= 2:
        scatter_2d({k: v for k, v in show.items()}, out / "samples.png", truth=scorer.truth)
    print(format_table(rows))  # every metric, as results.md
    names = {"teacher ddim-50": "Teacher, DDIM 50 steps", **SAMPLER_NAMES,
             **{name: get_method(name).title() for name in methods}}
    print(format_comparison(rows, metric, sort_nfe=4, names=names, reference="teacher ddim-50"))
    print(f"demo finished in {time.time() - t_start:.0f} s; results in {out}/results.json, plot {metric}_vs_nfe.png")
    return rows
