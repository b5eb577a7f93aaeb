"""Validation images during a distillation (a trainer callback), as diffusers' training scripts make them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rayflow.errors import RayflowError
from rayflow.methods import Method
from rayflow.models.text import TextUNetDenoiser
from rayflow.pipelines.sd.latents import decode_latents, prompt_table
from rayflow.pipelines.sd.options import SDOptions
from rayflow.pipelines.sd.pipeline import SDPipeline
from rayflow.schedules import VPSchedule
from rayflow.training import Trainer

VALIDATION_DIR = "validation"


class ValidationImages:
    """Validation images during a distillation, as diffusers' training scripts make them (a :class:`Trainer`
    callback registered by :func:`distill_sd`).

    Every ``options.validation_steps`` optimizer steps (and at a stage's last step), on the main process, the
    current student - the EMA weights when EMA is on, as the final model - samples ``validation_prompts`` with
    the method's own sampler at each of ``validation_sample_steps`` (1, 2, 4), from the same seeded noise every
    time so that the grids of a run are comparable. The decoded images are written as
    ``RUN_DIR/validation/step-XXXXXXX.png`` (one row per step count, one column per prompt) and logged to the
    accelerator's TensorBoard tracker as ``validation/steps_K`` (NHWC, as the diffusers scripts do). Sampling
    changes nothing the training reads: the student's prompt table is swapped for the prompts' and back, and
    no random state is drawn from the trainer's generators.
    """

    def __init__(self, sd: SDPipeline, method: Method, schedule: VPSchedule, options: SDOptions,
                 latent_shape: tuple[int, ...], resolution: int) -> None:
        self.sd, self.method, self.schedule = sd, method, schedule
        self.every = int(options.validation_steps)
        self.sample_steps = tuple(int(k) for k in options.validation_sample_steps)
        self.prompts = list(options.validation_prompts)
        # encoded now, on the CPU, while the text encoders are loaded; the table is small (a few prompts)
        self.table = prompt_table(sd, self.prompts, torch.device("cpu"), resolution)
        self.noise = torch.randn(len(self.prompts), *latent_shape,
                                 generator=torch.Generator().manual_seed(int(options.validation_seed)))
        self.written: list[Path] = []

    def __call__(self, trainer: Trainer, event: str, step: int) -> None:
        if event != "step" or not (step % self.every == 0 or step == trainer.config.max_steps):
            return
        if trainer.accelerator.is_main_process:
            self.write(trainer, step)

    @torch.no_grad()
    def sample(self, model: torch.nn.Module, device: torch.device) -> dict[int, np.ndarray]:
        """Decoded uint8 images ``[P, H, W, 3]`` of ``model``'s student for each number of sampling steps."""
        network = _find_text_unet(model)
        old_table, was_training = network.table, network.training
        network.set_prompt_table(self.table)
        network.eval()
        try:
            student = self.method.wrap_student(network, self.schedule)
            cond = torch.arange(len(self.prompts), device=device)
            latents = {k: self.method.sample(student, self.noise.to(device), self.schedule, k, cond).float().cpu()
                       for k in self.sample_steps}
        finally:
            network.set_prompt_table(old_table)
            network.train(was_training)
        return {k: decode_latents(self.sd, z, device) for k, z in latents.items()}

    def write(self, trainer: Trainer, step: int) -> Path | None:
        from PIL import Image

        model = trainer.ema.module if trainer.ema is not None else trainer.raw_model
        if not any(isinstance(m, TextUNetDenoiser) for m in model.modules()):
            return None  # a network of the method's own (not the student): nothing to show
        with trainer.accelerator.autocast():
            images = self.sample(model, trainer.device)
        grid = np.concatenate([np.concatenate(list(images[k]), axis=1) for k in self.sample_steps], axis=0)
        path = trainer.out_dir / VALIDATION_DIR / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
        for tracker in trainer.accelerator.trackers:
            if getattr(tracker, "name", "") == "tensorboard":
                for k, imgs in images.items():
                    tracker.writer.add_images(f"validation/steps_{k}", imgs, step, dataformats="NHWC")
                tracker.writer.flush()
        self.written.append(path)
        return path


def _find_text_unet(model: torch.nn.Module) -> TextUNetDenoiser:
    """The :class:`TextUNetDenoiser` inside a method's wrapped student."""
    for m in model.modules():
        if isinstance(m, TextUNetDenoiser):
            return m
    raise RayflowError("the student holds no text-conditioned UNet")

