#!/usr/bin/env python
"""Does an image metric see what a person sees? Controlled degradations of Fashion-MNIST, scored by every metric.

    python benchmarks/metric_validation.py --data ../shared/data/fashion-mnist            # the committed run (CPU)
    python benchmarks/metric_validation.py --data ... --inception                         # + Inception FID (slow)
    python benchmarks/metric_validation.py --tiny --data ...                              # a seconds-long dry run

The held-out test split is cut in two: the first ``--ref-num`` images are the reference, images after them are
the clean "samples" that get corrupted, each corruption at three strengths (Gaussian blur, additive Gaussian
noise, contrast loss toward grey, stroke thinning/thickening by grey-scale erosion/dilation, JPEG quantisation,
dropped classes, copies of a few training images). The committed class-conditional teacher adds real sampler
outputs (DDIM at 1, 2, 4, 8, 50 steps from the same noise; cached under ``--cache``, the slow part on a CPU).

Every row is scored with ``fd`` (multi-layer statistics of the feature net, rayflow's default), ``fd_classifier``
(its 128-d pooled features, the old default), ``kid`` (on the multi-layer features), the same ``fd`` under a
second, independently trained feature network of another width and seed (``fd_net2``; trained here in a few CPU
minutes when ``--net2`` holds none) and, with ``--inception``, the Inception FID of the ``[fid]`` extra.

The checks (printed and written to the JSON): each corruption's score rises with strength; the mildest blur and
noise score at least 1.5x the train-vs-test floor; DDIM's score falls with steps; Kendall tau between ``fd`` and
``fd_net2`` over all rows. Writes ``metric_validation.json`` and ``metric_validation.png`` into ``--results``.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from rayflow.data import load_dataset, to_uint8_images  # noqa: E402
from rayflow.errors import RayflowError, require  # noqa: E402
from rayflow.metrics import (  # noqa: E402
    FeatureNet,
    extract_features,
    frechet_distance,
    kendall_tau,
    kernel_distance,
    load_feature_net,
    save_feature_net,
    train_feature_net,
)

# corruption -> the three strengths, mildest first
STRENGTHS: dict[str, tuple[float, ...]] = {
    "blur": (0.5, 1.0, 1.5),            # Gaussian sigma, pixels
    "noise": (0.05, 0.1, 0.2),          # std of added Gaussian noise, in [-1, 1] units
    "contrast": (0.1, 0.25, 0.5),       # fraction faded toward mid-grey (0)
    "erode": (0.33, 0.67, 1.0),         # blend weight of a 3x3 grey-scale erosion (thinner strokes)
    "dilate": (0.33, 0.67, 1.0),        # blend weight of a 3x3 grey-scale dilation (thicker strokes)
    "jpeg": (75, 40, 10),               # JPEG quality (lower = stronger)
    "drop_classes": (2, 5, 8),          # classes left out of the 10 (mode collapse)
    "memorise": (200, 50, 10),          # distinct training images the samples are copies of (fewer = stronger)
}
DDIM_STEPS = (1, 2, 4, 8, 50)  # the default of --ddim-steps
FLOOR_FACTOR = 1.5  # "clearly above the floor": the mildest blur and noise score at least this multiple
METRICS = ("fd", "fd_classifier", "kid", "fd_net2", "inception_fid")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(3 * sigma + 0.5))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma * sigma))
    k = (k / k.sum()).to(x.dtype)
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(x.shape[1], 1, 1, -1).contiguous(), groups=x.shape[1])
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(x.shape[1], 1, -1, 1).contiguous(), groups=x.shape[1])


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    from PIL import Image

    out = []
    for im in to_uint8_images(x):
        buf = io.BytesIO()
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(buf, format="JPEG", quality=int(quality))
        a = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.uint8)
        out.append(a[..., None] if a.ndim == 2 else a)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def corrupt(name: str, s: float, clean: torch.Tensor, clean_labels: torch.Tensor, test_pool: torch.Tensor,
            pool_labels: torch.Tensor, train: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``clean`` (N held-out images) degraded by corruption ``name`` at strength ``s``; same N, clamped to [-1, 1]."""
    n = clean.shape[0]
    if name == "blur":
        y = gaussian_blur(clean, s)
    elif name == "noise":
        y = clean + s * torch.randn(clean.shape, generator=g)
    elif name == "contrast":
        y = (1 - s) * clean  # mid-grey is 0 in [-1, 1]
    elif name == "erode":
        y = (1 - s) * clean + s * -F.max_pool2d(-clean, 3, 1, 1)
    elif name == "dilate":
        y = (1 - s) * clean + s * F.max_pool2d(clean, 3, 1, 1)
    elif name == "jpeg":
        y = jpeg(clean, int(s))
    elif name == "drop_classes":
        # N held-out images of the classes that are kept: the same number of samples, less variety
        keep = pool_labels >= int(s)
        idx = torch.nonzero(keep).squeeze(1)
        require(idx.shape[0] >= n, f"drop_classes {s}: {idx.shape[0]} held-out images left, need {n}")
        y = test_pool[idx[torch.randperm(idx.shape[0], generator=g)[:n]]]
    elif name == "memorise":
        # copies of int(s) training images (plus rounding-level noise): a generator that memorised its data
        picks = torch.randperm(train.shape[0], generator=g)[: int(s)]
        y = train[picks[torch.arange(n) % picks.shape[0]]] + 0.004 * torch.randn(clean.shape, generator=g)
    else:
        raise RayflowError(f"unknown corruption {name!r}")
    return y.clamp(-1, 1)


def ddim_samples(teacher_dir: str, n: int, cache: Path, steps_list: tuple[int, ...] = DDIM_STEPS,
                 batch_size: int = 100) -> dict[int, torch.Tensor]:
    """The teacher's DDIM samples at each of :data:`DDIM_STEPS` from the same ``n`` noises (labels cycle 0..9),
    cached per step count (the many-step row dominates the run time on a CPU)."""
    from safetensors.torch import load_file, save_file

    from rayflow.distillation import load_generator

    teacher = load_generator(model=teacher_dir)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n, *teacher.sample_shape, generator=g)
    labels = torch.arange(n) % teacher.num_classes
    out = {}
    for steps in steps_list:
        path = cache / f"ddim-{steps}-n{n}.safetensors"
        if not path.exists():
            t0 = time.perf_counter()
            x = teacher.generate(noise, steps, cond=labels, guidance=1.0, sampler="ddim", batch_size=batch_size)
            cache.mkdir(parents=True, exist_ok=True)
            save_file({"x": x.contiguous()}, str(path))
            print(f"  DDIM {steps} steps, {n} samples: {time.perf_counter() - t0:.0f} s", flush=True)
        out[steps] = load_file(str(path))["x"]
    return out


class Judge:
    """Every metric of one run, with the reference features computed once per feature space."""

    def __init__(self, net: FeatureNet, net2: FeatureNet, reference: torch.Tensor, kid_subset: int,
                 inception: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self.net, self.net2, self.kid_subset, self.inception = net, net2, kid_subset, inception
        ref = _quantised(reference)
        self.ref = {"ml": extract_features(net, ref, space="multilayer"),
                    "pooled": extract_features(net, ref, space="pooled"),
                    "ml2": extract_features(net2, ref, space="multilayer")}
        if inception is not None:
            self.ref["inception"] = inception(ref)

    def score(self, x: torch.Tensor) -> dict[str, float]:
        x = _quantised(x)
        ml = extract_features(self.net, x, space="multilayer")
        m = min(self.kid_subset, x.shape[0])
        out = {"fd": frechet_distance(ml, self.ref["ml"]),
               "fd_classifier": frechet_distance(extract_features(self.net, x, space="pooled"), self.ref["pooled"]),
               "kid": kernel_distance(ml, self.ref["ml"], num_subsets=10, subset_size=m)[0],
               "fd_net2": frechet_distance(extract_features(self.net2, x, space="multilayer"), self.ref["ml2"])}
        if self.inception is not None:
            out["inception_fid"] = frechet_distance(self.inception(x), self.ref["inception"])
        return out


def _quantised(x: torch.Tensor) -> torch.Tensor:
    """As rayflow eval scores samples: through the uint8 round trip of a saved PNG."""
    return torch.from_numpy(to_uint8_images(x)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def checks(rows: list[dict], metrics: list[str]) -> dict[str, dict]:
    """Per metric: monotonicity in every corruption, the floor check for the mildest blur and noise, DDIM's
    fall with steps, and Kendall tau against ``fd_net2``."""
    out = {}
    for m in metrics:
        res: dict = {"monotone": {}, "floor": None, "ddim_monotone": None}
        floor = next(r[m] for r in rows if r["group"] == "floor" and r["name"] == "train vs test")
        for c in STRENGTHS:
            v = [r[m] for r in rows if r["group"] == "corruption" and r["name"] == c]
            res["monotone"][c] = bool(all(b > a for a, b in zip(v, v[1:])) and v[0] > floor)
        mild = {c: next(r[m] for r in rows if r["name"] == c and r["strength"] == STRENGTHS[c][0])
                for c in ("blur", "noise")}
        res["floor"] = {"floor": floor, **{f"{c}_ratio": mild[c] / max(floor, 1e-12) for c in mild},
                        # an unbiased estimate (KID) has its floor at ~0 or below: a multiple of it is meaningless
                        "pass": bool(all(v >= FLOOR_FACTOR * floor for v in mild.values())) if floor > 0 else None}
        dd = [r[m] for r in sorted((r for r in rows if r["group"] == "ddim"), key=lambda r: r["strength"])]
        if dd:
            res["ddim_monotone"] = bool(all(b < a for a, b in zip(dd, dd[1:])))
        if m != "fd_net2":
            pairs = [(r[m], r["fd_net2"]) for r in rows if r["group"] != "floor"]
            res["kendall_tau_vs_fd_net2"] = kendall_tau([a for a, _ in pairs], [b for _, b in pairs])
        res["pass"] = bool(all(res["monotone"].values()) and res["floor"]["pass"] is not False
                           and res["ddim_monotone"] is not False)
        out[m] = res
    return out


def markdown(result: dict) -> str:
    """The rows as a Markdown table (each score also as a multiple of its floor) and the checks under it."""
    rows, checks_ = result["rows"], result["checks"]
    metrics = list(checks_)
    floors = {"corruption": "train vs test", "floor": "train vs test", "ddim": "test, ddim n"}
    lines = ["| row | strength | n | " + " | ".join(metrics) + " |", "|---|---:|---:|" + "---:|" * len(metrics)]
    for r in rows:
        floor = next(f for f in rows if f["name"] == floors[r["group"]])
        cells = [f"{r[m]:.4g} ({r[m] / floor[m]:.2g}×)" if r["group"] != "floor" else f"{r[m]:.4g}"
                 for m in metrics]
        lines.append(f"| {r['name']} | {r['strength']:g} | {r['n']} | " + " | ".join(cells) + " |")
    lines += ["", "| check | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    def monotone(m: str) -> str:
        bad = [c for c, ok in checks_[m]["monotone"].items() if not ok]
        return f"{len(STRENGTHS) - len(bad)}/{len(STRENGTHS)}" + (f" (not: {', '.join(bad)})" if bad else "")

    lines.append("| rises with strength | " + " | ".join(monotone(m) for m in metrics) + " |")
    lines.append(f"| mildest blur, noise ≥ {FLOOR_FACTOR}× floor | " + " | ".join(
        f"{checks_[m]['floor']['blur_ratio']:.2f}×, {checks_[m]['floor']['noise_ratio']:.2f}×"
        if checks_[m]["floor"]["pass"] is not None else "n/a (floor ≤ 0)" for m in metrics)
                 + " |")
    lines.append("| DDIM falls with steps | " + " | ".join(str(checks_[m]["ddim_monotone"]) for m in metrics) + " |")
    lines.append("| Kendall τ vs fd_net2 (all non-floor rows) | " + " | ".join(
        f"{checks_[m]['kendall_tau_vs_fd_net2']:.3f}" if "kendall_tau_vs_fd_net2" in checks_[m] else "–"
        for m in metrics) + " |")
    lines.append("| passes | " + " | ".join(str(checks_[m]["pass"]) for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], metrics: list[str], path: Path) -> None:
    from rayflow.evaluation import _new_figure, _save_figure

    groups = [*STRENGTHS, "ddim"]
    fig = _new_figure((3.0 * 5, 2.6 * 2))
    for i, c in enumerate(groups):
        ax = fig.add_subplot(2, 5, i + 1)
        sel = [r for r in rows if (r["name"] == c if c != "ddim" else r["group"] == "ddim")]
        xs = list(range(len(sel)))
        for j, m in enumerate(metrics):
            floor = next(r[m] for r in rows if r["name"] == ("train vs test" if c != "ddim" else "test, ddim n"))
            if floor <= 0 or m == "kid":
                continue  # an unbiased estimate (KID) sits at ~0 on the floor: a multiple of it means nothing
            ax.plot(xs, [max(r[m], 1e-12) / max(floor, 1e-12) for r in sel], marker="o", color=f"C{j}", label=m)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(int(r["strength"]) if float(r["strength"]).is_integer() else r["strength"])
                           for r in sel], fontsize=7)
        ax.set_title(c if c != "ddim" else "teacher DDIM steps", fontsize=9)
        ax.tick_params(labelsize=7)
        if i % 5 == 0:
            ax.set_ylabel("score / floor", fontsize=8)
    fig.axes[0].legend(fontsize=6)
    _save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="Fashion-MNIST directory (idx files)")
    p.add_argument("--teacher", default=str(REPO / "benchmarks/checkpoints/fashion-mnist-teacher"))
    p.add_argument("--feature-net", default=str(REPO / "benchmarks/checkpoints/fashion-mnist-feature-net"))
    p.add_argument("--net2", default=str(REPO / "benchmarks/checkpoints/fashion-mnist-feature-net-2"),
                   help="second feature net (width 24, 64-d head, seed 1); trained and saved here when missing")
    p.add_argument("--num", type=int, default=1000, help="images per corruption row")
    p.add_argument("--ref-num", type=int, default=5000, help="held-out reference images")
    p.add_argument("--ddim-num", type=int, default=300, help="teacher samples per DDIM row (0: no DDIM rows)")
    p.add_argument("--ddim-steps", default=",".join(map(str, DDIM_STEPS)), help="DDIM step counts of the rows")
    p.add_argument("--net2-steps", type=int, default=600, help="training steps of the second feature net")
    p.add_argument("--cache", default="runs/metric-validation",
                   help="where DDIM samples and finished rows are cached (a re-run resumes)")
    p.add_argument("--results", default=str(REPO / "benchmarks/results"))
    p.add_argument("--inception", action="store_true", help="also Inception FID (the [fid] extra; slow on a CPU)")
    p.add_argument("--tiny", action="store_true", help="a seconds-long dry run (small sets, untrained second net)")
    args = p.parse_args(argv)
    try:
        return run(args)
    except RayflowError as e:
        print(f"rayflow: error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    spec = f"fashion-mnist:path={args.data},pad=32"
    test, train = load_dataset(spec, split="test"), load_dataset(spec, split="train")
    if args.tiny:
        args.num, args.ref_num, args.ddim_num = 60, 200, min(args.ddim_num, 4)
    require(args.ref_num + args.num <= test.x.shape[0], f"--ref-num + --num must be <= {test.x.shape[0]}")
    net = load_feature_net(args.feature_net)
    if Path(args.net2, "feature_net.safetensors").exists():
        net2 = load_feature_net(args.net2)
    else:
        t0 = time.perf_counter()
        steps = 20 if args.tiny else args.net2_steps
        with torch.random.fork_rng(devices=[]):
            net2 = train_feature_net(train, steps=steps, batch_size=64, seed=1, width=24, feature_dim=64,
                                     progress=False)
        if not args.tiny:
            save_feature_net(net2, args.net2)
        print(f"second feature net: {steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    inception = None
    if args.inception:
        from rayflow.metrics import InceptionFeatures

        inception = InceptionFeatures().extract
    reference = test.x[: args.ref_num]
    pool, pool_labels = test.x[args.ref_num:], test.labels[args.ref_num:]
    clean, clean_labels = pool[: args.num], pool_labels[: args.num]
    judge = Judge(net, net2, reference, kid_subset=1000, inception=inception)
    g = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    cache = Path(args.cache)
    done_path = cache / f"rows-n{args.num}-ref{args.ref_num}{'-tiny' if args.tiny else ''}.json"
    done = {(r["group"], r["name"], r["strength"], r["n"]): r for r in
            (json.loads(done_path.read_text()) if done_path.exists() else [])}

    def add(group: str, name: str, strength: float, x: torch.Tensor) -> None:
        t0 = time.perf_counter()
        key = (group, name, strength, int(x.shape[0]))
        row = done.get(key) or {"group": group, "name": name, "strength": strength, "n": int(x.shape[0]),
                                **judge.score(x)}
        rows.append(row)
        done[key] = row
        cache.mkdir(parents=True, exist_ok=True)
        done_path.write_text(json.dumps(list(done.values()), indent=1) + "\n")
        print(f"{group:10s} {name:16s} {strength:>6g}  " + "  ".join(
            f"{m} {row[m]:.4g}" for m in METRICS if m in row) + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)

    tr_idx = torch.randperm(train.x.shape[0], generator=g)[: args.num]
    add("floor", "train vs test", 0, train.x[tr_idx])
    add("floor", "test vs test", 0, clean)
    if args.ddim_num > 0:
        add("floor", "test, ddim n", 0, pool[: args.ddim_num])
        steps_list = tuple(int(v) for v in args.ddim_steps.split(","))
        for steps, x in ddim_samples(args.teacher, args.ddim_num, cache, steps_list).items():
            add("ddim", "ddim", steps, x)
    for c, strengths in STRENGTHS.items():
        for s in strengths:
            add("corruption", c, s, corrupt(c, s, clean, clean_labels, pool, pool_labels, train.x, g))
    metrics = [m for m in METRICS if m in rows[0]]
    result = {"rows": rows, "checks": checks(rows, metrics), "seconds": time.perf_counter() - t_start,
              "config": {"num": args.num, "ref_num": args.ref_num, "ddim_num": args.ddim_num,
                         "ddim_steps": args.ddim_steps, "net2_steps": args.net2_steps, "data": "fashion-mnist",
                         "feature_net": net.name, "net2": {"name": net2.name, "width": net2.width,
                                                           "feature_dim": net2.feature_dim},
                         "strengths": STRENGTHS, "tiny": args.tiny},
              "env": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                      "cpus": torch.get_num_threads()}}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = "metric_validation" + ("_tiny" if args.tiny else "")
    (results / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, metrics, results / f"{stem}.png")
    (results / f"{stem}.md").write_text(markdown(result))
    for m, r in result["checks"].items():
        fails = [c for c, ok in r["monotone"].items() if not ok]
        print(f"{m:14s} pass={r['pass']}  non-monotone: {fails or 'none'}  floor x{r['floor']['blur_ratio']:.1f} "
              f"(blur) x{r['floor']['noise_ratio']:.1f} (noise)  ddim falls: {r['ddim_monotone']}  "
              f"tau vs net2: {r.get('kendall_tau_vs_fd_net2', float('nan')):.3f}")
    print(f"wrote {results / stem}.json and .png in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
