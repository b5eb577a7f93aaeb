"""Networks and the denoiser calling convention."""

from rayflow.models.base import (
    ClassifierFreeGuidance,
    Condition,
    Denoiser,
    EpsilonView,
    as_epsilon,
    broadcast_timesteps,
    drop_labels,
    with_guidance,
)
from rayflow.models.networks import (
    DiffusersDenoiser,
    MLPDenoiser,
    ModelConfig,
    UNetDenoiser,
    build_model,
    default_model_config,
)
from rayflow.models.speed import FrozenTeacher, prepare_frozen_teacher, to_channels_last

__all__ = [
    "ClassifierFreeGuidance", "Condition", "Denoiser", "DiffusersDenoiser", "EpsilonView", "FrozenTeacher",
    "MLPDenoiser", "ModelConfig", "UNetDenoiser", "as_epsilon", "broadcast_timesteps", "build_model",
    "default_model_config", "drop_labels", "prepare_frozen_teacher", "to_channels_last", "with_guidance",
]
