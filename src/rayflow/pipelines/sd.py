"""Distil a local Stable Diffusion (1.x/2.x) or SDXL diffusers pipeline into a few-step (LoRA) student.

Teacher. ``--teacher PIPE_DIR`` is a folder written by ``save_pretrained`` (``model_index.json`` naming
``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``), loaded with ``local_files_only`` - nothing is
downloaded. Its scheduler config gives the training schedule (``alpha_bar_t`` from diffusers' own betas,
``scaled_linear`` for SD) and the prediction type (``epsilon`` or ``v_prediction``); its UNet is the frozen
teacher (bf16 on CUDA by default), its VAE and text encoder(s) are used once, in preprocessing.

Data in latent space. Each caption record's image is transformed as diffusers' ``train_text_to_image`` does
(resize the short side to ``--resolution``, centre or random crop, optional horizontal flip, ``[-1, 1]``) and
encoded once into ``z0 = scaling_factor * E(x)`` (a draw of the VAE posterior); its caption into the text
encoder's last hidden state ``[L, D]`` (SDXL: the penultimate states of both encoders concatenated, the second
encoder's pooled projection and ``add_time_ids = (orig_h, orig_w, top, left, R, R)``). The results are a
:class:`~rayflow.caches.ShardedCache` (``CACHE/latents``), so an interrupted preprocessing resumes where it
stopped and the training runs the UNet alone. Every rayflow time convention holds in latent space: integer
timesteps ``0 .. T-1``, ``z_t = a_t z0 + s_t eps`` with ``a_t = sqrt(alpha_bar_t)``, ``s_t = sqrt(1 - alpha_bar_t)``.

Conditions are caption indices into a :class:`~rayflow.models.text.PromptTable` whose last row is the
unconditional prompt (the empty prompt's embedding; zeros when the pipeline forces zeros for empty prompts,
as SDXL does), so teacher CFG ``eps_u + w (eps_c - eps_u)`` and the methods' caption dropout (index -> null)
are exactly diffusers' pipelines' guidance and the training scripts' empty-caption dropout.

Student. The teacher's UNet with a peft LoRA adapter (``W + (alpha / r) B A``, ``B = 0`` at the start, so the
student starts at the teacher) or, with ``lora=None``, the whole UNet trained. Every method in
:mod:`rayflow.methods` trains it through the shared trainer (EMA of the trained weights, mixed precision,
checkpoints, resume).

Student directory (what :func:`load_sd_student` reads back)::

    config.json        rayflow's run config (model kind "sd", method + its config, schedule, teacher path)
    model.safetensors  the trained denoiser (EMA) state: a LoRA student's adapter weights only (its base is the
                       teacher's UNet, named by config.json's ``model.sd.base`` = pipeline folder + fingerprint
                       and read back from there); the whole UNet for full fine-tuning
    sd.json            pipeline path and class, LoRA config (rank, alpha, target modules), prediction types
    scheduler/         the method's diffusers scheduler config (``Method.make_scheduler``)
    lora.safetensors   peft's adapter state dict (``get_peft_model_state_dict``); absent for full fine-tuning
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rayflow import __version__
from rayflow.caches import build_or_load, meta_fingerprint, model_fingerprint
from rayflow.captions import CaptionData, load_captions, transform_image
from rayflow.checkpoint import load_model_dir, read_json, save_safetensors_atomic, write_json_atomic
from rayflow.data import Dataset
from rayflow.errors import RayflowError, require
from rayflow.methods import CountingDenoiser, DistillContext, DistillResult, Method, get_method
from rayflow.models import ModelConfig, as_epsilon
from rayflow.models.text import (
    DEFAULT_LORA_TARGETS,
    PromptTable,
    TextUNetDenoiser,
    add_lora,
    lora_state_dict,
    register_prompt_table,
    unet_fingerprint,
)
from rayflow.schedules import VPSchedule
from rayflow.training import Trainer

#: pipeline classes rayflow distils, and whether they are SDXL-type (two text encoders, added conditions)
SUPPORTED_PIPELINES = {"StableDiffusionPipeline": False, "StableDiffusionXLPipeline": True}
SD_JSON = "sd.json"
LORA_WEIGHTS = "lora.safetensors"
#: methods whose training data are only the teacher's own samples (global pairs): prompts-only data suffice
#: (also rectified-diffusion unless phased)
PROMPT_ONLY_METHODS = ("reflow",)


# ---------------------------------------------------------------------- the teacher pipeline
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


# ---------------------------------------------------------------------- text and images
@torch.no_grad()
def encode_texts(sd: SDPipeline, texts: list[str], device: torch.device, batch_size: int = 64
                 ) -> dict[str, torch.Tensor]:
    """diffusers' own ``encode_prompt`` for ``texts``: ``embeds`` [N, L, D] (SDXL also ``pooled`` [N, P]), CPU fp32."""
    embeds, pooled = [], []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        if sd.xl:
            e, _, p, _ = sd.pipe.encode_prompt(prompt=chunk, device=device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
            pooled.append(p.float().cpu())
        else:
            e, _ = sd.pipe.encode_prompt(chunk, device, 1, False)
        embeds.append(e.float().cpu())
    out = {"embeds": torch.cat(embeds)}
    if sd.xl:
        out["pooled"] = torch.cat(pooled)
    return out


def _null_row(sd: SDPipeline, device: torch.device) -> dict[str, torch.Tensor]:
    """The unconditional prompt as the pipelines build it: zeros if forced, else the empty prompt's embedding."""
    enc = encode_texts(sd, [""], device)
    if sd.force_zeros_for_empty_prompt:
        enc = {k: torch.zeros_like(v) for k, v in enc.items()}
    return enc


def _time_ids(original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]) -> list[float]:
    """SDXL's micro-conditioning ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``."""
    return [float(v) for v in (*original, *crop, *target)]


def prompt_table(sd: SDPipeline, texts: list[str], device: torch.device, resolution: int,
                 time_ids: torch.Tensor | None = None) -> PromptTable:
    """Encode ``texts`` and append the unconditional row; SDXL time ids default to an uncropped ``resolution``."""
    enc = encode_texts(sd, texts, device)
    null = _null_row(sd, device)
    embeds = torch.cat([enc["embeds"], null["embeds"]])
    if not sd.xl:
        return PromptTable(embeds)
    default = torch.tensor([_time_ids((resolution, resolution), (0, 0), (resolution, resolution))])
    ids = default.expand(len(texts), 6) if time_ids is None else time_ids.float()
    return PromptTable(embeds, torch.cat([enc["pooled"], null["pooled"]]), torch.cat([ids, default]))


def preprocess_captions(sd: SDPipeline, data: CaptionData, resolution: int, *, center_crop: bool = True,
                        random_flip: bool = False, cache_dir: str | Path | None = None, seed: int = 0,
                        batch_size: int = 16, shard_size: int = 1024, device: torch.device | str = "cpu",
                        progress: bool = False, accelerator: Any = None, mapped: bool = False
                        ) -> dict[str, torch.Tensor]:
    """Latents ``scaling_factor * E(x)`` and caption embeddings of every record, via a resumable sharded cache.

    ``mapped`` (with a ``cache_dir``): file-backed tensors (:meth:`~rayflow.caches.ShardedCache.load_mapped`),
    so training reads the rows it draws from disk instead of holding the whole data set in memory.

    Keys: ``latents`` [N, C, R/f, R/f] (absent for prompts-only data), ``embeds`` [N, L, D]; SDXL adds
    ``pooled`` [N, P] and ``time_ids`` [N, 6]. Shard ``i`` depends only on ``(seed, i)`` (crops, flips and the
    VAE posterior draws come from its generator), so a resumed build equals an uninterrupted one.
    """
    from rayflow.pairs import distributed

    require(resolution >= 8 and resolution % sd.vae_scale_factor == 0,
            f"--resolution must be a multiple of the VAE's factor {sd.vae_scale_factor}, got {resolution}")
    device = torch.device(device)
    vae = sd.vae.to(device)
    for name in ("text_encoder", "text_encoder_2"):  # encode_prompt puts the token ids on ``device``
        if getattr(sd.pipe, name, None) is not None:
            getattr(sd.pipe, name).to(device)
    sf = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    def make_shard(index: int, start: int, count: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        records = data.records[start:start + count]
        out: dict[str, torch.Tensor] = {}
        ids = []
        if data.has_images:
            lat = []
            for b in range(0, count, batch_size):
                imgs = []
                for rec in records[b:b + batch_size]:
                    flip = random_flip and bool(torch.rand((), generator=g) < 0.5)
                    x, orig, crop = transform_image(rec.load_image(), resolution, center_crop, flip, g)
                    imgs.append(x)
                    ids.append(_time_ids(orig, crop, (resolution, resolution)))
                x = torch.stack(imgs).to(device=device, dtype=vae.dtype)
                with torch.no_grad():
                    dist = vae.encode(x).latent_dist
                    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(device, dist.mean.dtype)
                lat.append(((z - shift) * sf).float().cpu())
            out["latents"] = torch.cat(lat)
        else:
            ids = [_time_ids((resolution, resolution), (0, 0), (resolution, resolution))] * count
        out.update(encode_texts(sd, [r.text for r in records], device))
        if sd.xl:
            out["time_ids"] = torch.tensor(ids, dtype=torch.float32)
        return out

    meta = _latent_meta(sd, data, resolution, center_crop, random_flip, seed)
    rank, world, barrier = distributed(accelerator)
    root = None if cache_dir is None else Path(cache_dir) / "latents"
    return build_or_load(root, meta, len(data), make_shard, seed=seed, shard_size=shard_size, progress=progress,
                         desc="latents", rank=rank, world_size=world, barrier=barrier, mapped=mapped)


def _latent_meta(sd: SDPipeline, data: CaptionData, resolution: int, center_crop: bool, random_flip: bool,
                 seed: int) -> dict[str, Any]:
    """What the latent cache is computed from (its ``meta.json``)."""
    return {"kind": "sd-latents", "pipeline": sd.fingerprint(), "data": data.spec, "resolution": resolution,
            "center_crop": center_crop, "random_flip": random_flip, "seed": seed,
            "texts": hashlib.sha256("\n".join(data.texts).encode()).hexdigest()[:16]}


# ---------------------------------------------------------------------- distillation
@dataclass
class LoraSpec:
    """The student's LoRA (``None`` in :func:`distill_sd` means full fine-tuning)."""

    rank: int = 64
    alpha: float | None = None  # None: alpha = rank (scale 1)
    target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS

    def __post_init__(self) -> None:
        require(isinstance(self.rank, int) and self.rank >= 1, f"--lora-rank must be >= 1, got {self.rank}")
        require(self.alpha is None or self.alpha > 0, f"--lora-alpha must be > 0, got {self.alpha}")
        require(len(self.target_modules) > 0, "--lora-targets needs at least one module name")


@dataclass
class SDOptions:
    """Options of the pipeline path besides the method's and the trainer's."""

    lora: LoraSpec | None = field(default_factory=LoraSpec)
    resolution: int | None = None  # None: the UNet's sample_size x the VAE factor
    center_crop: bool = True
    random_flip: bool = False
    gradient_checkpointing: bool = False
    teacher_dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU | fp32 | bf16 | fp16
    preprocess_batch: int = 16
    #: validation images (diffusers' --validation_prompts / --validation_steps): every ``validation_steps``
    #: optimizer steps (0 = never) the student samples these prompts at each of ``validation_sample_steps``
    validation_prompts: tuple[str, ...] = ()
    validation_steps: int = 0
    validation_sample_steps: tuple[int, ...] = (1, 2, 4)
    validation_seed: int = 0

    def __post_init__(self) -> None:
        require(self.resolution is None or self.resolution >= 8, f"--resolution must be >= 8, got {self.resolution}")
        require(self.validation_steps >= 0, f"--validation-steps must be >= 0, got {self.validation_steps}")
        require(not (self.validation_steps and not self.validation_prompts),
                "--validation-steps needs --validation-prompts")
        require(all(isinstance(k, int) and k >= 1 for k in self.validation_sample_steps)
                and len(self.validation_sample_steps) >= 1,
                f"validation sample steps must be integers >= 1, got {self.validation_sample_steps}")
        require(self.teacher_dtype in ("auto", "fp32", "bf16", "fp16"),
                f"--teacher-dtype must be auto, fp32, bf16 or fp16, got {self.teacher_dtype!r}")
        require(self.preprocess_batch >= 1, f"preprocess batch must be >= 1, got {self.preprocess_batch}")


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


# ---------------------------------------------------------------------- loading a student
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
def decode_latents(sd: SDPipeline, latents: torch.Tensor, device: torch.device | str = "cpu",
                   batch_size: int = 8) -> np.ndarray:
    """``x = D(z / scaling_factor + shift)`` with the pipeline's VAE, as uint8 ``[N, H, W, 3]``."""
    vae = sd.vae.to(device)
    sf = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for start in range(0, latents.shape[0], batch_size):
        z = latents[start:start + batch_size].to(device=device, dtype=vae.dtype) / sf + shift
        x = vae.decode(z).sample.float().clamp(-1, 1)
        out.append(((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


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


__all__ = ["LoraSpec", "SDOptions", "SDPipeline", "SDStudent", "SUPPORTED_PIPELINES", "check_pipeline_dir",
           "distill_sd", "encode_texts", "is_pipeline_dir", "load_sd_pipeline", "load_sd_student",
           "preprocess_captions", "prompt_table", "sample_teacher_latents", "decode_latents", "write_samples"]
