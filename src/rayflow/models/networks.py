"""The networks rayflow builds itself, and the adapter for diffusers UNets.

* :class:`MLPDenoiser` - residual MLP for vector data (and tiny images, flattened); fast on a CPU.
* :class:`UNetDenoiser` - a small diffusers ``UNet2DModel`` (optionally class-conditional) for images.
* :class:`DiffusersDenoiser` - any diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (e.g. Stable
  Diffusion's UNet loaded from a local folder), called with our convention.

:class:`ModelConfig` describes any of them; it is serialised next to every checkpoint so a directory is
enough to rebuild the network (:func:`build_model`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from rayflow.errors import RayflowError, require
from rayflow.models.base import Condition, Denoiser, broadcast_timesteps, check_prediction_type


@dataclass
class ModelConfig:
    """Everything needed to rebuild a network; stored in ``config.json`` of every checkpoint."""

    kind: str = "mlp"  # "mlp" | "unet" | "diffusers"
    sample_shape: tuple[int, ...] = (2,)
    num_classes: int = 0
    prediction_type: str = "epsilon"
    # mlp
    hidden: int = 256
    depth: int = 4
    # unet (diffusers UNet2DModel)
    channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention: bool = False
    # diffusers adapter: the class name and the UNet's own config
    unet_class: str | None = None
    unet_config: dict[str, Any] = field(default_factory=dict)
    # kind="sd" (text-conditioned SD UNet, rayflow.models.text): {"table", "lora", "gradient_checkpointing", ...}
    sd: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        require(not unknown, f"model config has unknown keys {sorted(unknown)}")
        d = dict(d)
        for key in ("sample_shape", "channels"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def _time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    return get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)


class MLPDenoiser(Denoiser):
    """Residual MLP ``(x, t, label) -> prediction`` on flattened inputs; labels get a learned embedding."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.prediction_type = check_prediction_type(config.prediction_type)
        self.num_classes = config.num_classes
        dim = int(torch.Size(config.sample_shape).numel())
        h = config.hidden
        self.inp = nn.Linear(dim, h)
        self.time = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h))
        self.label = nn.Embedding(config.num_classes + 1, h) if config.num_classes > 0 else None
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(h), nn.Linear(h, 2 * h), nn.SiLU(), nn.Linear(2 * h, h))
            for _ in range(config.depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition = None) -> torch.Tensor:
        b = x.shape[0]
        t = broadcast_timesteps(t, b, x.device)
        emb = self.time(_time_features(t, self.config.hidden).to(x.dtype))
        if self.label is not None:
            labels = cond if cond is not None else torch.full((b,), self.num_classes, device=x.device)
            emb = emb + self.label(labels.long())
        h = self.inp(x.reshape(b, -1)) + emb
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h).reshape(x.shape)


class DiffusersDenoiser(Denoiser):
    """Wrap a diffusers ``UNet2DModel`` or ``UNet2DConditionModel`` in rayflow's calling convention.

    ``UNet2DModel`` receives class labels (``class_labels=cond``); ``UNet2DConditionModel`` receives text
    embeddings (``encoder_hidden_states=cond``).
    """

    def __init__(self, unet: nn.Module, prediction_type: str = "epsilon", num_classes: int = 0) -> None:
        super().__init__()
        self.unet = unet
        self.prediction_type = check_prediction_type(prediction_type)
        self.num_classes = num_classes
        self._text = type(unet).__name__ == "UNet2DConditionModel"

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition = None) -> torch.Tensor:
        t = broadcast_timesteps(t, x.shape[0], x.device)
        if self._text:
            require(cond is not None, "a UNet2DConditionModel needs text embeddings as the condition")
            return self.unet(x, t, encoder_hidden_states=cond).sample
        if self.num_classes > 0 and cond is None:
            cond = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        return self.unet(x, t, class_labels=cond).sample

    def null_condition(self, batch_size: int, device: torch.device) -> Condition:
        if self._text:
            return None  # ClassifierFreeGuidance uses the zero embedding
        return super().null_condition(batch_size, device)

    @classmethod
    def from_pretrained(cls, path: str, subfolder: str | None = "unet", prediction_type: str | None = None):
        """Load a diffusers UNet from a local folder (never the network); the prediction type is read from the
        sibling ``scheduler/scheduler_config.json`` when not given."""
        import json
        import os

        from diffusers import UNet2DConditionModel, UNet2DModel

        folder = os.path.join(path, subfolder) if subfolder else path
        cfg_path = os.path.join(folder, "config.json")
        require(os.path.isfile(cfg_path), f"{cfg_path}: no diffusers UNet config here")
        with open(cfg_path) as f:
            cls_name = json.load(f).get("_class_name", "UNet2DConditionModel")
        klass = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}.get(cls_name)
        require(klass is not None, f"{cfg_path}: unsupported UNet class {cls_name!r}")
        if prediction_type is None:
            sched = os.path.join(path, "scheduler", "scheduler_config.json")
            prediction_type = "epsilon"
            if os.path.isfile(sched):
                with open(sched) as f:
                    prediction_type = json.load(f).get("prediction_type", "epsilon")
        unet = klass.from_pretrained(folder, use_safetensors=True, local_files_only=True)
        return cls(unet, prediction_type)


def _unet_config(config: ModelConfig) -> dict[str, Any]:
    c, h, w = config.sample_shape
    n = len(config.channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if config.attention and n >= 2:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    groups = min(8, min(config.channels))
    return dict(
        sample_size=h, in_channels=c, out_channels=c, block_out_channels=tuple(config.channels),
        layers_per_block=config.layers_per_block, down_block_types=tuple(down), up_block_types=tuple(up),
        norm_num_groups=groups, num_class_embeds=(config.num_classes + 1) if config.num_classes > 0 else None,
        attention_head_dim=8,
    )


class UNetDenoiser(DiffusersDenoiser):
    """A small diffusers ``UNet2DModel`` built from a :class:`ModelConfig` (``kind="unet"``)."""

    def __init__(self, config: ModelConfig) -> None:
        from diffusers import UNet2DModel

        require(len(config.sample_shape) == 3, f"a UNet needs image samples [C, H, W], got {config.sample_shape}")
        _, h, w = config.sample_shape
        down = 2 ** (len(config.channels) - 1)
        require(h == w and h % down == 0,
                f"a UNet with {len(config.channels)} levels needs square images divisible by {down}, got {h}x{w}")
        super().__init__(UNet2DModel(**_unet_config(config)), config.prediction_type, config.num_classes)
        self.config = config
        nn.init.zeros_(self.unet.conv_out.weight)
        nn.init.zeros_(self.unet.conv_out.bias)


def build_model(config: ModelConfig) -> Denoiser:
    """Instantiate the network a :class:`ModelConfig` describes (weights freshly initialised)."""
    if config.kind == "mlp":
        return MLPDenoiser(config)
    if config.kind == "unet":
        return UNetDenoiser(config)
    if config.kind == "diffusers":
        from diffusers import UNet2DConditionModel, UNet2DModel

        klass = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}.get(config.unet_class or "")
        require(klass is not None, f"unsupported diffusers UNet class {config.unet_class!r}")
        model = DiffusersDenoiser(klass.from_config(config.unet_config), config.prediction_type, config.num_classes)
        model.config = config
        return model
    if config.kind == "sd":
        from rayflow.models.text import build_sd_denoiser

        return build_sd_denoiser(config)
    raise RayflowError(f"unknown model kind {config.kind!r}; expected mlp, unet, diffusers or sd")


def default_model_config(sample_shape: tuple[int, ...], num_classes: int = 0) -> ModelConfig:
    """A sensible network for data of this shape: an MLP for vectors and tiny images, a UNet otherwise."""
    if len(sample_shape) == 1:
        return ModelConfig(kind="mlp", sample_shape=sample_shape, num_classes=num_classes, hidden=256, depth=4)
    if len(sample_shape) == 3 and sample_shape[1] * sample_shape[2] <= 64:
        # 8x8 images: an MLP is as good as a UNet here and an order of magnitude cheaper on a CPU
        return ModelConfig(kind="mlp", sample_shape=sample_shape, num_classes=num_classes, hidden=256, depth=3)
    return ModelConfig(kind="unet", sample_shape=sample_shape, num_classes=num_classes, channels=(32, 64, 64),
                       layers_per_block=1, attention=False)
