#!/usr/bin/env python
"""One RayFlow-LoRA distillation step of the real SD1.5 UNet, through rayflow's Trainer and as a bare loop.

    python benchmarks/sd_lora_step.py                          # one GPU: the four rows below, <= ~4 minutes
    python benchmarks/sd_lora_step.py --rows bare-eager,rayflow-eager --steps 30
    python benchmarks/sd_lora_step.py --tiny --allow-cpu --out /tmp/x.json     # a dry run on a CPU (tests)

The UNet is SD1.5's ``UNet2DConditionModel`` configuration written inline (random weights: nothing is
downloaded; 860M parameters, cross-attention width 768, 64x64x4 latents), frozen in bf16, with a rank-64 peft
LoRA on LCM-LoRA's / RayFlow's target modules (attention projections, feed-forwards, resnet convolutions, time
projections: ~67M trainable parameters, kept in fp32 as diffusers' LoRA scripts do), batch 32, bf16 autocast.

Rows (each in a fresh copy of the UNet and LoRA; one that fails is recorded with its error and the script goes
on):

* ``bare-eager`` / ``bare-compile``: a plain PyTorch loop, ``x_t = a_t x0 + (1 - a_t) eps_mu`` on RayFlow's ray,
  ``loss = ||unet(x_t, t, text) - (x0 - eps_mu)||^2``, backward, grad-norm clip, AdamW, with the UNet eager or
  ``torch.compile``-d. Batches come from pools already on the GPU, as a latent cache would supply them.
* ``rayflow-eager`` / ``rayflow-compile``: the same UNet and LoRA wrapped as rayflow's ``TextUNetDenoiser``
  (caption-index conditions into a CPU prompt table, the SD path's network), trained by
  :class:`rayflow.training.Trainer` (accelerate, bf16, EMA 0.999 of the LoRA, grad clipping, per-step loss
  reduction, logging) on :class:`rayflow.methods.rayflow.RayFlowObjective` with its default learned Time
  Sampler and the ray change of variables (VP-matched input), from the same kind of pools.

Rate: samples/s over ``--steps`` steps after ``--warmup`` steps (which include compilation), timed between
``cuda.synchronize()`` points at the start of consecutive steps; rayflow's rate over the bare loop's is
reported for eager and compiled. Peak memory is ``torch.cuda.max_memory_allocated`` of the row. Results go to
``benchmarks/results/sd_lora_step.json`` with the command, hardware and package versions.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from rayflow.errors import RayflowError, require  # noqa: E402

ROWS = ("bare-eager", "rayflow-eager", "bare-compile", "rayflow-compile")

#: SD1.5's UNet (``unet/config.json`` of stable-diffusion-v1-5), written out so nothing is downloaded
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
    norm_num_groups=8, cross_attention_dim=32, attention_head_dim=(2, 4),
)
#: LCM-LoRA's / RayFlow's LoRA targets for SD UNets (RayFlow reports 67.5M trainable parameters at rank 64)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
TEXT_LEN = 77  # CLIP's context length (8 with --tiny)


# ---------------------------------------------------------------------- shared pieces
def build_base(tiny: bool, device: torch.device, dtype: torch.dtype, seed: int):
    """The frozen UNet (random init on ``device``, then cast): built once, copied for every row."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
    return unet.to(dtype).requires_grad_(False)


def with_lora(base: torch.nn.Module, rank: int, seed: int) -> torch.nn.Module:
    """A copy of ``base`` with a fresh rank-``rank`` LoRA (fp32 trainable weights, as diffusers' scripts)."""
    import copy

    from peft import LoraConfig

    unet = copy.deepcopy(base)
    names = [n for n, _ in unet.named_modules()]
    targets = [m for m in LORA_TARGETS if any(n == m or n.endswith("." + m) for n in names)]
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return unet


class Pools:
    """Latents ``x0``, their ray noise ``eps_mu`` and caption indices, on the device: what the cache supplies."""

    def __init__(self, n: int, shape: tuple[int, ...], num_captions: int, device: torch.device, seed: int):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.x0 = torch.randn(n, *shape, generator=g).to(device)
        self.eps_mu = torch.randn(n, *shape, generator=g).to(device)
        self.caption = (torch.arange(n) % num_captions).to(device)

    def draw(self, b: int, generator: torch.Generator):
        idx = torch.randint(0, self.x0.shape[0], (b,), generator=generator, device=generator.device)
        return self.x0[idx], self.caption[idx], self.eps_mu[idx]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Timestamps at the start of every step (after a device sync); the rate over the steps after warm-up."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def tick(self) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())

    def rate(self, warmup: int, batch: int) -> tuple[float, float]:
        """``(samples/s, ms/step)`` over the ticks ``warmup .. end`` (the last tick closes the last step)."""
        t = self.times[warmup:]
        require(len(t) >= 2, "too few timed steps")
        per_step = (t[-1] - t[0]) / (len(t) - 1)
        return batch / per_step, 1000 * per_step


# ---------------------------------------------------------------------- the two loops
def run_bare(unet, pools, embeds, schedule, args, device, compiled: bool) -> dict[str, Any]:
    """The reference loop: ray point, velocity target, MSE, backward, clip, AdamW; no rayflow code."""
    import torch.nn.functional as F

    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    net = torch.compile(unet) if compiled else unet
    a_table = schedule.a(torch.arange(schedule.num_train_timesteps)).float().to(device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    clock = StepClock(device)
    amp = args.dtype == torch.bfloat16
    for _ in range(args.warmup + args.steps):
        clock.tick()
        x0, cap, eps_mu = pools.draw(args.batch_size, g)
        t = torch.randint(0, schedule.num_train_timesteps, (args.batch_size,), generator=g, device=device)
        a = a_table[t].view(-1, 1, 1, 1)
        x_t = a * x0 + (1 - a) * eps_mu
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred = net(x_t, t, encoder_hidden_states=embeds[cap]).sample
        loss = F.mse_loss(pred.float(), (x0 - eps_mu).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    clock.tick()
    rate, ms = clock.rate(args.warmup, args.batch_size)
    return {"samples_per_s": rate, "ms_per_step": ms, "last_loss": float(loss.detach())}


def run_rayflow(unet, pools, embeds, schedule, args, device, compiled: bool, out_dir: Path) -> dict[str, Any]:
    """The same UNet and LoRA as a rayflow Denoiser, trained by the Trainer on RayFlow's objective."""
    from types import SimpleNamespace

    from rayflow.methods.rayflow import RayFlow, RayFlowConfig, RayFlowObjective
    from rayflow.models.text import PromptTable, TextUNetDenoiser
    from rayflow.training import TrainConfig, Trainer

    clock = StepClock(device)

    class Source:
        """RayFlow's instance source, reading the pools (the ``cache`` path of the method, already on device)."""

        ctx = SimpleNamespace(device=device)

        def draw(self, n: int, step: int, generator: torch.Generator):
            clock.tick()
            return pools.draw(n, generator)

        def draw_instances(self, n: int, step: int, generator: torch.Generator):
            # RayFlowObjective's entry point: (x0, cond, eps_mu, trajectory); no trajectory without consistency
            return (*self.draw(n, step, generator), None)

    cfg = RayFlowConfig()
    sampler = RayFlow(cfg).build_time_sampler(schedule.num_train_timesteps)  # the default (global) sampler
    objective = RayFlowObjective(Source(), schedule, cfg, sampler, args.batch_size,
                                 num_classes=embeds.shape[0] - 1, snapshot_every=10**9)
    train = TrainConfig(max_steps=args.warmup + args.steps, batch_size=args.batch_size, lr=1e-4, ema_decay=0.999,
                        grad_clip=1.0, checkpoint_every=0, log_every=10, progress=False,
                        mixed_precision="bf16" if args.dtype == torch.bfloat16 else "no",
                        compile="yes" if compiled else "no")
    # rayflow's text-conditioned network: caption indices into a prompt table kept on the CPU (rows moved per
    # batch), the teacher's weights read as a flow head (RayFlow's default velocity student)
    model = TextUNetDenoiser(unet, "flow", PromptTable(embeds.float().cpu()))
    trainer = Trainer(model, objective, train, out_dir, {"benchmark": "sd_lora_step"})
    # the trainer ends with its final checkpoint and weights; the clock's last tick is the start of that
    # write, taken by the patched _save_checkpoint below so the file writing is not counted in the rate
    save = trainer._save_checkpoint

    def timed_save(step: int) -> None:
        clock.tick()
        save(step)

    trainer._save_checkpoint = timed_save
    trainer.train()
    rate, ms = clock.rate(args.warmup, args.batch_size)
    return {"samples_per_s": rate, "ms_per_step": ms}


# ---------------------------------------------------------------------- driver
def versions() -> dict[str, str]:
    import importlib

    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "peft", "accelerate", "transformers"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - a missing package is recorded, not fatal
            out[name] = "absent"
    out["cuda"] = torch.version.cuda or "none"
    return out


def hardware(device: torch.device) -> dict[str, Any]:
    hw: dict[str, Any] = {"device": str(device), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hw.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return hw


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 (2 with --tiny)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default 64; 4 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 20; 2 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, compilation included (default 5)")
    p.add_argument("--pool", type=int, default=256, help="rows in the latent pools")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a tiny UNet and batch: a dry run of the script")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (with --tiny: fp32)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sd_lora_step.json"))
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or (2 if args.tiny else 32)
    args.rank = args.rank or (4 if args.tiny else 64)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        bad = [r for r in rows if r not in ROWS]
        require(rows and not bad, f"--rows: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(ROWS)}")
        require(args.batch_size >= 1 and args.rank >= 1 and args.steps >= 1 and args.warmup >= 0,
                "--batch-size, --rank and --steps must be >= 1, --warmup >= 0")
        cuda = torch.cuda.is_available()
        require(cuda or args.allow_cpu,
                "no CUDA device; this benchmark needs a GPU (--tiny --allow-cpu for a dry run)")
        return run(args, rows, torch.device("cuda" if cuda else "cpu"))
    except RayflowError as exc:
        print(f"rayflow: error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, rows: list[str], device: torch.device) -> int:
    from rayflow.schedules import VPSchedule

    args.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t_start = time.time()
    base = build_base(args.tiny, device, args.dtype, args.seed)
    cfg = TINY_UNET if args.tiny else SD15_UNET
    shape = (cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
    num_captions = 64
    g = torch.Generator().manual_seed(args.seed + 1)
    text_len = 8 if args.tiny else TEXT_LEN
    embeds = torch.randn(num_captions + 1, text_len, cfg["cross_attention_dim"], generator=g).to(device, args.dtype)
    pools = Pools(args.pool, shape, num_captions, device, args.seed + 2)
    schedule = VPSchedule.from_name("scaled_linear")
    results: list[dict[str, Any]] = []
    params = {"total": sum(p.numel() for p in base.parameters())}
    for row in rows:
        loop, mode = row.split("-")
        rec: dict[str, Any] = {"row": row, "loop": loop, "compile": mode == "compile"}
        tmp = Path(tempfile.mkdtemp(prefix="sd_lora_step-"))
        unet = None
        try:
            unet = with_lora(base, args.rank, args.seed + 3)
            params["trainable"] = sum(p.numel() for p in unet.parameters() if p.requires_grad)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.time()
            if loop == "bare":
                rec.update(run_bare(unet, pools, embeds, schedule, args, device, mode == "compile"))
            else:
                rec.update(run_rayflow(unet, pools, embeds, schedule, args, device, mode == "compile", tmp / "run"))
            rec["wall_s"] = round(time.time() - t0, 1)
            if device.type == "cuda":
                rec["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            print(f"{row:16s} {rec['samples_per_s']:8.1f} samples/s  {rec['ms_per_step']:8.1f} ms/step  "
                  f"peak {rec.get('peak_memory_gib', '-')} GiB  ({rec['wall_s']} s)", flush=True)
        except Exception as exc:  # noqa: BLE001 - one failed row is recorded; the others still run
            rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["traceback"] = traceback.format_exc(limit=6)
            print(f"{row:16s} FAILED: {rec['error']}", file=sys.stderr, flush=True)
        finally:
            del unet
            shutil.rmtree(tmp, ignore_errors=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(rec)

    by_row = {r["row"]: r for r in results if "samples_per_s" in r}
    ratios = {}
    for mode in ("eager", "compile"):
        rf, bare = by_row.get(f"rayflow-{mode}"), by_row.get(f"bare-{mode}")
        if rf and bare:
            ratios[mode] = round(rf["samples_per_s"] / bare["samples_per_s"], 3)
            print(f"rayflow / bare ({mode}): {ratios[mode]:.3f}")
    report = {
        "benchmark": "sd_lora_step",
        "command": "python " + " ".join([os.path.relpath(__file__, REPO), *(sys.argv[1:] if argv_is_cli() else [])]),
        "config": {"unet": "tiny" if args.tiny else "SD1.5 (random init)", "batch_size": args.batch_size,
                   "lora_rank": args.rank, "lora_targets": list(LORA_TARGETS), "dtype": str(args.dtype),
                   "steps": args.steps, "warmup": args.warmup, "latent_shape": list(shape)},
        "parameters": params,
        "rows": results,
        "rayflow_over_bare": ratios,
        "hardware": hardware(device),
        "versions": versions(),
        "total_wall_s": round(time.time() - t_start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"trainable {params.get('trainable', 0) / 1e6:.1f}M of {params['total'] / 1e6:.0f}M parameters; "
          f"written {out} ({report['total_wall_s']} s)")
    return 0 if all("error" not in r for r in results) else 1


def argv_is_cli() -> bool:
    return Path(sys.argv[0]).name == Path(__file__).name


if __name__ == "__main__":
    sys.exit(main())
