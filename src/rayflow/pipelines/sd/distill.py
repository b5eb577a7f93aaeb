"""Distillation of a pipeline teacher: preprocessing, the LoRA student, the frozen teacher and the method's run."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from rayflow import __version__
from rayflow.caches import meta_fingerprint
from rayflow.captions import load_captions
from rayflow.checkpoint import save_safetensors_atomic, write_json_atomic
from rayflow.data import Dataset
from rayflow.errors import require
from rayflow.methods import CountingDenoiser, DistillContext, DistillResult, Method
from rayflow.models import ModelConfig, as_epsilon
from rayflow.models.text import (
    PromptTable,
    TextUNetDenoiser,
    add_lora,
    lora_state_dict,
    register_prompt_table,
    unet_fingerprint,
)
from rayflow.pipelines.sd.latents import _latent_meta, _null_row, _time_ids, preprocess_captions
from rayflow.pipelines.sd.options import SDOptions
from rayflow.pipelines.sd.pipeline import check_pipeline_dir, load_sd_pipeline
from rayflow.pipelines.sd.student import LORA_WEIGHTS, SD_JSON
from rayflow.pipelines.sd.validation import ValidationImages, _find_text_unet
from rayflow.training import Trainer

#: methods whose training data are only the teacher's own samples (global pairs): prompts-only data suffice
#: (also rectified-diffusion unless phased)
PROMPT_ONLY_METHODS = ("reflow",)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _teacher_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def distill_sd(method: Method, teacher: str | Path, data: str, out_dir: str | Path, train: Any,
               options: SDOptions | None = None, guidance: float = 1.0, cache_dir: str | Path | None = None,
               progress: bool = True, accelerator: Any = None) -> DistillResult:
    """Distil the pipeline at ``teacher`` with ``method`` on caption data ``data`` into ``out_dir`` (module doc).

    Everything the user can get wrong (folder, pipeline class, data, options) is checked before anything is
    written; an interrupted run resumes (preprocessing cache, pair caches, trainer checkpoints).
    """
    options = options or SDOptions()
    require(guidance >= 1.0, f"--guidance must be >= 1 (1 = no guidance), got {guidance}")
    check_pipeline_dir(teacher)
    captions = load_captions(data)
    if not captions.has_images:
        prompt_only = method.name in PROMPT_ONLY_METHODS or (
            method.name == "rectified-diffusion" and not getattr(method.config, "phased", True))
        require(prompt_only, f"{method.name} trains on real images; prompts-only data serve reflow and "
                             "rectified-diffusion (not phased); use captions:path=DIR")
    sd = load_sd_pipeline(teacher)
    device = accelerator.device if accelerator is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    resolution = options.resolution or sd.default_resolution()
    require(resolution % sd.vae_scale_factor == 0,
            f"--resolution must be a multiple of the VAE's factor {sd.vae_scale_factor}, got {resolution}")
    tensors = preprocess_captions(sd, captions, resolution, center_crop=options.center_crop,
                                  random_flip=options.random_flip, cache_dir=cache_dir, seed=train.seed,
                                  batch_size=options.preprocess_batch, device=device, progress=progress,
                                  accelerator=accelerator, mapped=cache_dir is not None)
    # the encoders are done: free them before the UNets move to the device
    sd.vae.to("cpu")
    sd.pipe.text_encoder.to("cpu")
    if sd.xl:
        sd.pipe.text_encoder_2.to("cpu")
    null = _null_row(sd, torch.device("cpu"))
    n = len(captions)
    if sd.xl:
        null["time_ids"] = torch.tensor([_time_ids((resolution, resolution), (0, 0), (resolution, resolution))])
    # the caption rows stay where the cache put them (file-backed with a --cache): the null row is stacked on
    # rather than joined, and the table's key is the cache's identity rather than a hash of every row
    identity = meta_fingerprint(_latent_meta(sd, captions, resolution, options.center_crop, options.random_flip,
                                             train.seed))
    table = PromptTable.with_null({k: v for k, v in tensors.items() if k != "latents"}, null, identity)
    key = register_prompt_table(table)
    latent_shape = (sd.latent_channels, resolution // sd.vae_scale_factor, resolution // sd.vae_scale_factor)
    # prompts-only data have no x0: a zero view the size of one latent stands for all of them
    x = tensors["latents"] if captions.has_images else torch.zeros(1, *latent_shape).expand(n, *latent_shape)
    dataset = Dataset(x=x, labels=torch.arange(n), num_classes=n, kind="latent", spec=captions.spec)

    # the student: a copy of the fp32 teacher UNet with a LoRA (seeded, so a rerun builds the same adapter)
    unet = sd.unet
    student_unet = copy.deepcopy(unet)
    lora_info = None
    if options.lora is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(train.seed)
            lora_info = add_lora(student_unet, options.lora.rank, options.lora.alpha, options.lora.target_modules)
    if options.gradient_checkpointing:
        student_unet.enable_gradient_checkpointing()
    sd_cfg = {"pipeline": str(sd.path), "pipeline_class": sd.pipeline_class, "xl": sd.xl, "table": key,
              "lora": lora_info, "gradient_checkpointing": options.gradient_checkpointing,
              "resolution": resolution}
    if lora_info is not None:
        # a LoRA student saves only its adapter: the base is the teacher's UNet, read back from the pipeline
        # folder and checked against this fingerprint (models.text.load_base_unet)
        sd_cfg["base"] = {"pipeline": str(sd.path), "fingerprint": unet_fingerprint(unet)}
    student_cfg = ModelConfig(kind="sd", sample_shape=latent_shape, num_classes=n,
                              prediction_type="epsilon" if sd.prediction_type == "epsilon" else sd.prediction_type,
                              unet_class="UNet2DConditionModel", unet_config=json.loads(json.dumps(dict(unet.config))),
                              sd=sd_cfg)
    prototype = TextUNetDenoiser(student_unet, sd.prediction_type, table)
    init = prototype.state_dict()

    # the frozen teacher, in bf16 on CUDA unless told otherwise
    unet.requires_grad_(False)
    teacher_net = TextUNetDenoiser(unet.to(device=device, dtype=_teacher_dtype(options.teacher_dtype, device)),
                                   sd.prediction_type, table).eval()
    counting = CountingDenoiser(as_epsilon(teacher_net, sd.schedule).to(device).eval())
    out_dir = Path(out_dir)
    base = {"schedule": sd.schedule.config, "data": captions.spec, "teacher": str(sd.path), "guidance": guidance,
            "rayflow_version": __version__,
            "sd": {k: v for k, v in sd_cfg.items() if k != "table"} | {
                "center_crop": options.center_crop, "random_flip": options.random_flip,
                "teacher_prediction_type": sd.prediction_type}}
    ctx = DistillContext(teacher=counting, schedule=sd.schedule, dataset=dataset, train=train, out_dir=out_dir,
                         student_config=student_cfg, student_init=init, guidance=guidance,
                         cache_dir=Path(cache_dir) if cache_dir is not None else None, device=device,
                         accelerator=accelerator, progress=progress, base_config=base)
    method = method.resolved(ctx)  # "auto" values decided for this run (the caller's method is left as it was)
    validation = None
    if options.validation_steps and options.validation_prompts:
        validation = ValidationImages(sd, method, sd.schedule, options, latent_shape, resolution)
        Trainer.callbacks.append(validation)
    try:
        result = method.distill(ctx)  # the kit records config.json's teacher NFEs and the scheduler
    finally:
        if validation is not None:
            Trainer.callbacks.remove(validation)
    result.method = result.method or method
    method = result.method
    if accelerator is None or accelerator.is_main_process:
        network = _find_text_unet(result.student)
        write_json_atomic({**base["sd"], "prediction_type": network.prediction_type,
                           "method": method.name, "rayflow_version": __version__}, out_dir / SD_JSON)
        if lora_info is not None:
            save_safetensors_atomic(lora_state_dict(network), out_dir / LORA_WEIGHTS,
                                    {"format": "pt", "lora": json.dumps(lora_info)})
    return result

