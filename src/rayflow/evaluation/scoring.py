"""Scoring samples: image samples through the feature network (FD, KID, classifier FD and accuracy, optionally
Inception), vector samples against the truth (sliced Wasserstein, MMD); fidelity to the teacher."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from rayflow.errors import require
from rayflow.metrics import (
    FeatureNet,
    InceptionFeatures,
    classifier_accuracy,
    extract_features,
    fd_kid_torchmetrics,
    frechet_distance,
    mean_pairwise_distance,
    mmd_rbf,
    sliced_wasserstein,
)

if TYPE_CHECKING:

    from rayflow.data import Dataset

# --------------------------------------------------------------------------------------------------- evaluation


def _model_images(samples: torch.Tensor | np.ndarray, shape: tuple[int, int, int], what: str) -> torch.Tensor:
    """``[N, C, H, W]`` model-space images (floats) or uint8 ``[N, H, W, C]`` -> float32 ``[N, C, H, W]``."""
    is_uint8 = (isinstance(samples, np.ndarray) and samples.dtype == np.uint8) or (
        isinstance(samples, torch.Tensor) and samples.dtype == torch.uint8)
    x = torch.as_tensor(samples).detach().cpu()
    if is_uint8:
        require(x.ndim == 4, f"{what}: uint8 images must be [N, H, W, C], got shape {list(x.shape)}")
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    x = x.float()
    require(x.ndim == 4 and tuple(x.shape[1:]) == shape,
            f"{what}: expected images [N, {', '.join(map(str, shape))}] (or uint8 [N, {shape[1]}, {shape[2]}, "
            f"{shape[0]}]), got {'uint8 ' if is_uint8 else ''}shape {list(torch.as_tensor(samples).shape)}")
    return x


def _quantised(x: torch.Tensor) -> torch.Tensor:
    """Model-space images through the uint8 round trip a saved PNG makes (``to_uint8_images``, ``v/127.5-1``)."""
    from rayflow.data import to_uint8_images

    return torch.from_numpy(to_uint8_images(x)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _check_value_range(x: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    """Refuse float images that are evidently not in model space ``[-1, 1]`` (a score of them means nothing).

    ``[0, 255]`` floats (uint8 pixels cast to float) and ``[0, 1]`` images against a reference that uses the
    dark half of ``[-1, 1]`` are caught; values a little outside ``[-1, 1]`` are a sampler's overshoot and are
    clamped as a saved PNG would clamp them.
    """
    finite = x[torch.isfinite(x)]
    if finite.numel() == 0:
        return  # every value diverged: the metrics report nan
    lo, hi = float(finite.min()), float(finite.max())
    require(not (lo >= 0 and hi > 2), f"{what}: values lie in [{lo:.3g}, {hi:.3g}], which looks like 0..255 pixels; "
                                      "model-space samples are floats in [-1, 1] (uint8 images go in 'images')")
    ref_lo = float(reference.min())
    require(not (lo >= 0 and hi <= 1 and ref_lo < -0.5),
            f"{what}: values lie in [{lo:.3g}, {hi:.3g}] but the reference spans [{ref_lo:.3g}, "
            f"{float(reference.max()):.3g}]; samples look like [0, 1] images, expected [-1, 1]")


#: feature extraction is the costly part of scoring; the reference's features are kept per (network, reference)
_REFERENCE_FEATURES: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _reference_features(net: FeatureNet | InceptionFeatures, ref: torch.Tensor, space: str) -> torch.Tensor:
    key = (id(net), id(ref), space)
    hit = _REFERENCE_FEATURES.get(key)
    # the tensors are kept with the features, so an id cannot be reused by another object while cached
    if hit is None or hit[0] is not ref:
        feats = net.extract(ref) if isinstance(net, InceptionFeatures) else extract_features(net, ref, space=space)
        if len(_REFERENCE_FEATURES) > 8:
            _REFERENCE_FEATURES.clear()
        _REFERENCE_FEATURES[key] = hit = (ref, feats)
    return hit[1]


_QUANTISED_REFERENCE: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _quantised_reference(reference: Dataset) -> torch.Tensor:
    hit = _QUANTISED_REFERENCE.get(id(reference.x))
    if hit is None or hit[0] is not reference.x:
        _QUANTISED_REFERENCE.clear()
        _QUANTISED_REFERENCE[id(reference.x)] = hit = (reference.x, _quantised(reference.x))
    return hit[1]


def evaluate_images(
    samples: torch.Tensor | np.ndarray, reference: Dataset, feature_net: FeatureNet,
    labels: torch.Tensor | None = None, teacher_samples: torch.Tensor | np.ndarray | None = None,
    kid_subsets: int = 10, kid_subset_size: int = 1000, inception: InceptionFeatures | None = None,
    second_net: FeatureNet | None = None,
) -> dict[str, float | str]:
    """Score image samples (model-space ``[N, C, H, W]`` or uint8 ``[N, H, W, C]``) against ``reference``.

    Returns ``fd`` (Fréchet distance of ``feature_net``'s multi-layer features,
    :meth:`~rayflow.metrics.FeatureNet.multilayer_features`, vs the reference images), ``kid`` and ``kid_std``
    (KID on the same features), ``fd_classifier`` (the Fréchet distance of the 128-d pooled features, rayflow's
    ``fd`` before 0.2: blind to blur, grain and fading, kept for continuity), ``accuracy`` (how often
    ``feature_net`` classifies a conditional sample as the label it was generated with; only with ``labels``),
    ``fidelity`` (:func:`~rayflow.metrics.mean_pairwise_distance` to the teacher's samples from the same noise;
    only with ``teacher_samples``), ``inception_fid`` / ``inception_kid`` (only with ``inception``), ``fd_net2``
    (the default ``fd`` under an independently trained ``second_net``, to check that two feature networks rank
    methods alike; only with ``second_net``) and
    ``feature_net``, the network's name. FD and KID go through torchmetrics
    (:func:`~rayflow.metrics.fd_kid_torchmetrics`). They are biased/noisier at small N, so compare methods at
    equal sample counts; use a held-out split as ``reference`` (the feature network was trained on the train
    split). Samples of another shape than the reference, or evidently in another value range, are refused.
    """
    shape = feature_net.input_shape
    require(getattr(reference, "kind", "image") == "image", f"{reference.spec}: image metrics need image data")
    require(tuple(reference.x.shape[1:]) == shape,
            f"feature net {feature_net.name!r} expects images {list(shape)}, but the reference data "
            f"{reference.spec} has {list(reference.x.shape[1:])}")
    x = _model_images(samples, shape, "samples")
    _check_value_range(x, reference.x, "samples")
    images = _quantised(x)
    ref = _quantised_reference(reference)
    out: dict[str, float | str] = {}
    ml = extract_features(feature_net, images, space="multilayer")
    fd, kid, kid_std = fd_kid_torchmetrics(ml, _reference_features(feature_net, ref, "multilayer"),
                                           kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
    out.update(fd=fd, kid=kid, kid_std=kid_std)
    out["fd_classifier"] = frechet_distance(extract_features(feature_net, images, space="pooled"),
                                            _reference_features(feature_net, ref, "pooled"))
    if inception is not None:
        ifd, ikid, _ = fd_kid_torchmetrics(inception.extract(images), _reference_features(inception, ref, "inception"),
                                           kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
        out.update(inception_fid=ifd, inception_kid=ikid)
    if second_net is not None:
        require(second_net.input_shape == shape, f"second feature net {second_net.name!r} expects images "
                                                 f"{list(second_net.input_shape)}, not {list(shape)}")
        out["fd_net2"] = frechet_distance(extract_features(second_net, images, space="multilayer"),
                                          _reference_features(second_net, ref, "multilayer"))
    if labels is not None:
        labels = torch.as_tensor(labels).long().reshape(-1)
        require(labels.shape[0] == x.shape[0], f"{labels.shape[0]} labels for {x.shape[0]} samples")
        require(bool(((labels >= 0) & (labels < feature_net.num_classes)).all()),
                f"labels must lie in 0..{feature_net.num_classes - 1} (the classes of {feature_net.name!r})")
        out["accuracy"] = classifier_accuracy(feature_net, images, labels)
    if teacher_samples is not None:
        out["fidelity"] = mean_pairwise_distance(x, _model_images(teacher_samples, shape, "teacher samples"))
    out["feature_net"] = feature_net.name
    return out


def evaluate_vectors(
    samples: torch.Tensor, reference_samples: torch.Tensor, teacher_samples: torch.Tensor | None = None
) -> dict[str, float]:
    """Score vector samples ``[N, D]``: ``sw`` (sliced W2), ``mmd`` (multi-bandwidth RBF MMD²) against the
    reference, and ``fidelity`` to the teacher's samples from the same noise when given."""
    samples, reference_samples = torch.as_tensor(samples), torch.as_tensor(reference_samples)
    out = {"sw": sliced_wasserstein(samples, reference_samples), "mmd": mmd_rbf(samples, reference_samples)}
    if teacher_samples is not None:
        out["fidelity"] = mean_pairwise_distance(samples, torch.as_tensor(teacher_samples))
    return out
