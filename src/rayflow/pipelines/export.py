"""Export a distilled student back to a diffusers pipeline folder that diffusers loads with no rayflow code
beyond (at most) the scheduler class.

The folder written by :func:`export_pipeline` is what ``StableDiffusionPipeline.save_pretrained`` (or the
SDXL pipeline's) writes, plus the student's LoRA::

    PIPE_DIR/
        model_index.json                 the teacher's, with "scheduler" naming the student's scheduler class
        unet/ vae/ text_encoder/ tokenizer/ (text_encoder_2/ tokenizer_2/ for SDXL) ...
                                         the teacher's components (unet/ is the student's when fused or fully
                                         fine-tuned)
        scheduler/scheduler_config.json  the student's few-step sampling rule
        pytorch_lora_weights.safetensors the LoRA in diffusers' key format (LoRA students, unless fused)
        rayflow_export.json              what was exported: teacher folder, scheduler, LoRA or fused, version

so that, with ``N`` the student's number of steps and guidance folded into the student (``guidance_scale=1``)::

    pipe = StableDiffusionPipeline.from_pretrained(PIPE_DIR)
    pipe.load_lora_weights(PIPE_DIR)          # only for an unfused LoRA export
    images = pipe(prompt, num_inference_steps=N, guidance_scale=1).images

Sampling rule. The pipeline's loop is, with ``t_0 > t_1 > ... > t_{N-1}`` the scheduler's ``timesteps``
(integers on the teacher's scale, large = noise) and ``x_{t_0} = latents * init_noise_sigma``::

    out_k = unet(scale_model_input(x_{t_k}, t_k), t_k, text)          # raw student output
    x_{t_{k+1}} = scheduler.step(out_k, t_k, x_{t_k}).prev_sample     # x_{t_N} = the clean latent (t = -1)

so the exported scheduler must turn the raw output of the student network into the student's own update. A
stock diffusers scheduler is written where one does that exactly (e.g. ``DDIMScheduler`` with
``timestep_spacing="trailing"`` on the student's schedule for a Rectified Diffusion student); otherwise
rayflow's own :class:`diffusers.SchedulerMixin` class. diffusers records a class that is not its own as
``[module, class]`` in ``model_index.json`` (``["rayflow.schedulers", "RayFlowScheduler"]``) and
``from_pretrained`` resolves it, so the export loads wherever rayflow is installed - once
``rayflow.schedulers`` has been imported: diffusers 0.42 refuses to import a module named in a folder itself.

LoRA format. ``get_peft_model_state_dict`` -> the pipeline class's ``save_lora_weights`` (keys
``unet.<module>.lora_A.weight`` / ``lora_B``, peft's own names) with the adapter's ``LoraConfig`` as metadata
(so ``lora_alpha != r`` and per-module ranks survive); ``pipe.load_lora_weights(PIPE_DIR)`` loads every key.
diffusers' training scripts pass the state dict through ``convert_state_dict_to_diffusers`` first; that is
*not* done here, because (diffusers 0.42) it renames only the attention projections (``to_k.lora_A`` ->
``to_k.lora.down``) and leaves every other module (``proj_in``, ``ff.net.*``, resnet convolutions) in peft
form; the loader sees ``lora_A`` keys, skips its conversion back, and silently drops the attention LoRA: with
LCM-LoRA's target modules 64 of 158 tensors of a tiny UNet were lost (measured; attention-only LoRAs are
unaffected). A LoRA file only reproduces the student if the student's base
weights are the teacher's UNet, which is checked; ``fuse=True`` instead merges ``W + (alpha / r) B A`` into
the UNet and writes that as ``unet/``.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rayflow.errors import RayflowError, require

#: diffusers pipeline classes an export can be made from (``_class_name`` of ``model_index.json``)
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
EXPORT_MARKER = "rayflow_export.json"
#: UNet config keys that do not describe the architecture (may differ between teacher and student)
_NON_ARCH_KEYS = ("_name_or_path", "_diffusers_version", "_class_name", "_use_default_values")


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_pipeline` wrote."""

    out_dir: Path
    pipeline_class: str  # "StableDiffusionPipeline" | "StableDiffusionXLPipeline"
    scheduler: tuple[str, str]  # [module, class] as recorded in model_index.json
    lora: bool  # a pytorch_lora_weights.safetensors was written (False: fused or fully fine-tuned unet/)
    fused: bool


# ---------------------------------------------------------------------- checks
def read_pipeline_index(pipe_dir: str | os.PathLike) -> dict[str, Any]:
    """``model_index.json`` of a diffusers pipeline folder, refusing anything rayflow cannot export from.

    A rayflow pixel-space model directory (``config.json`` + ``model.safetensors``, no ``model_index.json``)
    gets its own message: such students have no diffusers pipeline to go back to.
    """
    d = Path(pipe_dir)
    require(d.is_dir(), f"teacher pipeline folder {d} does not exist")
    index = d / "model_index.json"
    if not index.is_file():
        require(not (d / "config.json").is_file(),
                f"{d} is a rayflow pixel-space model, not a diffusers pipeline folder: only students of a "
                f"StableDiffusion/StableDiffusionXL pipeline can be exported")
        raise RayflowError(f"{d} is not a diffusers pipeline folder (no model_index.json)")
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RayflowError(f"{index}: cannot read it as JSON: {exc}") from exc
    require(isinstance(meta, dict), f"{index}: expected a JSON object")
    cls = meta.get("_class_name")
    require(cls in SUPPORTED_PIPELINES,
            f"{index}: pipeline class {cls!r} is not supported; expected one of {', '.join(SUPPORTED_PIPELINES)}")
    for comp in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        require(isinstance(meta.get(comp), list) and (d / comp).is_dir(),
                f"{d}: the pipeline has no {comp}/ component")
    return meta


def _check_out_dir(out: Path) -> None:
    """The output may be absent, empty, or a previous rayflow export (replaced); anything else is refused so
    that an export never overwrites a user's files."""
    if not out.exists():
        return
    require(out.is_dir(), f"--out {out} exists and is not a directory")
    if any(out.iterdir()):
        require((out / EXPORT_MARKER).is_file(),
                f"--out {out} already holds files that are not a rayflow export; choose an empty or new folder")


def _check_scheduler(scheduler: Any) -> tuple[str, str]:
    """A diffusers scheduler whose class ``from_pretrained`` can import again by its recorded name."""
    from diffusers import ConfigMixin, SchedulerMixin

    require(isinstance(scheduler, SchedulerMixin) and isinstance(scheduler, ConfigMixin),
            f"the scheduler must be a diffusers SchedulerMixin + ConfigMixin, got {type(scheduler).__name__}")
    cls = type(scheduler)
    module = cls.__module__
    library = "diffusers" if module.split(".")[0] == "diffusers" else module
    try:
        found = getattr(importlib.import_module(library), cls.__name__, None)
    except ImportError:
        found = None
    require(found is cls,
            f"scheduler class {cls.__name__} cannot be imported as {library}.{cls.__name__}, so from_pretrained "
            f"could not load the export; define it in an importable module")
    return library, cls.__name__


def _unwrap_unet(unet: Any) -> Any:
    """The UNet inside a peft ``PeftModel`` or a compiled / DDP wrapper."""
    for _ in range(4):
        if hasattr(unet, "get_base_model") and callable(unet.get_base_model):  # peft.PeftModel
            unet = unet.get_base_model()
        elif hasattr(unet, "_orig_mod"):  # torch.compile
            unet = unet._orig_mod
        elif isinstance(unet, torch.nn.parallel.DistributedDataParallel):
            unet = unet.module
        else:
            break
    return unet


def lora_adapter_names(unet: torch.nn.Module) -> list[str]:
    """Names of the peft LoRA adapters injected into ``unet`` (empty for a plain UNet)."""
    cfg = getattr(unet, "peft_config", None)
    if isinstance(cfg, dict) and cfg:
        return list(cfg)
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    names: list[str] = []
    for m in unet.modules():
        if isinstance(m, BaseTunerLayer):
            names.extend(n for n in m.active_adapters if n not in names)
    return names


def _base_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The non-LoRA weights of a peft-wrapped UNet under the plain UNet's names (``.base_layer`` dropped)."""
    out = {}
    for k, v in unet.state_dict().items():
        if "lora_" in k or "lora_magnitude_vector" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out


def _check_same_architecture(student: torch.nn.Module, teacher_unet: torch.nn.Module) -> None:
    s = {k: v for k, v in dict(getattr(student, "config", {})).items() if k not in _NON_ARCH_KEYS}
    t = {k: v for k, v in dict(teacher_unet.config).items() if k not in _NON_ARCH_KEYS}
    diff = sorted(k for k in set(s) | set(t) if json.dumps(s.get(k), default=str) != json.dumps(t.get(k), default=str))
    require(type(student).__name__ == type(teacher_unet).__name__ and not diff,
            f"the student UNet is not the teacher's architecture (differs in {', '.join(diff[:4]) or 'class'})")


def _check_base_is_teacher(student: torch.nn.Module, teacher_unet: torch.nn.Module) -> None:
    """A LoRA file alone reproduces the student only on top of exactly the teacher's weights (in the
    student's dtype: a base cast to bf16 for training is still the teacher's)."""
    base, ref = _base_state_dict(student), teacher_unet.state_dict()
    require(set(base) == set(ref), "the student's base weights do not match the teacher UNet's parameter names")
    for k, w in base.items():
        if not torch.equal(w.detach().cpu(), ref[k].detach().to(w.dtype).cpu()):
            raise RayflowError(f"the student's base weight {k} differs from the teacher's, so a LoRA file would not "
                               f"reproduce it; export with --fuse to write the whole UNet")


# ---------------------------------------------------------------------- export
def save_lora(pipeline_class: Any, unet: torch.nn.Module, out_dir: str | os.PathLike,
              adapter_name: str = "default") -> Path:
    """Write ``unet``'s peft LoRA as ``out_dir/pytorch_lora_weights.safetensors`` in diffusers' format."""
    from peft.utils import get_peft_model_state_dict

    # peft's key names, not convert_state_dict_to_diffusers' (see the module docstring: it loses tensors)
    state = {k: v.detach().cpu().contiguous()
             for k, v in get_peft_model_state_dict(unet, adapter_name=adapter_name).items()}
    metadata = None
    cfg = getattr(unet, "peft_config", {}).get(adapter_name)
    if cfg is not None:
        metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.to_dict().items()}
    pipeline_class.save_lora_weights(str(out_dir), unet_lora_layers=state, weight_name=LORA_WEIGHT_NAME,
                                     safe_serialization=True, unet_lora_adapter_metadata=metadata)
    return Path(out_dir) / LORA_WEIGHT_NAME


def fused_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """A copy of a peft-LoRA UNet with every adapter merged into its base weights and the LoRA layers removed."""
    merged = copy.deepcopy(unet)
    merged.fuse_lora()
    merged.unload_lora()
    return merged


def export_pipeline(
    teacher_pipe_dir: str | os.PathLike,
    student_unet: torch.nn.Module,
    scheduler: Any,
    out_dir: str | os.PathLike,
    fuse: bool = False,
    info: dict[str, Any] | None = None,
) -> ExportResult:
    """Write a diffusers pipeline folder for a student of the pipeline at ``teacher_pipe_dir``.

    ``student_unet`` is the trained ``UNet2DConditionModel``: with peft LoRA adapters on the teacher's frozen
    weights (written as ``pytorch_lora_weights.safetensors``, or merged into ``unet/`` with ``fuse=True``) or
    fully fine-tuned (written as ``unet/``). ``scheduler`` is the student's few-step diffusers scheduler (see
    the module docstring for the contract). ``info`` is added to ``rayflow_export.json``.

    The folder is written next to ``out_dir`` first and moved into place only when complete, so a failure
    leaves ``out_dir`` as it was. Raises :class:`RayflowError` for a folder that is not a supported
    pipeline, a pixel-space rayflow model, an ``out_dir`` holding other files, or a student that does not fit
    the teacher.
    """
    import diffusers

    teacher_dir = Path(teacher_pipe_dir)
    meta = read_pipeline_index(teacher_dir)
    out = Path(out_dir)
    _check_out_dir(out)
    sched_name = _check_scheduler(scheduler)
    unet = _unwrap_unet(student_unet)
    adapters = lora_adapter_names(unet)
    require(len(adapters) <= 1, f"the student has several LoRA adapters ({', '.join(adapters)}); expected one")

    pipe_cls = getattr(diffusers, meta["_class_name"])
    try:
        pipe = pipe_cls.from_pretrained(str(teacher_dir), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise RayflowError(f"cannot load the teacher pipeline {teacher_dir}: {exc}") from exc
    _check_same_architecture(unet, pipe.unet)

    lora = bool(adapters) and not fuse
    if lora:
        _check_base_is_teacher(unet, pipe.unet)
    elif adapters:
        pipe.unet = fused_unet(unet).to("cpu")
    else:
        pipe.unet = copy.deepcopy(unet).to("cpu")
    pipe.scheduler = scheduler

    tmp = out.parent / f".{out.name}.tmp-export"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        if lora:
            save_lora(pipe_cls, unet, tmp, adapter_name=adapters[0])
        record = {"rayflow_export": 1, "teacher": str(teacher_dir.resolve()), "pipeline": meta["_class_name"],
                  "scheduler": list(sched_name), "lora": lora, "fused": bool(adapters) and fuse,
                  "lora_weight_name": LORA_WEIGHT_NAME if lora else None, **(info or {})}
        (tmp / EXPORT_MARKER).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        written = json.loads((tmp / "model_index.json").read_text(encoding="utf-8"))
        require(written.get("scheduler") == list(sched_name),
                f"diffusers recorded the scheduler as {written.get('scheduler')}, expected {list(sched_name)}")
        if out.exists():  # a previous export (checked above): swap it out only now that the new one is complete
            old = out.parent / f".{out.name}.old-export"
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, meta["_class_name"], sched_name, lora, bool(adapters) and fuse)


# ---------------------------------------------------------------------- students on disk
def stock_scheduler(method: Any, schedule: Any, prediction_type: str) -> Any | None:
    """A stock diffusers scheduler that reproduces ``method``'s sampler exactly, or None.

    Rectified Diffusion (non-phased) samples with deterministic DDIM on the trailing grid
    ``t_k = round(T - k T / N) - 1`` of its student schedule down to ``t = -1`` (``alpha_bar = 1``). diffusers'
    ``DDIMScheduler(timestep_spacing="trailing")`` steps to ``t - T // N`` instead of the next grid point, which
    is the same grid only when ``N`` divides ``T`` (at N = 3 and 6 it differs by 0.07 and 0.38 on a toy model);
    ``DPMSolverMultistepScheduler`` of order 1 (DPM-Solver++(1), algebraically DDIM) steps between its own grid
    points, which are exactly the trailing ones, and ends at sigma = 0: equal to rayflow's ``ddim`` at every N
    (2.7e-5 max in float32 against float64 at N = 1..6).
    """
    from diffusers import DPMSolverMultistepScheduler

    if getattr(method, "name", "") != "rectified-diffusion" or getattr(method.config, "phased", False):
        return None
    if prediction_type not in ("epsilon", "sample", "v_prediction"):
        return None
    sched = method.student_schedule(schedule)
    ac = sched.alphas_cumprod.to(torch.float64)
    betas = 1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
    return DPMSolverMultistepScheduler(
        num_train_timesteps=int(ac.numel()), trained_betas=betas.tolist(), solver_order=1,
        algorithm_type="dpmsolver++", timestep_spacing="trailing", final_sigmas_type="zero",
        prediction_type=prediction_type, lower_order_final=True)


def student_scheduler(method: Any, schedule: Any, prediction_type: str) -> Any:
    """The diffusers scheduler of a student: ``method.make_scheduler(schedule)`` where the method has one
    (rayflow's scheduler classes, issue #9), else a stock scheduler that is exact (:func:`stock_scheduler`)."""
    make = getattr(method, "make_scheduler", None)
    if callable(make):
        return make(schedule)
    stock = stock_scheduler(method, schedule, prediction_type)
    require(stock is not None,
            f"method {getattr(method, 'name', '?')!r} has no diffusers scheduler to export its sampler with")
    return stock


def export_student(student_dir: str | os.PathLike, out_dir: str | os.PathLike, fuse: bool = False) -> ExportResult:
    """``rayflow export``: a student directory written by ``rayflow distill --teacher PIPE_DIR`` to a pipeline
    folder (see :func:`export_pipeline`), its sampler as the scheduler (see :func:`student_scheduler`)."""
    d = Path(student_dir)
    require(d.is_dir(), f"--model {d} does not exist")
    require((d / "config.json").is_file(), f"--model {d}: no config.json; not a rayflow student directory")
    try:
        config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RayflowError(f"{d / 'config.json'}: cannot read it as JSON: {exc}") from exc
    require(isinstance(config, dict) and config.get("kind") == "student",
            f"--model {d} is not a distilled student (config.json kind is {config.get('kind')!r})")
    kind = (config.get("model") or {}).get("kind")
    require(kind == "sd", f"--model {d} is a student of a pixel-space teacher ({kind!r} network): only students of "
                          f"a StableDiffusion/StableDiffusionXL pipeline can be exported")
    _check_out_dir(Path(out_dir))  # before loading anything: a refusal is one line and costs nothing
    from rayflow.pipelines.sd import load_sd_student

    st = load_sd_student(d, device="cpu")
    scheduler = student_scheduler(st.method, st.schedule, st.prediction_type)
    info = {"student": str(d.resolve()), "method": st.method.name, "prediction_type": st.prediction_type}
    return export_pipeline(st.pipeline_dir, st.unet, scheduler, out_dir, fuse=fuse, info=info)
