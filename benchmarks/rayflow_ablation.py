"""RayFlow ablations and the measurements behind its defaults, in one command.

    python benchmarks/rayflow_ablation.py                         # the ablation table (mixtures + digits)
    python benchmarks/rayflow_ablation.py --table defaults        # one-factor-at-a-time sweep of every option
    python benchmarks/rayflow_ablation.py --table all --workers 16 --steps 3000   # larger budgets
    python benchmarks/rayflow_ablation.py --table readings        # issue #14's eps_mu readings vs 2-RF (CPU screen)

Ablation rows (the paper's Table 3 switches, plus both sources of x0): ``full`` (the defaults, uniform t since
issue #14), ``learned Time Sampler`` (the paper's T_theta, the default and so ``full`` until then),
``no-instance-target`` (eps_mu := eps with data x0: a plain straight-path flow), ``x0-data``,
``x0-teacher``. Each is distilled with the same student budget (``--steps`` x ``--batch-size``) and compared at
1, 2, 4 and 8 NFE with the teacher's DDIM and DPM-Solver++(2M) at the same NFE and with its 100-step samples.

Data: unconditional Gaussian mixtures with the exact teacher (sliced 2-Wasserstein to fresh true samples, ``sw``,
lower is better; ``truth`` is the floor of two independent true sample sets) and the embedded 8x8 ``digits`` with a
small teacher trained here (Fréchet distance in the features of the lead's classifier, ``fd``). The defaults sweep
uses the mixtures only (two dimensions x two schedules), several training seeds for the base configuration, so
differences can be read against the seed-to-seed spread.

Everything runs on CPUs, one process per job (``--workers``); the eps_mu pools are cached per job in a temporary
directory. Output: Markdown on stdout and ``OUT/{ablation,defaults}.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NFES = (1, 2, 4, 8)

# (name, data spec, schedule)
MOG_SETTINGS = [
    ("mog8-linear", "mog:dim=8,modes=6,std=0.2,seed=3,conditional=0", "linear"),
    ("mog16-linear", "mog:dim=16,modes=8,std=0.2,seed=5,conditional=0", "linear"),
    ("mog8-sd", "mog:dim=8,modes=6,std=0.2,seed=3,conditional=0", "scaled_linear"),
    ("mog16-sd", "mog:dim=16,modes=8,std=0.2,seed=5,conditional=0", "scaled_linear"),
]

ABLATION = [
    ("full", {}),  # the defaults: uniform t since issue #14 (the "no Time Sampler" row of earlier tables)
    # the paper's learned T_theta (RayFlow's default, and so the "full" row, until issue #14)
    ("learned Time Sampler", {"time_sampler": "learned"}),
    ("logit-normal t", {"time_sampler": "logit-normal"}),
    ("no instance target (data x0)", {"instance_target": "false", "x0_source": "data"}),
    ("no instance target (teacher x0 = reflow)", {"instance_target": "false", "x0_source": "teacher"}),
    ("x0 from data", {"x0_source": "data"}),
    ("x0 mixed teacher->data", {"x0_source": "mixed", "mix_start": "1", "mix_end": "0"}),
]

SWEEP = [
    ("base", {}),
    ("parameterization=epsilon", {"parameterization": "epsilon"}),
    ("x0_source=data", {"x0_source": "data"}),
    ("x0_source=teacher", {"x0_source": "teacher"}),
    ("x0_source=mixed", {"x0_source": "mixed", "mix_start": "1", "mix_end": "0"}),
    ("mixed data->teacher", {"x0_source": "mixed", "mix_start": "0", "mix_end": "1"}),
    ("sigma=0.05", {"sigma": "0.05"}),
    ("sigma=0.2", {"sigma": "0.2"}),
    ("k_timesteps=1", {"k_timesteps": "1"}),
    ("k_timesteps=4", {"k_timesteps": "4"}),
    ("k_timesteps=16", {"k_timesteps": "16"}),
    ("timestep_set=random", {"timestep_set": "random"}),
    ("time_sampler=uniform", {"time_sampler": "uniform"}),
    ("time_sampler=learned", {"time_sampler": "learned"}),
    ("time_sampler=logit-normal", {"time_sampler": "logit-normal"}),
    ("time_sampler=u-shaped", {"time_sampler": "u-shaped"}),
    ("time_sampler=loss-history", {"time_sampler": "loss-history"}),
    ("learned+features", {"time_sampler": "learned", "time_sampler_features": "true"}),
    ("reweight=false", {"reweight": "false"}),
    ("start_noise=variance-matched", {"start_noise": "variance-matched"}),
    ("loss_weighting=snr", {"loss_weighting": "snr"}),
]

#: issue #14's readings of eps_mu (methods/rayflow/readings.py), screened against 2-RF at the same budget;
#: a third element names another method (its defaults), else the row is RayFlow with those options. The screen
#: ran with the learned Time Sampler as the default, so the rows name it: each keeps the meaning it was measured with
_LEARNED = {"time_sampler": "learned"}
READINGS: list[tuple[str, dict[str, str]] | tuple[str, dict[str, str], str]] = [
    ("average (K=8)", {"eps_mu_reading": "average", **_LEARNED}),  # the default before issue #14
    ("trajectory", {"eps_mu_reading": "trajectory", **_LEARNED}),
    ("start-consistent", {"eps_mu_reading": "start", **_LEARNED}),
    ("trajectory + consistency", {"eps_mu_reading": "trajectory", "consistency_weight": "1", **_LEARNED}),
    ("start + consistency", {"eps_mu_reading": "start", "consistency_weight": "1", **_LEARNED}),
    ("start, uniform t (default)", {"eps_mu_reading": "start", "time_sampler": "uniform"}),
    ("start, sigma=0.05", {"eps_mu_reading": "start", "sigma": "0.05", **_LEARNED}),
    ("start, sigma=0.2", {"eps_mu_reading": "start", "sigma": "0.2", **_LEARNED}),  # the paper's Fig. 3 range
    ("start, no p/q reweighting", {"eps_mu_reading": "start", "reweight": "false", **_LEARNED}),
    ("start, instance-conditioned T", {"eps_mu_reading": "start", "time_sampler_features": "true", **_LEARNED}),
    ("2-RF (reflow)", {}, "reflow"),
]


# ---------------------------------------------------------------------- jobs (run in worker processes)
def _setup_worker() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("TQDM_DISABLE", "1")


def _train_config(args: dict, seed: int):
    from rayflow.training import TrainConfig

    return TrainConfig(max_steps=args["steps"], batch_size=args["batch_size"], lr=args["lr"], seed=seed,
                       checkpoint_every=0, log_every=0, progress=False, ema_decay=0.999)


def _eval_noise(spec: str, n: int, num_classes: int, shape):
    import torch

    g = torch.Generator().manual_seed(12345)
    noise = torch.randn(n, *shape, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g) if num_classes else None
    return noise, labels


def _scorer(spec: str, args: dict):
    from rayflow.comparison import Scorer

    fdir = Path(args["out"]) / "feature-net" if spec.startswith("digits") else None
    return Scorer.for_data(spec, feature_net_dir=fdir, reference_num=args["n_eval"], seed=0, progress=False)


def _metric(spec: str) -> str:
    return "fd" if spec.startswith("digits") else "sw"


def _teacher_for(spec: str, schedule: str, args: dict):
    """(teacher argument for distill, eps-teacher network, schedule)."""
    from rayflow.data import load_dataset
    from rayflow.distillation import load_teacher

    dataset = load_dataset(spec)
    if spec.startswith("mog"):
        net, sched, _ = load_teacher("exact", dataset, schedule)
        return "exact", net, sched, dataset
    tdir = str(Path(args["out"]) / "digits-teacher")
    net, sched, _ = load_teacher(tdir, dataset)
    return tdir, net, sched, dataset


def job_distill(task: dict) -> dict:
    """Distil one RayFlow variant and score it at every NFE."""
    _setup_worker()
    import torch

    from rayflow.distillation import distill
    from rayflow.methods import get_method

    args, spec, schedule, opts, seed = task["args"], task["spec"], task["schedule"], task["opts"], task["seed"]
    teacher_arg, _, sched, dataset = _teacher_for(spec, schedule, args)
    method = get_method(task.get("method", "rayflow")).from_options(dict(opts))
    tmp = Path(tempfile.mkdtemp(prefix="rf-abl-"))
    t0 = time.time()
    try:
        result = distill(method, teacher_arg, dataset, tmp / "student", _train_config(args, seed),
                         cache_dir=tmp / "cache", schedule_name=schedule, progress=False)
        train_s = time.time() - t0
        scorer = _scorer(spec, args)
        noise, labels = _eval_noise(spec, args["n_eval"], dataset.num_classes, dataset.x.shape[1:])
        row: dict[str, Any] = {"setting": task["setting"], "variant": task["variant"], "seed": seed,
                               "teacher_nfe": result.teacher_nfe, "train_seconds": round(train_s, 1)}
        with torch.no_grad():
            for nfe in NFES:
                x = result.method.sample(result.student, noise, sched, nfe, cond=labels)
                row[f"nfe{nfe}"] = float(scorer.score(x, labels)[_metric(spec)])
        # keep the learned distribution's log and plot
        if getattr(getattr(method.config, "time", None), "time_sampler", "") == "learned":
            for name in ("time_sampler.png", "time_sampler.json"):
                src = tmp / "student" / name
                if src.exists():
                    shutil.copy(src, Path(args["out"]) / f"{task['setting']}-{name}")
        return row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def job_baselines(task: dict) -> list[dict]:
    """The teacher's training-free samplers at the same NFEs, its 100-step samples, and truth vs truth."""
    _setup_worker()
    import torch

    from rayflow.samplers import sample

    args, spec, schedule = task["args"], task["spec"], task["schedule"]
    _, net, sched, dataset = _teacher_for(spec, schedule, args)
    scorer = _scorer(spec, args)
    noise, labels = _eval_noise(spec, args["n_eval"], dataset.num_classes, dataset.x.shape[1:])
    metric = _metric(spec)
    rows = []
    with torch.no_grad():
        for solver in ("ddim", "dpm++2m"):
            row = {"setting": task["setting"], "variant": f"teacher {solver}"}
            for nfe in NFES:
                row[f"nfe{nfe}"] = float(scorer.score(sample(net, noise, sched, solver, nfe, cond=labels),
                                                      labels)[metric])
            rows.append(row)
        x100 = sample(net, noise, sched, "dpm++2m", 100, cond=labels)
        rows.append({"setting": task["setting"], "variant": "teacher dpm++2m 100 steps",
                     **{f"nfe{n}": float(scorer.score(x100, labels)[metric]) for n in NFES}})
        if dataset.mixture is not None:
            truth, _ = dataset.sample_truth(args["n_eval"], torch.Generator().manual_seed(777))
            v = float(scorer.score(truth)[metric])
            rows.append({"setting": task["setting"], "variant": "truth vs truth", **{f"nfe{n}": v for n in NFES}})
        else:
            train = dataset.x[: args["n_eval"]]  # the training split against the held-out reference: the floor
            v = float(scorer.score(train, dataset.labels[: args["n_eval"]])[metric])
            rows.append({"setting": task["setting"], "variant": "training data", **{f"nfe{n}": v for n in NFES}})
    return rows


def _train_digits_teacher(args: dict) -> None:
    """A small class-conditional epsilon teacher on the embedded digits (resumes if interrupted)."""
    import torch

    torch.set_num_threads(min(8, os.cpu_count() or 1))  # it trains alone, before the workers start
    from rayflow.distillation import train_teacher
    from rayflow.training import TrainConfig

    out = Path(args["out"]) / "digits-teacher"
    if (out / "model.safetensors").exists():
        return
    cfg = TrainConfig(max_steps=args["teacher_steps"], batch_size=256, lr=1e-3, checkpoint_every=1000,
                      log_every=0, progress=False, ema_decay=0.999)
    train_teacher("digits", out, cfg)


def _prepare_digits(args: dict) -> None:
    import torch

    _train_digits_teacher(args)
    torch.set_num_threads(min(8, os.cpu_count() or 1))  # the teacher trains alone: let it use the cores
    _scorer("digits", args)  # trains and saves the feature network once, before the workers need it


# ---------------------------------------------------------------------- tables
def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def markdown(rows: list[dict], title: str, metric: str) -> str:
    """Rows grouped by setting: ``variant | NFE 1 | 2 | 4 | 8`` (mean ± spread over seeds when several)."""
    lines = [f"### {title}", ""]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    for setting in settings:
        lines += [f"**{setting}** ({metric}, lower is better)", "",
                  "| variant | " + " | ".join(f"{n} NFE" for n in NFES) + " |",
                  "|---|" + "---|" * len(NFES)]
        variants = list(dict.fromkeys(r["variant"] for r in rows if r["setting"] == setting))
        for v in variants:
            group = [r for r in rows if r["setting"] == setting and r["variant"] == v]
            cells = []
            for n in NFES:
                vals = [r[f"nfe{n}"] for r in group if r.get(f"nfe{n}") is not None]
                if not vals:
                    cells.append("–")
                elif len(vals) == 1:
                    cells.append(_fmt(vals[0]))
                else:
                    cells.append(f"{statistics.mean(vals):.3f} ± {statistics.pstdev(vals):.3f}")
            seeds = f" (×{len(group)} seeds)" if len(group) > 1 else ""
            lines.append(f"| {v}{seeds} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def summary(rows: list[dict], variants: list[str]) -> str:
    """Mean over settings of each variant's score relative to the base (ratio; < 1 is better than base)."""
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    base = {s: {n: statistics.mean([r[f"nfe{n}"] for r in rows if r["setting"] == s and r["variant"] == "base"])
                for n in NFES} for s in settings}
    lines = ["### Sweep summary: score / base score, geometric mean over the settings (< 1 beats the base)", "",
             "| variant | " + " | ".join(f"{n} NFE" for n in NFES) + " |", "|---|" + "---|" * len(NFES)]
    for v in variants:
        cells = []
        for n in NFES:
            ratios = []
            for s in settings:
                vals = [r[f"nfe{n}"] for r in rows if r["setting"] == s and r["variant"] == v]
                if vals and base[s][n] > 0:
                    ratios.append(statistics.mean(vals) / base[s][n])
            cells.append(_fmt(statistics.geometric_mean(ratios)) if ratios else "–")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_rows(rows: list[dict], path: Path, metric: str) -> None:
    """One panel per setting: the metric against NFE (log2), one line per variant; the 100-step teacher and the
    floor (truth vs truth / training data) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plt.subplots(1, len(settings), figsize=(4.6 * len(settings), 3.8), dpi=110, squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for ax, setting in zip(axes[0], settings):
        ours = 0
        for v in dict.fromkeys(r["variant"] for r in rows if r["setting"] == setting):
            group = [r for r in rows if r["setting"] == setting and r["variant"] == v]
            ys = [statistics.mean([g[f"nfe{n}"] for g in group]) for n in NFES]
            style: dict[str, Any] = {"marker": "o", "ms": 3, "lw": 1.2}
            if v.startswith(("teacher dpm++2m 100", "truth", "training data")):  # references: flat, grey
                style = {"ls": "--" if v.startswith("teacher") else ":", "color": "grey", "lw": 1.2}
            elif v.startswith("teacher"):
                style.update(color="black", ls="--", marker="s")
            elif v in ("full", "base"):
                style.update(color="black", lw=2.4)
            else:
                style.update(color=colours[ours % len(colours)])
                ours += 1
            ax.plot(NFES, ys, label=v, **style)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(NFES, [str(n) for n in NFES])
        ax.set_xlabel("NFE")
        ax.set_title(setting)
        ax.set_ylabel("fd" if setting == "digits" else metric)
    axes[0][-1].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------- main
def _run(tasks: list[tuple[str, dict]], workers: int) -> list:
    if workers <= 1:
        return [globals()[fn](t) for fn, t in tasks]
    with mp.get_context("spawn").Pool(workers, maxtasksperchild=1) as pool:
        handles = [pool.apply_async(globals()[fn], (t,)) for fn, t in tasks]
        return [h.get() for h in handles]


def _flatten(results: list) -> list[dict]:
    out = []
    for r in results:
        out.extend(r if isinstance(r, list) else [r])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", choices=("ablation", "defaults", "all", "readings"), default="ablation")
    p.add_argument("--out", default="runs/rayflow_ablation")
    p.add_argument("--steps", type=int, default=1500, help="student updates per variant")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, default=1, help="training seeds per ablation row")
    p.add_argument("--sweep-base-seeds", type=int, default=3, help="training seeds of the sweep's base row")
    p.add_argument("--n-eval", type=int, default=5000, help="samples per score")
    p.add_argument("--teacher-steps", type=int, default=4000, help="digits teacher training steps")
    p.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 2) - 1)))
    p.add_argument("--settings", default="mog8-linear,mog16-sd",
                   help="mixture settings of the ablation (comma list; the sweep uses all four)")
    p.add_argument("--sweep-settings", default=",".join(n for n, *_ in MOG_SETTINGS),
                   help="mixture settings of the defaults sweep (comma list)")
    p.add_argument("--sweep-base", default="",
                   help="options every sweep row starts from, e.g. x0_source=mixed,time_sampler=learned "
                        "(default: the current defaults)")
    p.add_argument("--no-digits", action="store_true", help="skip the digits part of the ablation")
    p.add_argument("--only", default="", help="only these rows of the table, by name, separated by ';'")
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks that everything runs")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.n_eval, a.teacher_steps, a.sweep_base_seeds = 60, 500, 200, 1
    args = {"steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "n_eval": a.n_eval,
            "teacher_steps": a.teacher_steps, "out": a.out}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {name: (spec, sched) for name, spec, sched in MOG_SETTINGS}
    t0 = time.time()
    print(f"# command: python benchmarks/rayflow_ablation.py {' '.join(sys.argv[1:] if argv is None else argv)}")

    only = {v.strip() for v in a.only.split(";") if v.strip()}

    def table(variants) -> list[dict]:
        """Baselines plus every (variant, seed) on the chosen settings (and digits); rows in a stable order."""
        unknown = sorted(only - {v for v, *_ in variants})
        if unknown:
            p.error(f"--only: unknown row(s) {unknown}; expected some of {'; '.join(v for v, *_ in variants)}")
        chosen = [s for s in a.settings.split(",") if s]
        for s in chosen:
            if s not in settings:
                p.error(f"unknown setting {s!r}; expected some of {', '.join(settings)}")
        runs = [(s, *settings[s]) for s in chosen]
        if not a.no_digits:
            _prepare_digits(args)
            runs.append(("digits", "digits", "linear"))
        tasks = []
        for name, spec, sched in runs:
            tasks.append(("job_baselines", {"args": args, "setting": name, "spec": spec, "schedule": sched}))
            for variant, opts, *method in variants:
                if only and variant not in only:
                    continue
                for seed in range(a.seeds):
                    tasks.append(("job_distill", {"args": args, "setting": name, "spec": spec, "schedule": sched,
                                                  "variant": variant, "opts": opts, "seed": seed,
                                                  "method": method[0] if method else "rayflow"}))
        rows = _flatten(_run(tasks, a.workers))
        order = [v for v, *_ in variants]
        rows.sort(key=lambda r: ([n for n, *_ in runs].index(r["setting"]),
                                 order.index(r["variant"]) if r["variant"] in order else -1))
        return rows

    if a.table in ("ablation", "all"):
        rows = table(ABLATION)
        md = markdown(rows, "RayFlow ablation", "sw for mixtures, fd for digits")
        (out / "ablation.json").write_text(json.dumps({"args": args, "rows": rows}, indent=1))
        (out / "ablation.md").write_text(md)
        plot_rows(rows, out / "ablation.png", "sw")
        print(md)

    if a.table == "readings":
        rows = table(READINGS)
        md = markdown(rows, "RayFlow readings of eps_mu vs 2-RF (issue #14)", "sw for mixtures, fd for digits")
        (out / "readings.json").write_text(json.dumps({"args": args, "rows": rows}, indent=1))
        (out / "readings.md").write_text(md)
        print(md)

    if a.table in ("defaults", "all"):
        sweep = [s for s in a.sweep_settings.split(",") if s]
        for s in sweep:
            if s not in settings:
                p.error(f"unknown setting {s!r}; expected some of {', '.join(settings)}")
        base_opts = dict(kv.split("=", 1) for kv in a.sweep_base.split(",") if kv)
        tasks = []
        for name in sweep:
            spec, sched = settings[name]
            tasks.append(("job_baselines", {"args": args, "setting": name, "spec": spec, "schedule": sched}))
            for variant, opts in SWEEP:
                for seed in range(a.sweep_base_seeds if variant == "base" else 1):
                    tasks.append(("job_distill", {"args": args, "setting": name, "spec": spec, "schedule": sched,
                                                  "variant": variant, "opts": {**base_opts, **opts}, "seed": seed}))
        rows = _flatten(_run(tasks, a.workers))
        order = [v for v, _ in SWEEP]
        rows.sort(key=lambda r: (sweep.index(r["setting"]),
                                 order.index(r["variant"]) if r["variant"] in order else -1))
        md = markdown(rows, "RayFlow defaults sweep (one option changed at a time from the base)", "sw")
        md += "\n" + summary([r for r in rows if r["variant"] in order], order)
        (out / "defaults.json").write_text(json.dumps({"args": args, "rows": rows}, indent=1))
        (out / "defaults.md").write_text(md)
        plot_rows([r for r in rows if r["variant"] in ("base", "parameterization=epsilon", "x0_source=data",
                                                        "x0_source=teacher", "time_sampler=learned")
                   or r["variant"].startswith(("teacher", "truth"))], out / "defaults.png", "sw")
        print(md)
    print(f"# total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
