"""CLIP score of prompt-conditioned samples, through torchmetrics, from a local CLIP folder only.

For images ``I_i`` generated from prompts ``p_i`` and a CLIP model with image / text encoders ``E_I, E_T``::

    CLIPScore = max(0, (100 / N) * sum_i cos(E_I(I_i), E_T(p_i)))

(torchmetrics' ``CLIPScore``, as reported by the SD distillation papers with ViT-L/14 or ViT-g/14). The model
and its processor are read from ``clip_dir`` (a folder written by ``CLIPModel.save_pretrained`` plus
``CLIPProcessor.save_pretrained``: ``config.json``, weights, tokenizer and ``preprocessor_config.json``, or
``processor_config.json`` with transformers 5) with ``local_files_only=True``: nothing is downloaded, and a
missing or incomplete folder is refused with one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rayflow.errors import RayflowError, require


def load_clip(clip_dir: str | os.PathLike) -> tuple[Any, Any]:
    """``(CLIPModel, CLIPProcessor)`` from a local folder, in eval mode; :class:`RayflowError` if unusable."""
    from transformers import CLIPModel, CLIPProcessor

    d = Path(clip_dir)
    require(d.is_dir(), f"--clip-model {d} does not exist (give a local CLIP folder; nothing is downloaded)")
    require((d / "config.json").is_file(), f"--clip-model {d} has no config.json; not a CLIP model folder")
    require((d / "preprocessor_config.json").is_file() or (d / "processor_config.json").is_file(),
            f"--clip-model {d} has no (pre)processor_config.json; save the CLIPProcessor into the same folder")
    try:
        model = CLIPModel.from_pretrained(str(d), local_files_only=True)
        processor = CLIPProcessor.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RayflowError(f"--clip-model {d}: cannot load a CLIP model and processor: {exc}") from exc
    return model.eval(), processor


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line (as ``rayflow sample`` writes ``prompts.txt``); blank lines are dropped."""
    p = Path(path)
    require(p.is_file(), f"prompts file not found: {p}")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    require(prompts, f"{p}: no prompts")
    return prompts


class _FeatureTensors(torch.nn.Module):
    """A CLIPModel whose ``get_image_features`` / ``get_text_features`` return the projected feature tensor.

    transformers 5 returns a ``BaseModelOutputWithPooling`` (features in ``pooler_output``) where transformers 4,
    and torchmetrics' CLIPScore (<= 1.9), expect the tensor itself; the features are the same."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


@torch.no_grad()
def clip_score(
    images: np.ndarray | torch.Tensor,
    prompts: list[str],
    clip_dir: str | os.PathLike,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> float:
    """CLIP score (see the module docstring) of uint8 images ``[N, H, W, 3]`` against ``prompts`` (N of them,
    or one prompt for all)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    imgs = torch.as_tensor(np.asarray(images))
    require(imgs.dtype == torch.uint8 and imgs.ndim == 4 and imgs.shape[-1] == 3,
            f"CLIP score needs uint8 RGB images [N, H, W, 3], got {imgs.dtype} {list(imgs.shape)}")
    n = imgs.shape[0]
    if len(prompts) == 1:
        prompts = prompts * n
    require(len(prompts) == n, f"{len(prompts)} prompts for {n} images; give one prompt per image")
    require(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
    model, processor = load_clip(clip_dir)
    metric = CLIPScore(model_name_or_path=lambda: (_FeatureTensors(model), processor))
    if device is not None:
        metric = metric.to(device)
    chw = imgs.permute(0, 3, 1, 2)
    for start in range(0, n, batch_size):
        metric.update(list(chw[start:start + batch_size].to(metric.device)), prompts[start:start + batch_size])
    return float(metric.compute())
