"""A distilled student directory: loading it, sampling it (and the teacher, for reference) and writing samples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rayflow.checkpoint import load_model_dir, read_json
from rayflow.errors import RayflowError, require
from rayflow.methods import Method, get_method
from rayflow.models.text import TextUNetDenoiser
from rayflow.pipelines.sd.latents import decode_latents, prompt_table
from rayflow.pipelines.sd.pipeline import SDPipeline, load_sd_pipeline
from rayflow.schedules import VPSchedule

SD_JSON = "sd.json"
LORA_WEIGHTS = "lora.safetensors"


@dataclass
class SDStudent:
    """A distilled student of a pipeline teacher, ready to sample (:meth:`sample`) or export."""

    path: Path
    pipeline: SDPipeline  # the teacher's pipeline with the student's UNet in place of the teacher's
    denoiser: TextUNetDenoiser  # the student network (caption-index conditions)
    method: Method
    schedule: VPSchedule
    config: dict
    sd_info: dict

    @property
    def unet(self):
        return self.denoiser.unet

    @property
    def components(self) -> dict[str, Any]:
        return dict(self.pipeline.pipe.components)

    @property
    def pipeline_dir(self) -> Path:
        return self.pipeline.path

    @property
    def pipeline_class(self) -> str:
        return self.pipeline.pipeline_class

    @property
    def lora(self) -> dict | None:
        return self.sd_info.get("lora")

    @property
    def prediction_type(self) -> str:
        return self.denoiser.prediction_type

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.config["model"]["sample_shape"])

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], steps: int, noise: torch.Tensor | None = None, seed: int = 0,
                       guidance: float = 1.0, batch_size: int = 16) -> torch.Tensor:
        """The method's ``steps``-step sampler from ``noise`` (default: seeded standard normal) for ``prompts``."""
        require(len(prompts) >= 1, "give at least one prompt")
        require(steps >= 1, f"--steps must be >= 1, got {steps}")
        device = next(self.denoiser.parameters()).device
        res = int(self.sd_info.get("resolution") or self.latent_shape[-1] * self.pipeline.vae_scale_factor)
        table = prompt_table(self.pipeline, prompts, device, res)
        self.denoiser.set_prompt_table(table)
        student = self.method.wrap_student(self.denoiser.eval(), self.schedule)
        if noise is None:
            noise = torch.randn(len(prompts), *self.latent_shape, generator=torch.Generator().manual_seed(seed))
        require(tuple(noise.shape) == (len(prompts), *self.latent_shape),
                f"noise must have shape {(len(prompts), *self.latent_shape)}, got {tuple(noise.shape)}")
        cond = torch.arange(len(prompts))
        out = []
        for start in range(0, len(prompts), batch_size):
            sl = slice(start, start + batch_size)
            out.append(self.method.sample(student, noise[sl].to(device), self.schedule, steps,
                                          cond[sl].to(device), guidance).float().cpu())
        return torch.cat(out)

    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> np.ndarray:
        """Latents -> uint8 images ``[N, H, W, 3]`` with the teacher's VAE (``x = D(z / scaling_factor)``)."""
        return decode_latents(self.pipeline, latents, next(self.denoiser.parameters()).device, batch_size)



@torch.no_grad()
def sample_teacher_latents(sd: SDPipeline, prompts: list[str], steps: int = 25, sampler: str = "dpm++2m",
                           guidance: float = 7.5, seed: int = 0, noise: torch.Tensor | None = None,
                           device: torch.device | str = "cpu", batch_size: int = 16) -> torch.Tensor:
    """The teacher solved with one of rayflow's training-free samplers (the reference a student is compared to).

    Noise is drawn exactly as for students (``torch.randn`` of the latent shape from ``seed``), so teacher and
    student images of the same seed start from the same latents.
    """
    from rayflow.samplers import sample as solve

    require(len(prompts) >= 1, "give at least one prompt")
    require(steps >= 1, f"--steps must be >= 1, got {steps}")
    device = torch.device(device)
    res = sd.default_resolution()
    f = sd.vae_scale_factor
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(sd.pipe, name, None) is not None:
            getattr(sd.pipe, name).to(device)
    model = TextUNetDenoiser(sd.unet.to(device), sd.prediction_type, prompt_table(sd, prompts, device, res)).eval()
    shape = (len(prompts), sd.latent_channels, res // f, res // f)
    if noise is None:
        noise = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    require(tuple(noise.shape) == shape, f"noise must have shape {shape}, got {tuple(noise.shape)}")
    cond = torch.arange(len(prompts))
    out = []
    for start in range(0, len(prompts), batch_size):
        sl = slice(start, start + batch_size)
        out.append(solve(model, noise[sl].to(device), sd.schedule, sampler, steps, cond=cond[sl].to(device),
                         guidance=guidance).float().cpu())
    return torch.cat(out)


def load_sd_student(path: str | Path, device: str | torch.device = "cpu") -> SDStudent:
    """Rebuild a student written by :func:`distill_sd`: its network (LoRA injected, trained weights loaded),
    the teacher pipeline's other components from the recorded folder, its method and schedule."""
    path = Path(path)
    require((path / "config.json").is_file(), f"{path}: no config.json; not a rayflow student directory")
    config = read_json(path / "config.json")
    require(config.get("kind") == "student" and (config.get("model") or {}).get("kind") == "sd",
            f"{path}: not a student of a Stable Diffusion pipeline")
    require((path / SD_JSON).is_file(), f"{path}: no {SD_JSON}; the distillation did not finish")
    sd_info = read_json(path / SD_JSON)
    network, config = load_model_dir(path, device=device)
    require(isinstance(network, TextUNetDenoiser), f"{path}: the saved network is not a text-conditioned UNet")
    pipeline = load_sd_pipeline(sd_info["pipeline"], unet=network.unet)
    method_info = config.get("method") or {}
    method_cls = get_method(method_info.get("name", ""))
    saved = method_info.get("config", {})
    try:
        # the method kit's config_from_dict reads nested config sections; older methods take flat kwargs
        from_dict = getattr(method_cls, "config_from_dict", None)
        method = method_cls(from_dict(saved) if from_dict is not None else method_cls.config_class(**saved))
    except TypeError as exc:
        raise RayflowError(f"{path}/config.json: method config does not fit {method_cls.name}: {exc}") from exc
    schedule = VPSchedule.from_config(config["schedule"])
    for name in ("text_encoder", "text_encoder_2"):
        enc = getattr(pipeline.pipe, name, None)
        if enc is not None:
            enc.to(device)
    return SDStudent(path, pipeline, network.to(device).eval(), method, schedule, config, sd_info)


def write_samples(out_dir: str | Path, images: np.ndarray, latents: torch.Tensor, prompts: list[str],
                  nfe: int | None = None) -> Path:
    """``out_dir/0000.png ...``, ``grid.png`` and ``samples.npz`` (``x`` latents, ``images``, ``prompts``)."""
    from PIL import Image

    from rayflow.evaluation import save_sample_grid, save_samples_npz

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(out / f"{i:04d}.png")
    save_sample_grid(images[:64], out / "grid.png")
    save_samples_npz(out / "samples.npz", latents.numpy(), images=images, nfe=nfe)  # nfe: what eval labels
    (out / "prompts.txt").write_text("".join(p.replace("\n", " ") + "\n" for p in prompts), encoding="utf-8")
    return out
