"""The in-memory :class:`Dataset` in model space, and the pixel maps into and out of model space.

uint8 ``v`` maps to ``v / 127.5 - 1`` on loading (:func:`_uint8_to_model`) and back by rounding
(:func:`to_uint8_images`); :func:`_pad_images` centres images on a larger canvas of background ``-1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from rayflow.errors import RayflowError
from rayflow.gmm import GaussianMixture
from rayflow.validate import check_fits_memory


# ---------------------------------------------------------------------- the dataset
@dataclass
class Dataset:
    """A dataset in model space, held in memory.

    ``x`` is float32 ``[N, *sample_shape]``: images ``[N, C, H, W]`` in ``[-1, 1]`` (``kind="image"``) or
    vectors ``[N, D]`` (``kind="vector"``). ``labels`` is int64 ``[N]`` with values in ``0 .. num_classes-1``,
    or ``None`` with ``num_classes = 0`` for unlabelled data. ``spec`` is the canonical spec string that
    :func:`load_dataset` rebuilds the same data from. For ``mog`` data, ``mixture`` is the exact distribution
    the points were drawn from, so metrics can compare against the truth instead of a finite sample.
    """

    x: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int
    kind: str
    spec: str
    mixture: GaussianMixture | None = None

    def __post_init__(self) -> None:
        if self.labels is not None and self.labels.shape != (self.x.shape[0],):
            shape = tuple(self.labels.shape)
            raise RayflowError(f"{self.spec}: {self.x.shape[0]} samples but labels of shape {shape}")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample: ``(C, H, W)`` for images, ``(D,)`` for vectors."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]

    def sample_truth(
        self, n: int, generator: torch.Generator, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` fresh draws (float32 ``[n, D]``) and their component labels from the true distribution.

        Only ``mog`` datasets know their distribution; ``labels`` (int ``[n]``) fixes the components.
        """
        if self.mixture is None:
            raise RayflowError(f"{self.spec}: only mog datasets know their true distribution (sample_truth)")
        if n < 1:
            raise RayflowError(f"sample_truth: n must be >= 1, got {n}")
        if labels is not None:
            labels = torch.as_tensor(labels).long().cpu()
            k = self.mixture.num_modes
            if labels.shape != (n,):
                raise RayflowError(f"sample_truth: labels must have shape [{n}], got {tuple(labels.shape)}")
            if bool(torch.any((labels < 0) | (labels >= k))):
                raise RayflowError(f"sample_truth: labels must lie in 0..{k - 1}")
        return self.mixture.sample(n, generator, labels)


# ---------------------------------------------------------------------- helpers
def _uint8_to_model(images: np.ndarray) -> torch.Tensor:
    """uint8 pixels ``0..255`` -> float32 in ``[-1, 1]`` (``v / 127.5 - 1``), exactly invertible by rounding."""
    return torch.from_numpy(images.astype(np.float32) / np.float32(127.5) - np.float32(1.0))


def _pad_images(x: torch.Tensor, pad: int | str | None, where: str) -> torch.Tensor:
    """Centre ``[N, C, H, W]`` images on a ``pad x pad`` canvas of background ``-1`` (black in model space).

    ``pad="pow2"`` means the next power of two at or above the larger side, which is what UNets with several
    2x downsamplings need (28 -> 32).
    """
    if pad is None:
        return x
    h, w = x.shape[-2:]
    side = max(h, w)
    size = 1 << (side - 1).bit_length() if pad == "pow2" else int(pad)
    if size < side:
        raise RayflowError(f"{where}: pad={size} is smaller than the {h}x{w} images; pad must be >= {side}")
    check_fits_memory(4.0 * math.prod(x.shape[:-2]) * size * size, f"{where}: pad={size}")
    if size == h and size == w:
        return x
    top, left = (size - h) // 2, (size - w) // 2
    out = torch.full((*x.shape[:-2], size, size), -1.0, dtype=x.dtype)
    out[..., top : top + h, left : left + w] = x
    return out


# ---------------------------------------------------------------------- export
def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """Model-space images ``[N, C, H, W]`` in ``[-1, 1]`` -> uint8 ``[N, H, W, C]`` for PIL/metrics.

    The inverse of the ``v / 127.5 - 1`` loading map: ``round((x + 1) * 127.5)`` clipped to ``0..255``, with
    NaN mapped to 0 so a diverged sample shows up as black instead of undefined bytes.
    """
    x = torch.as_tensor(x)
    if x.ndim != 4:
        raise RayflowError(f"to_uint8_images expects images [N, C, H, W], got shape {tuple(x.shape)}")
    v = ((x.detach().to("cpu", torch.float32) + 1.0) * 127.5).nan_to_num(0.0).round().clamp(0, 255)
    return v.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
