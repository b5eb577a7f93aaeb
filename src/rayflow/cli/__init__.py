"""``rayflow``: the command-line interface.

    rayflow train-teacher --data SPEC --out DIR [training options]
    rayflow distill --method NAME --teacher DIR|exact --data SPEC --out DIR [--max-steps N] [--batch-size B]
                    [--option key=value ...]
    rayflow sample  (--model DIR | --teacher exact --data SPEC) --steps N --num K --out samples.npz
    rayflow distill --teacher PIPE_DIR --data captions:path=DIR --method NAME --lora-rank R --out DIR
    rayflow sample  --model STUDENT_DIR --prompt "..." [--prompts FILE] --steps N --out DIR
    rayflow eval    --samples samples.npz (--data SPEC | --clip-model DIR [--prompts FILE]) --out DIR
    rayflow export  --model STUDENT_DIR --out PIPE_DIR [--fuse]
    rayflow demo    --out DIR
    rayflow methods

A user's mistake (a missing file, a bad option, a checkpoint of another configuration) prints one line,
``rayflow: error: ...``, and exits with status 2.

By responsibility (this module keeps :func:`main` and its one-line errors and re-exports the rest)::

    options.py    the shared flags: training options -> TrainConfig, --option key=value, --pool-size, accelerator
    train.py      train-teacher, distill (toy/image teachers and diffusers pipeline teachers)
    sample.py     sample (.npz of a teacher or student; prompt samples of an SD pipeline or student)
    evaluate.py   eval (scores merged into results.json / results.md)
    tools.py      export, demo, methods
    parser.py     build_parser: every subcommand's arguments
    __main__.py   ``python -m rayflow.cli``
"""

from __future__ import annotations

import sys

import torch

from rayflow.cli.evaluate import _read_results, cmd_eval
from rayflow.cli.options import _accelerator, _parse_options, _pool_size_options, _train_args, _train_config
from rayflow.cli.parser import _Parser, build_parser
from rayflow.cli.sample import _labels_for, _sd_student_dir, cmd_sample, cmd_sample_sd
from rayflow.cli.tools import cmd_demo, cmd_export, cmd_methods
from rayflow.cli.train import _is_sd_distill, cmd_distill, cmd_distill_sd, cmd_train_teacher
from rayflow.errors import RayflowError

__all__ = [
    "_Parser",
    "_accelerator",
    "_is_allocation_failure",
    "_is_sd_distill",
    "_labels_for",
    "_one_line_error",
    "_parse_options",
    "_pool_size_options",
    "_read_results",
    "_sd_student_dir",
    "_train_args",
    "_train_config",
    "build_parser",
    "cmd_demo",
    "cmd_distill",
    "cmd_distill_sd",
    "cmd_eval",
    "cmd_export",
    "cmd_methods",
    "cmd_sample",
    "cmd_sample_sd",
    "cmd_train_teacher",
    "main",
]


def _one_line_error(message: str) -> None:
    print("rayflow: error: " + " ".join(message.split()), file=sys.stderr)


def _is_allocation_failure(exc: RuntimeError) -> bool:
    """torch reports a failed CPU allocation as a plain RuntimeError, CUDA's as OutOfMemoryError."""
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(exc)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except RayflowError as exc:
        _one_line_error(str(exc))
        return 2
    except OSError as exc:
        # a disk that fills, a folder made read-only mid-run, a path the checks could not foresee: the
        # file and the reason, never a traceback (what was written before stays: every write is atomic)
        where = f"{exc.filename}: " if exc.filename else ""
        _one_line_error(f"{where}{exc.strerror or exc}")
        return 2
    except MemoryError:
        _one_line_error("out of memory; use a smaller --batch-size, --num or data set")
        return 2
    except RuntimeError as exc:
        if not _is_allocation_failure(exc):
            raise  # a bug, not a user mistake: keep the traceback
        _one_line_error(f"out of memory ({str(exc).splitlines()[0][:160]}); use a smaller --batch-size, --num "
                        "or data set")
        return 2
    except KeyboardInterrupt:
        print("rayflow: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
