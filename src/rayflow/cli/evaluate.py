"""``rayflow eval``: score a samples file and merge its row into ``results.json`` / ``results.md``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rayflow.errors import RayflowError, require
from rayflow.validate import check_output_dir


def cmd_eval(args: argparse.Namespace) -> int:
    from rayflow.comparison import evaluate_npz
    from rayflow.data import load_dataset
    from rayflow.evaluation import format_table, load_samples_npz, write_results

    require(args.data is not None or args.clip_model is not None,
            "give --data (reference data), --clip-model, or both")
    if args.metric == "inception-fid":  # a missing optional extra is refused before any work
        from rayflow.metrics import inception_weights_path

        inception_weights_path()
    out = check_output_dir(args.out)
    if args.feature_net is not None:
        feature_net = Path(args.feature_net)
        require(not feature_net.exists() or feature_net.is_dir(), f"--feature-net {feature_net}: not a directory")
    previous = _read_results(out)  # before any scoring: a broken results.json is refused up front
    samples = load_samples_npz(args.samples)
    nfe = args.nfe if args.nfe is not None else samples.get("nfe")
    require(nfe is not None, f"{args.samples} does not record its NFE (written by an older rayflow); pass --nfe N")
    metrics: dict = {}
    if args.clip_model is not None:  # prompt-conditioned samples: CLIP score against their prompts
        from rayflow.clip_score import clip_score, read_prompts

        prompts_file = Path(args.prompts) if args.prompts else Path(args.samples).parent / "prompts.txt"
        require(samples["images"] is not None, f"{args.samples}: no 'images' array for the CLIP score")
        metrics["clip_score"] = clip_score(samples["images"], read_prompts(prompts_file), args.clip_model)
    if args.data is not None:
        teacher = load_samples_npz(args.teacher_samples) if args.teacher_samples else None
        dataset = load_dataset(args.data, split=args.split)
        metrics.update(evaluate_npz(samples, dataset, teacher_samples=teacher, feature_net_dir=args.feature_net,
                                    reference_num=args.reference_num, seed=args.seed,
                                    inception_fid=args.metric == "inception-fid"))
    row = {"method": args.method or Path(args.samples).stem, "nfe": int(nfe), **metrics}
    rows = [r for r in previous if (r.get("method"), r.get("nfe")) != (row["method"], row["nfe"])]
    rows.append(row)
    write_results(rows, out)
    print(format_table([row]))
    return 0


def _read_results(out: Path) -> list[dict]:
    """The rows of an existing ``out/results.json`` (``[]`` when absent), or a one-line error if it is not a
    list of objects with ``method`` and ``nfe``."""
    path = out / "results.json"
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RayflowError(f"{path}: not a readable results file ({exc}); move it away or use another --out") from exc
    require(isinstance(rows, list) and all(isinstance(r, dict) and "method" in r and "nfe" in r for r in rows),
            f"{path}: expected a JSON list of rows with \"method\" and \"nfe\"; move it away or use another --out")
    return rows
