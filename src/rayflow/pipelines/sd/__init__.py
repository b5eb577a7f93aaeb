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

The code, by responsibility: :mod:`.pipeline` (the teacher folder), :mod:`.latents` (captions, prompt table,
latent cache, VAE decoding), :mod:`.options` (``LoraSpec``, ``SDOptions``), :mod:`.distill` (:func:`distill_sd`),
:mod:`.validation` (validation images during training), :mod:`.student` (loading, sampling, writing samples).
"""

# every name the single module ``sd.py`` had stays importable from here, the private helpers and constants too
from rayflow.pipelines.sd.distill import PROMPT_ONLY_METHODS, _teacher_dtype, distill_sd  # noqa: F401
from rayflow.pipelines.sd.latents import (  # noqa: F401
    _latent_meta,
    _null_row,
    _time_ids,
    decode_latents,
    encode_texts,
    preprocess_captions,
    prompt_table,
)
from rayflow.pipelines.sd.options import LoraSpec, SDOptions
from rayflow.pipelines.sd.pipeline import (
    SUPPORTED_PIPELINES,
    SDPipeline,
    check_pipeline_dir,
    is_pipeline_dir,
    load_sd_pipeline,
)
from rayflow.pipelines.sd.student import (  # noqa: F401
    LORA_WEIGHTS,
    SD_JSON,
    SDStudent,
    load_sd_student,
    sample_teacher_latents,
    write_samples,
)
from rayflow.pipelines.sd.validation import VALIDATION_DIR, ValidationImages, _find_text_unet  # noqa: F401

__all__ = ["LoraSpec", "SDOptions", "SDPipeline", "SDStudent", "SUPPORTED_PIPELINES", "check_pipeline_dir",
           "distill_sd", "encode_texts", "is_pipeline_dir", "load_sd_pipeline", "load_sd_student",
           "preprocess_captions", "prompt_table", "sample_teacher_latents", "decode_latents", "write_samples"]
