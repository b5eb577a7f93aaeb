"""The small commands: ``rayflow export``, ``rayflow demo`` and ``rayflow methods``."""

from __future__ import annotations

import argparse
import time

from rayflow.validate import check_output_dir


def cmd_export(args: argparse.Namespace) -> int:
    from rayflow.pipelines.export import export_student

    t0 = time.time()
    res = export_student(args.model, args.out, fuse=args.fuse)
    what = "fused UNet" if res.fused else ("LoRA file" if res.lora else "UNet")
    print(f"{res.pipeline_class} written to {res.out_dir} ({what}, scheduler {'.'.join(res.scheduler)}; "
          f"{time.time() - t0:.0f} s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rayflow.demo import run_demo

    check_output_dir(args.out)
    run_demo(args.out, data=args.data, quick=args.quick, methods=args.methods.split(",") if args.methods else None,
             seed=args.seed)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from rayflow.methods import available_methods, get_method

    for name in available_methods():
        doc = (get_method(name).__doc__ or "").strip().splitlines()
        print(f"{name:22s} {doc[0] if doc else ''}")
    return 0
