#!/usr/bin/env python
"""Train the committed pair of Fashion-MNIST feature networks that the default ``fd`` and ``fd_net2`` use.

    python benchmarks/ae_feature_nets.py --data ../shared/data/fashion-mnist     # ~minutes on a CPU

Both are :func:`rayflow.metrics.train_feature_net` with the autoencoder term (``recon_weight=1``) on the full
training split (60 000 images, 32x32 padded), 1500 steps at batch 128: the recipe of the pair ``_c``/``_d`` of
``benchmarks/metric_validation.py --train-steps 1500``, the only pair whose early view passed the whole
degradation suite (BENCHMARKS.md section 5.1). Network 1: width 32, 128-d head, seed 12; network 2 (the
independent judge of ``fd_net2``): width 24, 64-d head, seed 13. Writes them to ``--out`` (default
``benchmarks/checkpoints/fashion-mnist-ae-feature-net`` and ``...-ae-feature-net-2``) and their test-split class
accuracy and training time to ``benchmarks/results/ae_feature_nets.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from rayflow.checkpoint import write_json_atomic  # noqa: E402
from rayflow.data import load_dataset  # noqa: E402
from rayflow.errors import RayflowError, require  # noqa: E402
from rayflow.metrics import classifier_accuracy, save_feature_net, train_feature_net  # noqa: E402

#: directory suffix -> train_feature_net settings (the metric suite's "_c" and "_d")
NETS: dict[str, dict[str, float]] = {
    "": {"width": 32, "feature_dim": 128, "seed": 12, "recon_weight": 1.0},
    "-2": {"width": 24, "feature_dim": 64, "seed": 13, "recon_weight": 1.0},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="Fashion-MNIST directory (idx files)")
    p.add_argument("--out", default=str(REPO / "benchmarks/checkpoints/fashion-mnist-ae-feature-net"),
                   help="directory of network 1; network 2 goes to the same path + '-2'")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--nets", default="1,2",
                   help="which of the two to train (e.g. 2: one process per network on a multi-core machine); the "
                        "results file keeps the other's entry")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (the committed pair was trained on a CPU)")
    p.add_argument("--progress", action="store_true", help="a progress bar (a line every 10 s into a log)")
    p.add_argument("--results", default=str(REPO / "benchmarks/results/ae_feature_nets.json"))
    args = p.parse_args(argv)
    try:
        spec = f"fashion-mnist:path={args.data},pad=32"
        train, test = load_dataset(spec, split="train"), load_dataset(spec, split="test")
        which = [x.strip() for x in args.nets.split(",") if x.strip()]
        require(which and set(which) <= {"1", "2"}, f"--nets {args.nets!r}: expected 1, 2 or 1,2")
        results = Path(args.results)
        if args.device.startswith("cuda"):
            require(torch.cuda.is_available(), f"--device {args.device}: no CUDA device here")
        env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
               "threads": torch.get_num_threads(), "device": args.device,
               "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
        mine: dict[str, dict] = {}
        for i, (suffix, hp) in enumerate(NETS.items(), start=1):
            if str(i) not in which:
                continue
            t0 = time.perf_counter()
            net = train_feature_net(train, steps=args.steps, batch_size=args.batch_size, progress=args.progress,
                                    width=int(hp["width"]), feature_dim=int(hp["feature_dim"]), seed=int(hp["seed"]),
                                    recon_weight=hp["recon_weight"], device=args.device).cpu()
            seconds = time.perf_counter() - t0
            acc = classifier_accuracy(net, test.x, test.labels)
            out = save_feature_net(net, args.out + suffix)
            mine[str(out.relative_to(REPO)) if out.resolve().is_relative_to(REPO) else str(out)] = {
                **hp, "name": net.name, "steps": args.steps, "batch_size": args.batch_size,
                "train_images": int(train.x.shape[0]), "train_seconds": round(seconds, 1), "test_accuracy": acc,
                "env": env}
            print(f"{out}: {hp}, {args.steps} steps in {seconds:.0f} s, test accuracy {acc:.4f}", flush=True)
            # after each network, re-read: another process (--nets 1 and --nets 2 side by side) may have written
            # its entry meanwhile
            nets = json.loads(results.read_text()).get("nets", {}) if results.exists() else {}
            write_json_atomic({"nets": {**nets, **mine}}, results)  # a reader never sees half a file
    except RayflowError as e:
        print(f"rayflow: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
