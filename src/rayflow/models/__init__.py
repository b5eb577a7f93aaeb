"""Networks and the denoiser calling convention."""

from rayflow.models.base import (
    ClassifierFreeGuidance,
    Condition,
    Denoiser,
    EpsilonView,
    as_epsilon,
    broadcast_timesteps,
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

__all__ = [
    "ClassifierFreeGuidance", "Condition", "Denoiser", "DiffusersDenoiser", "EpsilonView", "MLPDenoiser",
    "ModelConfig", "UNetDenoiser", "as_epsilon", "broadcast_timesteps", "build_model", "default_model_config",
    "with_guidance",
]
