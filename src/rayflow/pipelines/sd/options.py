"""Options of the pipeline path: the student's LoRA and everything besides the method's and the trainer's."""

from __future__ import annotations

from dataclasses import dataclass, field

from rayflow.errors import require
from rayflow.models.text import DEFAULT_LORA_TARGETS


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
