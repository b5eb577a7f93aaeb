"""The teacher: a local Stable Diffusion / SDXL diffusers pipeline folder and what rayflow reads from it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayflow.caches import model_fingerprint
from rayflow.errors import RayflowError, require
from rayflow.schedules import VPSchedule

#: pipeline classes rayflow distils, and whether they are SDXL-type (two text encoders, added conditions)
SUPPORTED_PIPELINES = {"StableDiffusionPipeline": False, "StableDiffusionXLPipeline": True}


@dataclass
class SDPipeline:
    """A loaded diffusers pipeline folder: the pipeline object plus what rayflow reads from it."""

    path: Path
    pipeline_class: str
    xl: bool
    pipe: Any  # the diffusers pipeline (components on CPU unless moved)
    schedule: VPSchedule
    prediction_type: str
    force_zeros_for_empty_prompt: bool

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    def default_resolution(self) -> int:
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_scale_factor

    def fingerprint(self) -> str:
        """Identity of what preprocessing uses: the VAE and text encoder weights."""
        parts = [model_fingerprint(self.vae), model_fingerprint(self.pipe.text_encoder)]
        if self.xl:
            parts.append(model_fingerprint(self.pipe.text_encoder_2))
        return "-".join(parts)


def is_pipeline_dir(path: str | Path) -> bool:
    """Whether ``path`` looks like a diffusers pipeline folder (has ``model_index.json``)."""
    return (Path(path) / "model_index.json").is_file()


def check_pipeline_dir(path: str | Path) -> tuple[str, dict]:
    """Validate a pipeline folder without loading weights; returns ``(class name, model_index)``."""
    path = Path(path)
    require(path.is_dir(), f"{path}: no such pipeline folder")
    index_path = path / "model_index.json"
    require(index_path.is_file(), f"{path}: no model_index.json; not a diffusers pipeline folder")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RayflowError(f"{index_path}: unreadable ({exc})") from exc
    require(isinstance(index, dict), f"{index_path}: not a JSON object")
    cls = index.get("_class_name")
    require(cls in SUPPORTED_PIPELINES,
            f"{path}: pipeline class {cls!r} is not supported; rayflow distils {', '.join(SUPPORTED_PIPELINES)}")
    needed = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if SUPPORTED_PIPELINES[cls]:
        needed += ["text_encoder_2", "tokenizer_2"]
    for comp in needed:
        entry = index.get(comp)
        require(isinstance(entry, list) and len(entry) == 2 and entry[1] is not None,
                f"{path}: model_index.json has no {comp!r} component")
        require((path / comp).is_dir(), f"{path}: component folder {comp}/ is missing")
    return cls, index


def load_sd_pipeline(path: str | Path, unet: Any = None) -> SDPipeline:
    """Load a local SD / SDXL pipeline folder (``local_files_only``; ``unet`` replaces the folder's UNet)."""
    import diffusers

    path = Path(path)
    cls_name, index = check_pipeline_dir(path)
    pipe_cls = getattr(diffusers, cls_name)
    kwargs: dict[str, Any] = {}
    if unet is not None:
        kwargs["unet"] = unet
    if cls_name == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        pipe = pipe_cls.from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise RayflowError(f"{path}: cannot load the pipeline ({str(exc).splitlines()[0]})") from exc
    pipe.set_progress_bar_config(disable=True)
    sched_cfg = dict(pipe.scheduler.config)
    prediction_type = sched_cfg.get("prediction_type", "epsilon")
    require(prediction_type in ("epsilon", "v_prediction", "sample"),
            f"{path}: scheduler prediction_type {prediction_type!r} is not supported")
    schedule = VPSchedule.from_diffusers_config(sched_cfg)
    force_zeros = bool(dict(pipe.config).get("force_zeros_for_empty_prompt", False))
    return SDPipeline(path.resolve(), cls_name, SUPPORTED_PIPELINES[cls_name], pipe, schedule, prediction_type,
                      force_zeros)

