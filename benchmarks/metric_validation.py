#!/usr/bin/env python
"""Does an image metric see what a person sees? Controlled degradations of Fashion-MNIST, scored by every metric.

    python benchmarks/metric_validation.py --data ../shared/data/fashion-mnist --device cuda --train-steps 3000
    python benchmarks/metric_validation.py --data ... --inception                         # + Inception FID (slow)
    python benchmarks/metric_validation.py --tiny --data ... --device cpu                 # a seconds-long dry run

The held-out test split is cut in two: the first ``--ref-num`` images are the reference, images after them are
the clean "samples" that get corrupted, each corruption at three strengths (Gaussian blur, additive Gaussian
noise, contrast loss toward grey, stroke thinning/thickening by grey-scale erosion/dilation, JPEG quantisation,
dropped classes, copies of a few training images). The committed class-conditional teacher adds real sampler
outputs (DDIM at 1, 2, 4, 8, 50 steps from the same noise; cached under ``--cache``). The floor (what a perfect
generator scores at this ``N``) is ``--floor-resamples`` independent sets of ``N`` training images; its mean and
standard deviation over those sets make the floor check.

Every row is scored by every metric of :data:`METRIC_VIEWS` (``fd`` and ``kid``: rayflow's default, FD/KID of the
feature net's early view, :meth:`~rayflow.metrics.FeatureNet.early_features`; ``fd_multilayer``: the statistics
of every stage, the default before; ``fd_classifier``: the pooled features, the default before that;
``fd_zscored``: a candidate view) under each feature network: the committed one (since the early view became the
default, the autoencoder-trained ``fashion-mnist-ae-feature-net``), the committed second network of another
width and seed (columns ``*_net2``) and, with ``--train-steps``, two fresh pairs trained here (``*_a``/``*_b``,
``*_c``/``*_d``; saved under ``--results``/feature-nets). ``--feature-net``/``--net2`` select another pair (the
older classifier pair ``fashion-mnist-feature-net{,-2}`` reproduces the suite's earlier tables). With
``--inception``, also the Inception FID of the ``[fid]`` extra.

The checks (printed and written to the JSON), per metric and network: each corruption's score rises with
strength, the mildest above the floor; the mildest blur and noise score at least 1.5x the floor's mean and at
least 3 of its standard deviations above it; DDIM's score falls with steps; and, per metric, the Kendall tau
between the two networks of each pair over all non-floor rows. Writes ``metric_validation.{json,md,png}`` into
``--results`` (the finished rows also as they go, in ``metric_validation_rows.json``).
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
    FrechetStats,
    extract_features,
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
FLOOR_Z = 3.0  # ... and at least this many standard deviations of the floor over resampled training images
# metric -> (feature view, distance), named as rayflow eval names its columns. Views of a FeatureNet: "early"
# (FeatureNet.early_features: the statistics of its first two stages, 32x32 and 16x16, fine detail; the default
# fd/kid), "multilayer" (FeatureNet.multilayer_features, every stage), "pooled" (FeatureNet.features),
# "zscored" (multilayer, each coordinate divided by its standard deviation over the reference, so low-variance
# detail coordinates weigh as much as class-related ones; a candidate, not in rayflow eval). Results written
# before the early view became the default called it fd_early, and fd was the multilayer view.
METRIC_VIEWS: dict[str, tuple[str, str]] = {
    "fd": ("early", "fd"), "kid": ("early", "kid"), "fd_multilayer": ("multilayer", "fd"),
    "fd_classifier": ("pooled", "fd"), "fd_zscored": ("zscored", "fd"),
}
# the committed pair of independent networks: "" (--feature-net) and "_net2" (--net2); with --train-steps two
# pairs trained in this run: classifiers "_a" (width 32, 128-d, seed 10) and "_b" (width 24, 64-d, seed 11), and
# the same with an autoencoder term (train_feature_net's recon_weight), "_c" and "_d", not class-invariant (the
# committed pair's recipe: benchmarks/ae_feature_nets.py)
NET_PAIRS: tuple[tuple[str, str], ...] = (("", "_net2"), ("_a", "_b"), ("_c", "_d"))
TRAINED_NETS: dict[str, dict[str, float]] = {
    "_a": {"width": 32, "feature_dim": 128, "seed": 10, "recon_weight": 0.0},
    "_b": {"width": 24, "feature_dim": 64, "seed": 11, "recon_weight": 0.0},
    "_c": {"width": 32, "feature_dim": 128, "seed": 12, "recon_weight": 1.0},
    "_d": {"width": 24, "feature_dim": 64, "seed": 13, "recon_weight": 1.0},
}


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


def corrupt(name: str, s: float, clean: torch.Tensor, train: torch.Tensor, train_labels: torch.Tensor,
            g: torch.Generator) -> torch.Tensor:
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
        # N training images of the classes that are kept: the same number of samples, less variety. From the
        # training split (as the floor row), because 2 of 10 classes of the held-out pool hold fewer than 1000
        keep = train_labels >= int(s)
        idx = torch.nonzero(keep).squeeze(1)
        require(idx.shape[0] >= n, f"drop_classes {s}: {idx.shape[0]} training images left, need {n}")
        y = train[idx[torch.randperm(idx.shape[0], generator=g)[:n]]]
    elif name == "memorise":
        # copies of int(s) training images (plus rounding-level noise): a generator that memorised its data
        picks = torch.randperm(train.shape[0], generator=g)[: int(s)]
        y = train[picks[torch.arange(n) % picks.shape[0]]] + 0.004 * torch.randn(clean.shape, generator=g)
    else:
        raise RayflowError(f"unknown corruption {name!r}")
    return y.clamp(-1, 1)


def ddim_samples(teacher_dir: str, n: int, cache: Path, steps_list: tuple[int, ...] = DDIM_STEPS,
                 batch_size: int = 1000, device: str = "cpu") -> dict[int, torch.Tensor]:
    """The teacher's DDIM samples at each of :data:`DDIM_STEPS` from the same ``n`` noises (labels cycle 0..9),
    cached per step count (the many-step row dominates the run time on a CPU)."""
    from safetensors.torch import load_file, save_file

    from rayflow.distillation import load_generator

    teacher = load_generator(model=teacher_dir, device=device)
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
    """Every metric of one run under every feature network, the reference statistics computed once."""

    def __init__(self, nets: dict[str, FeatureNet], reference: torch.Tensor, kid_subset: int, device: str,
                 inception: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self.nets, self.kid_subset, self.device, self.inception = nets, kid_subset, device, inception
        ref = _quantised(reference)
        self.ref: dict[tuple[str, str], torch.Tensor] = {}
        self.stats: dict[tuple[str, str], FrechetStats] = {}
        self.scale: dict[str, torch.Tensor] = {}
        for tag, net in nets.items():
            views = self._views(tag, net, ref)
            for view, f in views.items():
                self.ref[tag, view] = f
                self.stats[tag, view] = FrechetStats(f)
        if inception is not None:
            f = inception(ref).to(device)
            self.ref["", "inception"], self.stats["", "inception"] = f, FrechetStats(f)

    def _views(self, tag: str, net: FeatureNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
        ml = extract_features(net, x, space="multilayer").to(self.device)
        if tag not in self.scale:  # first call: the reference, whose spread defines the z-scored view
            self.scale[tag] = ml.std(0).clamp(min=1e-8)
        # the early view is the first early_dim columns of the multi-layer statistics (FeatureNet.early_features
        # computes the same; slicing spares a second pass of the network)
        return {"multilayer": ml, "pooled": extract_features(net, x, space="pooled").to(self.device),
                "early": ml[:, :net.early_dim], "zscored": ml / self.scale[tag]}

    def score(self, x: torch.Tensor) -> dict[str, float]:
        x = _quantised(x)
        out: dict[str, float] = {}
        for tag, net in self.nets.items():
            views = self._views(tag, net, x)
            for metric, (view, distance) in METRIC_VIEWS.items():
                if distance == "fd":
                    out[metric + tag] = self.stats[tag, view].distance(views[view])
                else:
                    m = min(self.kid_subset, x.shape[0])
                    out[metric + tag] = kernel_distance(views[view], self.ref[tag, view], num_subsets=10,
                                                        subset_size=m, device=self.device)[0]
        if self.inception is not None:
            out["inception_fid"] = self.stats["", "inception"].distance(self.inception(x).to(self.device))
        return out


def _quantised(x: torch.Tensor) -> torch.Tensor:
    """As rayflow eval scores samples: through the uint8 round trip of a saved PNG."""
    return torch.from_numpy(to_uint8_images(x)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _split(column: str) -> tuple[str, str]:
    """``fd_net2`` -> ``("fd", "_net2")``, ``kid_a`` -> ``("kid", "_a")``, ``fd`` -> ``("fd", "")``."""
    for tag in sorted((t for pair in NET_PAIRS for t in pair if t), key=len, reverse=True):
        if column.endswith(tag) and column[: -len(tag)] in METRIC_VIEWS:
            return column[: -len(tag)], tag
    return column, ""


def _partner(column: str) -> str | None:
    """The same metric under the second network of the column's pair (``fd`` -> ``fd_net2``, ``kid_a`` ->
    ``kid_b``), or ``None`` for a second network's column and for metrics outside :data:`METRIC_VIEWS`."""
    base, tag = _split(column)
    if base not in METRIC_VIEWS:
        return None
    return next((base + second for first, second in NET_PAIRS if first == tag), None)


def checks(rows: list[dict], metrics: list[str]) -> dict[str, dict]:
    """Per metric: monotonicity in every corruption, the floor check for the mildest blur and noise, DDIM's
    fall with steps, and Kendall tau against the same metric under the other network of its pair."""
    out = {}
    for m in metrics:
        res: dict = {"monotone": {}, "floor": None, "ddim_monotone": None}
        fl = torch.tensor([r[m] for r in rows if r["group"] == "floor" and r["name"] == "train vs test"],
                          dtype=torch.float64)
        floor, spread = float(fl.mean()), float(fl.std()) if fl.numel() > 1 else 0.0
        for c in STRENGTHS:
            v = [r[m] for r in rows if r["group"] == "corruption" and r["name"] == c]
            res["monotone"][c] = bool(all(b > a for a, b in zip(v, v[1:])) and v[0] > floor)
        mild = {c: next(r[m] for r in rows if r["name"] == c and r["strength"] == STRENGTHS[c][0])
                for c in ("blur", "noise")}
        ok = [(floor <= 0 or v >= FLOOR_FACTOR * floor) and (spread == 0 or v - floor >= FLOOR_Z * spread)
              for v in mild.values()]
        res["floor"] = {"floor": floor, "floor_std": spread, "resamples": int(fl.numel()),
                        **{f"{c}_ratio": mild[c] / floor if floor > 0 else float("nan") for c in mild},
                        **{f"{c}_z": (mild[c] - floor) / spread if spread > 0 else float("nan") for c in mild},
                        "pass": bool(all(ok))}
        dd = [r[m] for r in sorted((r for r in rows if r["group"] == "ddim"), key=lambda r: r["strength"])]
        if dd:
            res["ddim_monotone"] = bool(all(b < a for a, b in zip(dd, dd[1:])))
        partner = _partner(m)
        if partner is not None and partner in metrics:
            pairs = [(r[m], r[partner]) for r in rows if r["group"] != "floor"]
            res["kendall_tau_partner"] = partner
            res["kendall_tau"] = kendall_tau([a for a, _ in pairs], [b for _, b in pairs])
        res["pass"] = bool(all(res["monotone"].values()) and res["floor"]["pass"]
                           and res["ddim_monotone"] is not False)
        out[m] = res
    return out


def markdown(result: dict) -> str:
    """The rows as a Markdown table (each score also as a multiple of its floor) and the checks under it."""
    rows, checks_ = result["rows"], result["checks"]
    metrics = list(checks_)
    shown = [m for m in metrics if _split(m)[1] in ("", "_net2")]  # the trained pairs: in the JSON only
    floors = {m: checks_[m]["floor"]["floor"] for m in metrics}
    ddim_floor = next((f for f in rows if f["name"] == "test, ddim n"), None)
    lines = ["| row | strength | n | " + " | ".join(shown) + " |", "|---|---:|---:|" + "---:|" * len(shown)]
    for r in rows:
        base = {m: (ddim_floor[m] if r["group"] == "ddim" and ddim_floor else floors[m]) for m in shown}
        cells = [f"{r[m]:.4g} ({r[m] / base[m]:.2g}×)" if r["group"] != "floor" and base[m] > 0 else f"{r[m]:.4g}"
                 for m in shown]
        lines.append(f"| {r['name']} | {r['strength']:g} | {r['n']} | " + " | ".join(cells) + " |")
    lines += ["", f"| metric | rises with strength | floor ± std ({_resamples(checks_)} resamples) | mildest blur, "
                  f"noise: ≥ {FLOOR_FACTOR}× floor and z ≥ {FLOOR_Z:g} | DDIM falls with steps | Kendall τ vs the "
                  f"pair's other network | passes |", "|---|---|---|---|---|---|---|"]
    for m in metrics:
        c = checks_[m]
        bad = [k for k, ok in c["monotone"].items() if not ok]
        f = c["floor"]
        ratio = f"{f['blur_ratio']:.2f}×, {f['noise_ratio']:.2f}×" if f["floor"] > 0 else "floor ≤ 0"
        tau = f"{c['kendall_tau']:.3f} (vs {c['kendall_tau_partner']})" if "kendall_tau" in c else "–"
        rises = f"{len(STRENGTHS) - len(bad)}/{len(STRENGTHS)}" + (f" (not: {', '.join(bad)})" if bad else "")
        z = f"z {f['blur_z']:.1f}, {f['noise_z']:.1f}"
        lines.append(f"| {m} | {rises} | {f['floor']:.4g} ± {f['floor_std']:.2g} | {ratio}; {z} "
                     f"| {c['ddim_monotone']} | {tau} | {c['pass']} |")
    return "\n".join(lines) + "\n"


def _resamples(checks_: dict) -> int:
    return next(iter(checks_.values()))["floor"]["resamples"]


def plot(rows: list[dict], metrics: list[str], path: Path) -> None:
    from rayflow.evaluation import _new_figure, _save_figure

    groups = [*STRENGTHS, "ddim"]
    fig = _new_figure((3.0 * 5, 2.6 * 2))
    floors = {m: float(np.mean([r[m] for r in rows if r["name"] == "train vs test"])) for m in metrics}
    ddim_floor = next((r for r in rows if r["name"] == "test, ddim n"), None)
    for i, c in enumerate(groups):
        ax = fig.add_subplot(2, 5, i + 1)
        sel = [r for r in rows if (r["name"] == c if c != "ddim" else r["group"] == "ddim")]
        xs = list(range(len(sel)))
        for j, m in enumerate(metrics):
            floor = ddim_floor[m] if c == "ddim" and ddim_floor else floors[m]
            if floor <= 0 or m.startswith("kid"):
                continue  # an unbiased estimate (KID) sits at ~0 on the floor: a multiple of it means nothing
            ax.plot(xs, [max(r[m], 1e-12) / floor for r in sel], marker="o", color=f"C{j % 10}", label=m)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(int(r["strength"]) if float(r["strength"]).is_integer() else r["strength"])
                           for r in sel], fontsize=7)
        ax.set_title(c if c != "ddim" else "teacher DDIM steps", fontsize=9)
        ax.tick_params(labelsize=7)
        if i % 5 == 0:
            ax.set_ylabel("score / floor", fontsize=8)
    fig.axes[0].legend(fontsize=5)
    _save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="Fashion-MNIST directory (idx files)")
    p.add_argument("--teacher", default=str(REPO / "benchmarks/checkpoints/fashion-mnist-teacher"))
    p.add_argument("--feature-net", default=str(REPO / "benchmarks/checkpoints/fashion-mnist-ae-feature-net"),
                   help="feature net 1 (default: the committed autoencoder-trained network of the default fd)")
    p.add_argument("--net2", default=str(REPO / "benchmarks/checkpoints/fashion-mnist-ae-feature-net-2"),
                   help="second feature net; when missing, trained and saved here as benchmarks/ae_feature_nets.py "
                        "trains the committed one (width 24, 64-d head, seed 13, autoencoder term, batch 128)")
    p.add_argument("--num", type=int, default=1000, help="images per corruption row")
    p.add_argument("--ref-num", type=int, default=5000, help="held-out reference images")
    p.add_argument("--ddim-num", type=int, default=1000, help="teacher samples per DDIM row (0: no DDIM rows)")
    p.add_argument("--ddim-steps", default=",".join(map(str, DDIM_STEPS)), help="DDIM step counts of the rows")
    p.add_argument("--net2-steps", type=int, default=1500, help="training steps of --net2 when it is missing")
    p.add_argument("--train-steps", type=int, default=0,
                   help="also train two fresh pairs of feature nets (TRAINED_NETS: classifiers, and classifiers with "
                        "an autoencoder term) this many steps at batch 128 and score every row with them (0: no)")
    p.add_argument("--floor-resamples", type=int, default=4,
                   help="independent sets of training images for the floor's mean and standard deviation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache", default="runs/metric-validation",
                   help="where DDIM samples and finished rows are cached (a re-run resumes)")
    p.add_argument("--results", default=str(REPO / "benchmarks/results"))
    p.add_argument("--inception", action="store_true", help="also Inception FID (the [fid] extra; slow on a CPU)")
    p.add_argument("--tiny", action="store_true",
                   help="a dry run of the plumbing (small sets, narrow networks trained a few steps)")
    args = p.parse_args(argv)
    try:
        return run(args)
    except RayflowError as e:
        print(f"rayflow: error: {e}", file=sys.stderr)
        return 2


def _load_nets(args: argparse.Namespace, train) -> dict[str, FeatureNet]:
    """The committed pair (the second trained and saved when missing) and, with --train-steps, two fresh pairs.

    A --tiny run replaces every network by a narrow one (width 4) trained a few steps: it checks the plumbing, and
    the eigen-decompositions of the full networks' 1216-d statistics would dominate it on a CPU.
    """
    if args.tiny:
        hps = {"": {"seed": 0}, "_net2": {"seed": 1}, **({t: {"seed": int(hp["seed"]), "recon_weight": hp.get(
            "recon_weight", 0.0)} for t, hp in TRAINED_NETS.items()} if args.train_steps > 0 else {})}
        with torch.random.fork_rng(devices=[]):
            nets = {tag: train_feature_net(train, steps=5, batch_size=16, width=4, feature_dim=8, progress=False,
                                           device=args.device, **hp) for tag, hp in hps.items()}
        return {tag: net.eval() for tag, net in nets.items()}
    nets = {"": load_feature_net(args.feature_net)}
    if Path(args.net2, "feature_net.safetensors").exists():
        nets["_net2"] = load_feature_net(args.net2)
    else:
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            nets["_net2"] = train_feature_net(train, steps=args.net2_steps, batch_size=128, seed=13, width=24,
                                              feature_dim=64, recon_weight=1.0, progress=False, device=args.device)
        save_feature_net(nets["_net2"], args.net2)
        print(f"second feature net: {args.net2_steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.train_steps > 0:
        for tag, hp in TRAINED_NETS.items():
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                net = train_feature_net(train, steps=args.train_steps, batch_size=128, progress=False,
                                        device=args.device, **hp)
            save_feature_net(net, Path(args.results) / "feature-nets" / tag.strip("_"))
            nets[tag] = net
            print(f"feature net {tag.strip('_')} ({hp}): {args.train_steps} steps in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    return {tag: net.to(args.device).eval() for tag, net in nets.items()}


def _fingerprint(nets: dict[str, FeatureNet]) -> str:
    """A short hash of the networks' tags and weights and of :data:`METRIC_VIEWS` (the row cache's key)."""
    import hashlib

    h = hashlib.sha1(json.dumps(METRIC_VIEWS, sort_keys=True).encode())
    for tag, net in sorted(nets.items()):
        h.update(tag.encode())
        for k, v in net.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:12]


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    require(args.floor_resamples >= 2, f"--floor-resamples must be >= 2, got {args.floor_resamples}")
    if args.device.startswith("cuda"):
        require(torch.cuda.is_available(), f"--device {args.device}: no CUDA device here; use --device cpu")
    spec = f"fashion-mnist:path={args.data},pad=32"
    test, train = load_dataset(spec, split="test"), load_dataset(spec, split="train")
    if args.tiny:
        args.num, args.ref_num, args.ddim_num = 60, 200, min(args.ddim_num, 4)
    require(args.ref_num + args.num <= test.x.shape[0], f"--ref-num + --num must be <= {test.x.shape[0]}")
    require(args.floor_resamples * args.num <= train.x.shape[0], "--floor-resamples x --num exceeds the training set")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    nets = _load_nets(args, train)
    inception = None
    if args.inception:
        from rayflow.metrics import InceptionFeatures

        inception = InceptionFeatures().extract
    reference = test.x[: args.ref_num]
    pool = test.x[args.ref_num:]
    clean = pool[: args.num]
    t0 = time.perf_counter()
    judge = Judge(nets, reference, kid_subset=1000, device=args.device, inception=inception)
    print(f"reference statistics: {time.perf_counter() - t0:.0f} s", flush=True)
    g = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    cache = Path(args.cache)
    stem = "metric_validation" + ("_tiny" if args.tiny else "")
    # finished rows are reused only for the same sizes, the same networks (their weights) and the same metrics
    cache_key = f"rows-n{args.num}-ref{args.ref_num}-{_fingerprint(nets)}" + ("-tiny" if args.tiny else "")
    done_path = cache / f"{cache_key}.json"
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
        (results / f"{stem}_rows.json").write_text(json.dumps(rows, indent=1) + "\n")  # partial results
        print(f"{group:10s} {name:16s} {strength:>6g}  " + "  ".join(
            f"{m} {row[m]:.4g}" for m in ("fd", "fd_net2", "fd_a", "fd_b", "fd_c", "fd_d", "fd_multilayer", "kid",
                                          "inception_fid")
            if m in row)
              + f"  ({time.perf_counter() - t0:.1f} s)", flush=True)

    for k in range(args.floor_resamples):  # disjoint sets of training images: the floor and its spread
        add("floor", "train vs test", k, train.x[torch.randperm(train.x.shape[0], generator=g)[: args.num]])
    add("floor", "test vs test", 0, clean)
    if args.ddim_num > 0:
        add("floor", "test, ddim n", 0, pool[: args.ddim_num])
        steps_list = tuple(int(v) for v in args.ddim_steps.split(","))
        for steps, x in ddim_samples(args.teacher, args.ddim_num, cache, steps_list, device=args.device).items():
            add("ddim", "ddim", steps, x)
    for c, strengths in STRENGTHS.items():
        for s in strengths:
            add("corruption", c, s, corrupt(c, s, clean, train.x, train.labels, g))
    metrics = [m for m in rows[0] if m not in ("group", "name", "strength", "n")]
    result = {"rows": rows, "checks": checks(rows, metrics), "seconds": time.perf_counter() - t_start,
              "config": {"num": args.num, "ref_num": args.ref_num, "ddim_num": args.ddim_num,
                         "ddim_steps": args.ddim_steps, "train_steps": args.train_steps,
                         "floor_resamples": args.floor_resamples, "data": "fashion-mnist",
                         "nets": {tag.strip("_") or "net1": {"name": n.name, "width": n.width,
                                                             "feature_dim": n.feature_dim}
                                  for tag, n in nets.items()},
                         "metric_views": METRIC_VIEWS, "strengths": STRENGTHS, "tiny": args.tiny,
                         "device": args.device},
              "env": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                      "threads": torch.get_num_threads(),
                      "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}}
    (results / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, [m for m in metrics if _split(m)[1] in ("", "_net2")], results / f"{stem}.png")
    (results / f"{stem}.md").write_text(markdown(result))
    for m, r in result["checks"].items():
        fails = [c for c, ok in r["monotone"].items() if not ok]
        f = r["floor"]
        print(f"{m:18s} pass={r['pass']!s:5s} non-monotone: {fails or 'none'}  floor {f['floor']:.4g}±"
              f"{f['floor_std']:.2g}  blur x{f['blur_ratio']:.2f} z{f['blur_z']:.1f}  noise x{f['noise_ratio']:.2f} "
              f"z{f['noise_z']:.1f}  ddim falls: {r['ddim_monotone']}  tau: {r.get('kendall_tau', float('nan')):.3f}")
    print(f"wrote {results / stem}.json, .md and .png in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
