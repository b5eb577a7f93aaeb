"""ProReflow's Table 4 on toy data: the full method, without progressive reflow, without aligned v-prediction, and
without both (PeRFlow-like), at the same student budget, on an exact Gaussian mixture and on embedded ``digits``.

    python benchmarks/proreflow_ablation.py                       # CPU-friendly defaults (a few minutes)
    python benchmarks/proreflow_ablation.py --steps 3000 --seeds 0,1,2 --jobs 8 --set all

Every variant is ``rayflow distill`` (:func:`rayflow.distillation.distill`) with ``--max-steps``/``--batch-size``
the same for all, then sampled at each NFE from the same noise and labels and scored by
:class:`rayflow.comparison.Scorer` (mixtures: sliced W2 ``sw`` and ``mmd`` against fresh true samples; digits:
Frechet distance ``fd`` in the features of the embedded classifier, ``kid``, class ``accuracy``). The teacher's
DDIM at the same NFEs is scored alongside. ``--variant NAME=METHOD[:key=value,...]`` adds any method/options (the
same strings as ``rayflow distill --option``), which is how the defaults in docs/proreflow.md were measured.

Data:
* ``mog``: ``mog:dim=8,modes=6,std=0.2,seed=3`` with the exact teacher (``--schedule``), a fresh MLP student
  (``--hidden``/``--depth``) since the exact teacher has no weights;
* ``mog16``: ``mog:dim=16,modes=8,std=0.2,seed=5``, likewise;
* ``digits``: a teacher trained here first (``--teacher-steps``, resumed if present), the student initialised
  from it.

Everything resumes: students, the teacher and the feature network live under ``--out`` and are reused.
Writes ``results.json`` (one row per data, variant, seed, NFE) and ``results.md`` (means +- std over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

DATA = {
    "mog": "mog:dim=8,modes=6,std=0.2,seed=3",
    "mog16": "mog:dim=16,modes=8,std=0.2,seed=5",
    "digits": "digits",
}

#: ProReflow's Table 4 (the paper ablates ProReflow-I at 4 steps)
TABLE4: dict[str, tuple[str, dict[str, str]]] = {
    "ProReflow-I (full)": ("proreflow", {"preset": "I"}),
    "w/o progressive reflow": ("proreflow", {"preset": "I", "progressive": "0"}),
    "w/o aligned v-prediction": ("proreflow", {"preset": "I", "aligned": "0"}),
    "w/o both (PeRFlow-like)": ("proreflow", {"preset": "I", "progressive": "0", "aligned": "0"}),
}
#: the peers at their defaults, for context
PEERS: dict[str, tuple[str, dict[str, str]]] = {
    "ProReflow-II": ("proreflow", {"preset": "II"}),
    "PeRFlow": ("perflow", {}),
    "2-Rectified Flow": ("reflow", {}),
    "Rectified Diffusion": ("rectified-diffusion", {}),
    "Rectified Diffusion-Phased": ("rectified-diffusion", {"phased": "1"}),
}
SETS = {"table4": TABLE4, "peers": PEERS, "all": {**TABLE4, **PEERS}, "none": {}}


def parse_variant(text: str) -> tuple[str, tuple[str, dict[str, str]]]:
    """``NAME=METHOD[:key=value,key=value]`` (values may not contain commas; use '/' inside tuples: 8/4/2)."""
    if "=" not in text:
        raise SystemExit(f"--variant expects NAME=METHOD[:key=value,...], got {text!r}")
    name, rest = text.split("=", 1)
    method, _, opts = rest.partition(":")
    options = {}
    for item in filter(None, opts.split(",")):
        if "=" not in item:
            raise SystemExit(f"--variant {name}: option {item!r} is not key=value")
        k, v = item.split("=", 1)
        options[k.strip()] = v.strip()
    return name.strip(), (method.strip(), options)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


# ---------------------------------------------------------------------- one job
def _train_config(args: dict[str, Any], data_key: str, seed: int):
    from rayflow.training import TrainConfig

    lr = args["lr"] if args["lr"] is not None else (5e-4 if data_key == "digits" else 2e-3)
    return TrainConfig(max_steps=args["steps"], batch_size=args["batch_size"], lr=lr, ema_decay=args["ema"],
                       seed=seed, checkpoint_every=max(1, args["steps"] // 2), log_every=50, progress=False)


def _generator_inputs(spec: str, num: int, seed: int):
    from rayflow.data import load_dataset

    ds = load_dataset(spec)
    g = torch.Generator().manual_seed(1000 + seed)
    noise = torch.randn(num, *ds.sample_shape, generator=g)
    labels = torch.arange(num) % ds.num_classes if ds.num_classes else None
    return ds, noise, labels


def run_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Distil one variant on one data set with one seed (resuming), and score it at every NFE."""
    torch.set_num_threads(job["threads"])
    from rayflow.comparison import Scorer, compare
    from rayflow.distillation import distill, load_generator
    from rayflow.methods import get_method
    from rayflow.models import ModelConfig

    args, data_key, seed = job["args"], job["data"], job["seed"]
    spec = DATA.get(data_key, data_key)
    ds, noise, labels = _generator_inputs(spec, args["num_eval"], seed)
    out = Path(args["out"]) / slug(data_key) / slug(job["variant"]) / f"seed{seed}"
    method = get_method(job["method"]).from_options(job["options"])
    teacher = "exact" if ds.mixture is not None else str(Path(args["out"]) / "teacher-digits")
    student = None
    if ds.mixture is not None:
        student = ModelConfig(kind="mlp", sample_shape=tuple(ds.sample_shape), num_classes=ds.num_classes,
                              hidden=args["hidden"], depth=args["depth"])
    t0 = time.time()
    result = distill(method, teacher, ds, out, _train_config(args, data_key, seed), schedule_name=args["schedule"],
                     student_model=student, progress=False)
    seconds = time.time() - t0
    gen = load_generator(model=str(out))
    scorer = Scorer.for_data(spec, Path(args["out"]) / "feature-net", seed=seed, progress=False)
    extra = {"teacher_nfe": int(result.teacher_nfe), "train_seconds": round(seconds, 1)}
    log = result.logs
    student_nfe = sum(v.get("pair_nfe", 0) for k, v in log.items() if k.startswith("stage") and isinstance(v, dict)
                      and v.get("pair_source") == "student") + int(log.get("student_pair_nfe", 0))
    extra["student_pair_nfe"] = student_nfe
    rows = compare({job["variant"]: (gen, None)}, args["nfes"], noise, scorer, labels, extra={job["variant"]: extra})
    final = _final_log(out)
    for r in rows:
        r.update(data=data_key, seed=seed, method_name=job["method"], options=job["options"], **final)
    return rows


def _final_log(out: Path) -> dict[str, float]:
    """The last logged training loss (and cosine / norm ratio where the method logs them)."""
    path = out / "train_log.jsonl"
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    if not lines:
        return {}
    last = json.loads(lines[-1])
    return {"final_loss": last.get("loss"), **{f"final_{k}": v for k, v in last.get("logs", {}).items()}}


def teacher_rows(args: dict[str, Any], data_key: str, seed: int) -> list[dict[str, Any]]:
    """The teacher's DDIM at the same NFEs (the baseline every method must beat)."""
    from rayflow.comparison import Scorer, compare
    from rayflow.distillation import load_generator

    spec = DATA.get(data_key, data_key)
    ds, noise, labels = _generator_inputs(spec, args["num_eval"], seed)
    if ds.mixture is not None:
        gen = load_generator(teacher="exact", data=spec, schedule_name=args["schedule"])
    else:
        gen = load_generator(model=str(Path(args["out"]) / "teacher-digits"))
    scorer = Scorer.for_data(spec, Path(args["out"]) / "feature-net", seed=seed, progress=False)
    rows = compare({"teacher DDIM": (gen, "ddim"), "teacher DPM-Solver++": (gen, "dpm++2m")}, args["nfes"], noise,
                   scorer, labels)
    for r in rows:
        r.update(data=data_key, seed=seed)
    return rows


def prepare_digits(args: dict[str, Any]) -> None:
    """Train (or reuse) the digits teacher and the feature classifier before the jobs fan out."""
    from rayflow.comparison import Scorer
    from rayflow.distillation import train_teacher
    from rayflow.schedules import VPSchedule
    from rayflow.training import TrainConfig

    out = Path(args["out"])
    print(f"digits teacher ({args['teacher_steps']} steps) -> {out / 'teacher-digits'}", flush=True)
    train_teacher("digits", out / "teacher-digits", TrainConfig(
        max_steps=args["teacher_steps"], batch_size=256, lr=2e-3, ema_decay=0.999,
        warmup_steps=min(200, args["teacher_steps"] // 10), checkpoint_every=1000, progress=False),
        schedule=VPSchedule.from_name(args["schedule"]))
    Scorer.for_data("digits", out / "feature-net", progress=False)


# ---------------------------------------------------------------------- report
def _metric(data_key: str) -> str:
    return "fd" if DATA.get(data_key, data_key).split(":")[0] in ("digits", "mnist", "fashion-mnist") else "sw"


def markdown(rows: list[dict[str, Any]], variants: list[str], datas: list[str], nfes: list[int]) -> str:
    names = ["teacher DDIM", "teacher DPM-Solver++", *variants]
    header = ["variant"] + [f"{d} {_metric(d)} @{n}" for d in datas for n in nfes] + \
        [f"{d} teacher NFE" for d in datas]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        cells = [name]
        for d in datas:
            for n in nfes:
                vals = [r[_metric(d)] for r in rows if r["method"] == name and r["data"] == d and r["nfe"] == n]
                if not vals:
                    cells.append("-")
                    continue
                t = torch.tensor(vals, dtype=torch.float64)
                cells.append(f"{t.mean():.4f}" + (f" ± {t.std():.4f}" if len(vals) > 1 else ""))
        for d in datas:
            nfe = [r.get("teacher_nfe") for r in rows if r["method"] == name and r["data"] == d]
            cells.append(str(nfe[0]) if nfe and nfe[0] is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="mog,digits", help="comma list of mog, mog16, digits or data specs")
    p.add_argument("--set", default="table4", choices=sorted(SETS), help="which variants (default table4)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=METHOD[:k=v,...]", help="add a variant")
    p.add_argument("--steps", type=int, default=800, help="student updates per variant (--max-steps)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="default: 2e-3 for mixtures (fresh student), 5e-4 digits")
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--seeds", default="0", help="comma list of training seeds")
    p.add_argument("--nfes", default="2,4", help="comma list of sampling NFEs")
    p.add_argument("--num-eval", type=int, default=4000, help="samples per score")
    p.add_argument("--schedule", default="linear", choices=["linear", "scaled_linear", "cosine"])
    p.add_argument("--hidden", type=int, default=128, help="mixture students: MLP width")
    p.add_argument("--depth", type=int, default=3, help="mixture students: MLP depth")
    p.add_argument("--teacher-steps", type=int, default=3000, help="digits teacher training steps")
    p.add_argument("--jobs", type=int, default=1, help="parallel processes (one torch thread each)")
    p.add_argument("--out", default="runs/proreflow-ablation")
    a = p.parse_args(argv)

    variants = dict(SETS[a.set])
    for text in a.variant:
        name, spec = parse_variant(text)
        variants[name] = spec
    if not variants:
        raise SystemExit("no variants: use --set or --variant")
    datas = [d.strip() for d in a.data.split(",") if d.strip()]
    seeds = [int(s) for s in a.seeds.split(",")]
    args = {"steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "ema": a.ema, "num_eval": a.num_eval,
            "schedule": a.schedule, "hidden": a.hidden, "depth": a.depth, "teacher_steps": a.teacher_steps,
            "nfes": [int(n) for n in a.nfes.split(",")], "out": a.out}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    from rayflow.methods import get_method

    for method, options in variants.values():
        get_method(method).from_options(options)  # fail fast on a typo
    t0 = time.time()
    if "digits" in datas:
        prepare_digits(args)
    threads = 1 if a.jobs > 1 else max(1, (os.cpu_count() or 1))
    jobs = [{"args": args, "data": d, "variant": n, "method": m, "options": o, "seed": s, "threads": threads}
            for d in datas for s in seeds for n, (m, o) in variants.items()]
    rows: list[dict[str, Any]] = []
    for d in datas:
        for s in seeds:
            rows += teacher_rows(args, d, s)
    command = "python benchmarks/proreflow_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def write(final: bool) -> str:  # after every run, so an interrupted benchmark keeps what it measured
        table = markdown(rows, list(variants), datas, args["nfes"])
        status = "" if final else f" (partial: {done}/{len(jobs)} runs)"
        (Path(a.out) / "results.json").write_text(json.dumps({"command": command, "complete": final, "rows": rows},
                                                             indent=1, default=str))
        (Path(a.out) / "results.md").write_text(f"`{command}`{status}\n\n{table}\n")
        return table

    print(f"{len(jobs)} runs ({a.steps} student steps each) on {a.jobs} process(es)", flush=True)
    done = 0
    if a.jobs > 1:
        with ProcessPoolExecutor(a.jobs) as pool:
            futures = {pool.submit(run_job, job): job for job in jobs}
            for fut in as_completed(futures):
                job = futures[fut]
                rows += fut.result()
                done += 1
                write(False)
                print(f"  done: {job['data']} / {job['variant']} / seed {job['seed']}", flush=True)
    else:
        for job in jobs:
            rows += run_job(job)
            done += 1
            write(False)
            print(f"  done: {job['data']} / {job['variant']} / seed {job['seed']}", flush=True)
    table = write(True)
    print(table)
    print(f"\n{time.time() - t0:.0f} s; results in {a.out}/results.json and results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
