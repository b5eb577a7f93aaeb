"""The small image feature network rayflow's image metrics are measured with: :class:`FeatureNet`, feature
extraction, classifier accuracy, training, and its safetensors + JSON save format.

The network is a compact CNN trained on the dataset itself. Its numbers are therefore *not* comparable with
published FID/KID (Inception features); they are comparable across methods, step counts and runs that use the
same saved network, which is what rayflow reports (the network's name travels with every result).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from rayflow.checkpoint import write_bytes_atomic
from rayflow.errors import RayflowError, require
from rayflow.progress import tqdm

if TYPE_CHECKING:
    from rayflow.data import Dataset

FEATURE_NET_WEIGHTS = "feature_net.safetensors"
FEATURE_NET_CONFIG = "feature_net.json"
_FORMAT_VERSION = 1


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`rayflow.checkpoint.write_bytes_atomic`); returns the path."""
    write_bytes_atomic(data, path)
    return Path(path)



# --------------------------------------------------------------------------------------------------- feature net


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


class FeatureNet(nn.Module):
    """Compact CNN whose 128-d pooled features define rayflow's image FD/KID, with a classifier head.

    Architecture for input ``[C, H, W]`` (``H, W >= 8``): a stem ``conv3x3(C -> w)``, then ``n`` stride-2
    stages ``conv3x3`` doubling the width (the last one to ``feature_dim``), each followed by
    ``GroupNorm + SiLU``; ``n = clamp(floor(log2(min(H, W))) - 1, 2, 4)`` so the map ends at 2x2 to 4x4 (8x8 -> 2x2,
    28x28 -> 4x4, 32x32 -> 2x2, 64x64 -> 4x4). Global average pooling gives :meth:`features`; a linear layer
    gives logits.
    """

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, width: int = 32, feature_dim: int = 128,
        name: str = "rayflow-cnn", data_spec: str = "",
    ) -> None:
        super().__init__()
        require(len(input_shape) == 3, f"FeatureNet: input shape must be [C, H, W], got {list(input_shape)}")
        c, h, w = (int(s) for s in input_shape)
        require(c >= 1 and h >= 8 and w >= 8, f"FeatureNet: needs C >= 1 and H, W >= 8, got {[c, h, w]}")
        require(num_classes >= 2, f"FeatureNet: needs at least 2 classes, got {num_classes}")
        self.input_shape = (c, h, w)
        self.num_classes = int(num_classes)
        self.width = int(width)
        self.feature_dim = int(feature_dim)
        self.name = name
        self.data_spec = data_spec

        n_down = min(max(int(math.log2(min(h, w))) - 1, 2), 4)
        chans = [width * 2**i for i in range(n_down)] + [feature_dim]
        layers: list[nn.Module] = [nn.Conv2d(c, chans[0], 3, padding=1), nn.GroupNorm(_groups(chans[0]), chans[0]),
                                   nn.SiLU()]
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(_groups(cout), cout), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(feature_dim, num_classes)

    def config(self) -> dict:
        """Everything :func:`load_feature_net` needs to rebuild the network (and to say what it is)."""
        return {
            "format_version": _FORMAT_VERSION, "name": self.name, "data_spec": self.data_spec,
            "input_shape": list(self.input_shape), "num_classes": self.num_classes, "width": self.width,
            "feature_dim": self.feature_dim,
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[N, feature_dim]`` of images ``[N, C, H, W]`` in ``[-1, 1]``."""
        return self.body(x).mean(dim=(2, 3))

    def stage_activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The activation map after every ``GroupNorm + SiLU`` stage (stem first), ``[N, C_s, H_s, W_s]`` each."""
        out = []
        for m in self.body:
            x = m(x)
            if isinstance(m, nn.SiLU):
                out.append(x)
        return out

    def multilayer_features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel spatial mean and standard deviation of every stage, concatenated: ``[N, 2 sum_s C_s]``.

        ``phi(x) = concat_s [mean_{h,w} a_s(x), std_{h,w} a_s(x)]`` over the stage activations ``a_s``. The
        early stages see edges and grain and the standard deviations see how strongly they respond (LPIPS-like
        use of several depths, Gram-like second moments), so blur, noise and fading move these features even
        where the last, class-trained stage is invariant to them. Same network, no extra training.
        """
        return torch.cat([torch.cat([a.mean(dim=(2, 3)), a.std(dim=(2, 3))], 1) for a in self.stage_activations(x)], 1)

    @property
    def multilayer_dim(self) -> int:
        """Length of :meth:`multilayer_features`: twice the summed channel counts of all stages."""
        return 2 * sum(self.stage_channels)

    @property
    def stage_channels(self) -> list[int]:
        """Channel count of every stage's activation (stem first), as :meth:`stage_activations` returns them."""
        return [m.num_channels for m in self.body if isinstance(m, nn.GroupNorm)]

    def early_features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel spatial mean and standard deviation of the first two stages only: ``[N, 2 (C_0 + C_1)]``.

        ``phi_early(x) = concat_{s in {0, 1}} [mean_{h,w} a_s(x), std_{h,w} a_s(x)]``: the stem (full resolution)
        and the first stride-2 stage (half resolution), i.e. the first ``2 (C_0 + C_1)`` columns of
        :meth:`multilayer_features` (std is the unbiased sample standard deviation over the ``H_s W_s`` positions).
        These stages respond to edges, grain and stroke contrast, so fine-detail corruptions (blur, mild noise)
        move them well above the train-vs-test floor where the deeper, class-trained stages barely move
        (docs/metrics.md, BENCHMARKS.md section 5). This is rayflow's default ``fd`` (``space="early"``).
        """
        acts = self.stage_activations(x)[:2]
        return torch.cat([torch.cat([a.mean(dim=(2, 3)), a.std(dim=(2, 3))], 1) for a in acts], 1)

    @property
    def early_dim(self) -> int:
        """Length of :meth:`early_features`: twice the channel counts of the first two stages."""
        return 2 * sum(self.stage_channels[:2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _check_images(net: FeatureNet, images: torch.Tensor) -> torch.Tensor:
    images = torch.as_tensor(images)
    require(images.ndim == 4 and tuple(images.shape[1:]) == net.input_shape,
            f"feature net {net.name!r} expects images [N, {', '.join(map(str, net.input_shape))}], "
            f"got {list(images.shape)}")
    return images


#: feature spaces of a :class:`FeatureNet`: ``early`` (the default ``fd``, :meth:`FeatureNet.early_features`),
#: ``multilayer`` (every stage, ``fd_multilayer``, the default from issue 11 until the early view replaced it;
#: :meth:`FeatureNet.multilayer_features`) and ``pooled`` (the last stage's global average, ``fd_classifier``)
FEATURE_SPACES: tuple[str, ...] = ("early", "multilayer", "pooled")


@torch.no_grad()
def extract_features(net: FeatureNet, images: torch.Tensor, batch_size: int = 500,
                     space: str = "pooled") -> torch.Tensor:
    """Features of ``images [N, C, H, W]`` in batches, in eval mode, as float64 ``[N, F]``.

    ``space="pooled"`` gives :meth:`FeatureNet.features` (``feature_dim``), ``"multilayer"``
    :meth:`FeatureNet.multilayer_features` and ``"early"`` :meth:`FeatureNet.early_features`.
    """
    require(space in FEATURE_SPACES, f"unknown feature space {space!r}; choose from {', '.join(FEATURE_SPACES)}")
    images = _check_images(net, images)
    net.eval()
    param = next(net.parameters())
    fn, dim = {"pooled": (net.features, net.feature_dim), "multilayer": (net.multilayer_features, net.multilayer_dim),
               "early": (net.early_features, net.early_dim)}[space]
    out = [fn(images[i:i + batch_size].to(param.device, param.dtype)).double().cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dim, dtype=torch.float64)


@torch.no_grad()
def classifier_accuracy(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of ``images [N, C, H, W]`` that ``net`` assigns to ``labels [N]``: ``mean_i [argmax f(x_i) = y_i]``."""
    images = _check_images(net, images)
    labels = torch.as_tensor(labels).long().cpu().reshape(-1)
    require(labels.shape[0] == images.shape[0] and images.shape[0] > 0,
            f"accuracy needs one label per image, got {labels.shape[0]} labels for {images.shape[0]} images")
    net.eval()
    param = next(net.parameters())
    preds = torch.cat([net(images[i:i + batch_size].to(param.device, param.dtype)).argmax(1).cpu()
                       for i in range(0, images.shape[0], batch_size)])
    return float((preds == labels).double().mean())


def _decoder(net: FeatureNet) -> nn.Module:
    """A decoder mirroring ``net``'s stages: from the last map back to ``[C, H, W]`` (training aid only)."""
    convs = [m for m in net.body if isinstance(m, nn.Conv2d)]
    chans = [m.out_channels for m in convs]  # stem, then each stride-2 stage
    layers: list[nn.Module] = []
    for cin, cout in zip(chans[::-1][:-1], chans[::-1][1:]):
        layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                   nn.Conv2d(cin, cout, 3, padding=1), nn.SiLU()]
    layers += [nn.Upsample(size=net.input_shape[1:], mode="bilinear", align_corners=False),
               nn.Conv2d(chans[0], net.input_shape[0], 3, padding=1)]
    return nn.Sequential(*layers)


def train_feature_net(
    dataset: Dataset, steps: int = 600, batch_size: int = 128, seed: int = 0, lr: float = 2e-3,
    progress: bool = True, device: str | torch.device = "cpu", width: int = 32, feature_dim: int = 128,
    recon_weight: float = 1.0,
) -> FeatureNet:
    """Train a :class:`FeatureNet` on ``dataset.x`` / ``dataset.labels``: a classifier with an autoencoder term.

    Deterministic given ``seed``: initialisation runs under a forked global RNG seeded with it (the caller's
    RNG state is left untouched) and batches draw from a private generator. The learning rate
    follows a cosine decay to 0. No augmentation: random +-1 pixel shifts were tried on the 8x8 digits and did
    not raise held-out accuracy (seeds 0-1: 99.3-100% without, 98.3-99.3% with). The defaults reach 99.3-100% on
    the digits test split in ~5 CPU-seconds.

    ``recon_weight > 0`` (default 1.0) adds an autoencoder term so the features are not class-invariant: a
    throw-away decoder (bilinear 2x upsampling + ``conv3x3`` + SiLU per stage, back to the input size)
    reconstructs the input from the last stage, and the loss is ``CE + recon_weight * mean (dec(body(x)) - x)^2``.
    Only the network (body and classifier head) is returned; the decoder is discarded (the saved format does not
    change). The default is 1.0 since the early-view ``fd`` became the default: the only pair of networks whose
    early view passed the whole degradation suite was trained this way (BENCHMARKS.md section 5.1); ``0`` gives
    the plain classifier of older releases. Such a network is named ``rayflow-cnn-ae/<dataset.spec>``, a plain
    classifier ``rayflow-cnn/<dataset.spec>``, so a score's ``feature_net`` says which kind measured it.
    """
    require(getattr(dataset, "kind", "image") == "image" and dataset.x.ndim == 4,
            f"a feature network needs image data [N, C, H, W], got {getattr(dataset, 'kind', '?')} data "
            f"of shape {list(dataset.x.shape)}")
    require(dataset.labels is not None, "a feature network is trained as a classifier: the data needs labels")
    require(steps >= 1 and batch_size >= 1, f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    require(math.isfinite(recon_weight) and recon_weight >= 0, f"recon_weight must be >= 0, got {recon_weight}")
    x = dataset.x.detach().float().cpu()
    y = dataset.labels.detach().long().cpu()
    num_classes = int(getattr(dataset, "num_classes", 0) or int(y.max()) + 1)
    require(int(y.min()) >= 0 and int(y.max()) < num_classes, f"labels must lie in 0..{num_classes - 1}")
    spec = str(getattr(dataset, "spec", "") or "")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(tuple(x.shape[1:]), num_classes, width=width, feature_dim=feature_dim,
                         name=f"rayflow-cnn{'-ae' if recon_weight > 0 else ''}/{spec or 'custom'}", data_spec=spec)
        decoder = _decoder(net) if recon_weight > 0 else None
    net.to(device)
    params = list(net.parameters())
    if decoder is not None:
        decoder.to(device).train()
        params += list(decoder.parameters())
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    net.train()
    bar = tqdm(range(steps), desc=f"feature net {net.name}", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=g)
        xb = x[idx].to(device)
        if decoder is None:
            loss = F.cross_entropy(net(xb), y[idx].to(device))
        else:
            h = net.body(xb)
            loss = F.cross_entropy(net.head(h.mean(dim=(2, 3))), y[idx].to(device)) \
                + recon_weight * F.mse_loss(decoder(h), xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    net.eval()
    return net


def save_feature_net(net: FeatureNet, directory: str | os.PathLike) -> Path:
    """Write ``feature_net.safetensors`` (weights) and ``feature_net.json`` (config) into ``directory``, atomically.

    Returns the directory. Weights go first: a crash in between leaves the old config, which the shape checks of
    :func:`load_feature_net` reject rather than silently mixing two networks.
    """
    from safetensors.torch import save

    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(directory / FEATURE_NET_WEIGHTS, save(tensors, metadata={"name": net.name}))
    atomic_write_bytes(directory / FEATURE_NET_CONFIG, (json.dumps(net.config(), indent=2) + "\n").encode())
    return directory


def load_feature_net(directory: str | os.PathLike) -> FeatureNet:
    """Rebuild a :class:`FeatureNet` saved by :func:`save_feature_net` (eval mode, CPU).

    Never unpickles anything: weights are safetensors, the config is JSON. A missing or corrupt file, or weights
    that do not fit the config, raise :class:`RayflowError` naming the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, w_path = directory / FEATURE_NET_CONFIG, directory / FEATURE_NET_WEIGHTS
    try:
        cfg = json.loads(cfg_path.read_text())
        net = FeatureNet(cfg["input_shape"], cfg["num_classes"], width=cfg.get("width", 32),
                         feature_dim=cfg.get("feature_dim", 128), name=cfg.get("name", "rayflow-cnn"),
                         data_spec=cfg.get("data_spec", ""))
    except FileNotFoundError:
        raise RayflowError(f"feature network config not found: {cfg_path}") from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RayflowError) as e:
        raise RayflowError(f"corrupt feature network config {cfg_path}: {e}") from None
    try:
        tensors = load_file(w_path)
    except FileNotFoundError:
        raise RayflowError(f"feature network weights not found: {w_path}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise RayflowError(f"corrupt feature network weights {w_path}: {e}") from None
    expected = net.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise RayflowError(f"feature network weights {w_path} do not match {cfg_path}: "
                           f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in expected.items():
        if tensors[k].shape != v.shape:
            raise RayflowError(f"feature network weights {w_path} do not match {cfg_path}: {k} has shape "
                               f"{list(tensors[k].shape)}, expected {list(v.shape)}")
    net.load_state_dict({k: t.to(expected[k].dtype) for k, t in tensors.items()})
    return net.eval()
