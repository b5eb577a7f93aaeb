"""The argument parser of every subcommand; usage errors are one-line :class:`RayflowError`."""

from __future__ import annotations

import argparse

from rayflow.cli.evaluate import cmd_eval
from rayflow.cli.options import _train_args
from rayflow.cli.sample import cmd_sample
from rayflow.cli.tools import cmd_demo, cmd_export, cmd_methods
from rayflow.cli.train import cmd_distill, cmd_train_teacher
from rayflow.errors import RayflowError
from rayflow.validate import MAX_SEED, float_in, int_in, int_list


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are :class:`RayflowError` (one line, exit code 2), not argparse's
    usage block plus a message; subcommand parsers inherit the class."""

    def error(self, message: str):  # type: ignore[override]
        raise RayflowError(message)


def build_parser() -> argparse.ArgumentParser:
    from rayflow.methods import available_methods  # the registry names the methods in the help

    p = _Parser(prog="rayflow", description="Few-step generators distilled from diffusion models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-teacher", help="train an epsilon-prediction teacher on a data set")
    t.add_argument("--data", required=True, help="data spec, e.g. digits, mnist:path=DIR,pad=32, mog:dim=8")
    t.add_argument("--out", required=True, help="output directory (resumes if it holds a checkpoint)")
    t.add_argument("--model", choices=["mlp", "unet"], default=None, help="network (default: by data shape)")
    t.add_argument("--hidden", type=int_in(1, 1 << 16), default=None, help="MLP width")
    t.add_argument("--channels", type=int_list, default=None, help="UNet channels per level, e.g. 32,64,64")
    t.add_argument("--schedule", default="linear", choices=["linear", "scaled_linear", "cosine"])
    t.add_argument("--unconditional", action="store_true", help="ignore labels")
    t.add_argument("--label-dropout", type=float_in(0, 1, hi_open=True), default=0.1,
                   help="label dropout for CFG (default 0.1)")
    _train_args(t, max_steps=4000, batch_size=256, lr=1e-3, ema=0.999)
    t.set_defaults(func=cmd_train_teacher)

    d = sub.add_parser("distill", help="distil a teacher into a few-step student")
    d.add_argument("--method", required=True, help="one of: " + ", ".join(available_methods()))
    d.add_argument("--teacher", required=True, help="teacher directory, or 'exact' for mog data")
    d.add_argument("--data", required=True, help="data spec (the teacher's data)")
    d.add_argument("--out", required=True, help="output directory (resumes if it holds a checkpoint)")
    d.add_argument("--guidance", type=float_in(1, also=(0.0,)), default=1.0,
                   help="teacher CFG scale for targets and pairs (1 = none)")
    d.add_argument("--cache", default=None, help="directory for resumable pair/target caches")
    d.add_argument("--schedule", default="linear", choices=["linear", "scaled_linear", "cosine"],
                   help="noise schedule of the exact teacher")
    d.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option (repeat)")
    d.add_argument("--pool-size", type=int, default=None, metavar="N",
                   help="pairs (or RayFlow instances) in the method's training pool; sets option pool_size")
    d.add_argument("--gen-batch", type=int_in(1), default=None, metavar="N",
                   help="rows per teacher call when building pools (default on CUDA with the compiled teacher: "
                        "2048, padded to a few static shapes so its CUDA graphs replay; elsewhere each pool's own)")
    sdg = d.add_argument_group("diffusers pipeline teachers (--teacher PIPE_DIR --data captions:path=DIR)")
    sdg.add_argument("--lora-rank", type=int, default=None, help="LoRA rank of the student (default 64)")
    sdg.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    sdg.add_argument("--lora-targets", default=None,
                     help="comma-separated module names for LoRA (default: attention, feed-forward, resnet convs)")
    sdg.add_argument("--full-finetune", action="store_true", help="train the whole UNet instead of a LoRA")
    sdg.add_argument("--resolution", type=int, default=None, help="image size (default: the UNet's)")
    sdg.add_argument("--random-crop", action="store_true", help="random instead of centre crops")
    sdg.add_argument("--random-flip", action="store_true", help="random horizontal flips")
    sdg.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for UNet memory")
    sdg.add_argument("--teacher-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                     help="frozen teacher UNet precision (auto: bf16 on CUDA)")
    sdg.add_argument("--validation-prompts", nargs="+", default=None, metavar="PROMPT",
                     help="prompts the student samples at 1, 2 and 4 steps every --validation-steps (PNG grids in "
                          "OUT/validation/, TensorBoard)")
    sdg.add_argument("--validation-steps", type=int_in(0), default=0, metavar="N",
                     help="optimizer steps between validation images (default 500 with --validation-prompts)")
    _train_args(d, max_steps=2000, batch_size=256, lr=5e-4, ema=0.999)
    d.set_defaults(func=cmd_distill)

    s = sub.add_parser("sample", help="generate samples from a teacher or a student")
    s.add_argument("--model", default=None, help="teacher or student directory")
    s.add_argument("--teacher", default=None, help="'exact' (with --data mog:...) to sample the exact teacher")
    s.add_argument("--data", default=None, help="data spec for --teacher exact")
    s.add_argument("--schedule", default="linear", choices=["linear", "scaled_linear", "cosine"])
    s.add_argument("--steps", type=int_in(1, 100_000), default=None, help="sampling steps (default: the model's)")
    s.add_argument("--num", type=int_in(1), default=64, help="number of samples")
    s.add_argument("--out", required=True,
                   help="output .npz (x float32; images uint8 NHWC; labels); a directory for --prompt/--prompts")
    s.add_argument("--prompt", action="append", default=None, help="prompt for a pipeline student (repeatable)")
    s.add_argument("--prompts", default=None, help="file of prompts, one per line (or JSON lines with text)")
    s.add_argument("--sampler", default=None, help="teachers only: ddim, dpm++2m, euler, heun")
    s.add_argument("--guidance", type=float_in(0), default=1.0, help="classifier-free guidance scale (1 = none)")
    s.add_argument("--labels", default="cycle", help="cycle | random | a class index")
    s.add_argument("--seed", type=int_in(0, MAX_SEED), default=0)
    s.add_argument("--batch-size", type=int_in(1), default=1000)
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    s.add_argument("--grid", default=None, help="also write a PNG grid of the first 64 images")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("eval", help="compare samples with reference data")
    e.add_argument("--samples", required=True, help=".npz written by rayflow sample")
    e.add_argument("--data", default=None, help="data spec of the reference")
    e.add_argument("--clip-model", default=None, help="local CLIP folder (CLIPModel + CLIPProcessor): adds the CLIP "
                   "score of prompt-conditioned samples; nothing is downloaded")
    e.add_argument("--prompts", default=None, help="prompts of the samples, one per line (default: prompts.txt "
                   "beside --samples)")
    e.add_argument("--split", default="test", choices=["train", "test"])
    e.add_argument("--teacher-samples", default=None, help=".npz of the teacher from the same noise (fidelity)")
    e.add_argument("--feature-net", default=None,
                   help="directory of the feature network (trained there, with the autoencoder term, if empty)")
    e.add_argument("--reference-num", type=int_in(1, 10_000_000), default=10000,
                   help="fresh true samples for mog data")
    e.add_argument("--method", default=None, help="row label (default: the samples file name)")
    e.add_argument("--nfe", type=int_in(0), default=None, help="row NFE label (default: recorded by rayflow sample)")
    e.add_argument("--seed", type=int_in(0, MAX_SEED), default=0)
    e.add_argument("--metric", default="fd", choices=["fd", "inception-fid"],
                   help="fd: rayflow's feature-net metrics (fd and kid on the network's early view, fd_multilayer, "
                        "fd_classifier); inception-fid: also FID/KID "
                        "on InceptionV3 features (pip install 'rayflow[fid]'; images upsampled to 299 px, "
                        "comparable only with each other, not with published CIFAR/COCO FIDs)")
    e.add_argument("--out", required=True, help="directory for results.json / results.md (rows are merged)")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="write a Stable Diffusion student as a diffusers pipeline folder")
    x.add_argument("--model", required=True, help="student directory (rayflow distill --teacher PIPE_DIR ...)")
    x.add_argument("--out", required=True, help="pipeline folder to write (new, empty, or a previous export)")
    x.add_argument("--fuse", action="store_true", help="merge the LoRA into unet/ instead of a LoRA file")
    x.set_defaults(func=cmd_export)

    m = sub.add_parser("demo", help="the whole pipeline on the embedded data in a few minutes on a CPU")
    m.add_argument("--out", default="runs/demo")
    m.add_argument("--data", default="digits")
    m.add_argument("--methods", default=None, help="comma-separated subset of methods (default: all)")
    m.add_argument("--quick", action="store_true", help="a much smaller budget (for tests)")
    m.add_argument("--seed", type=int_in(0, MAX_SEED), default=0)
    m.set_defaults(func=cmd_demo)

    ls = sub.add_parser("methods", help="list the distillation methods")
    ls.set_defaults(func=cmd_methods)
    return p
