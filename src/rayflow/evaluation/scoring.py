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


#: the feature view of the default ``fd``/``kid``/``fd_net2`` (:data:`~rayflow.metrics.FEATURE_SPACES`); issue 11
DEFAULT_VIEW = "early"


def _view(net: FeatureNet, images: torch.Tensor, ref: torch.Tensor, view: str,
          memo: dict[tuple[int, str], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sample features, reference features)`` of one view. The early view is read off the multi-layer
    statistics (their first :attr:`~rayflow.metrics.FeatureNet.early_dim` columns) and ``memo`` keeps the
    samples' features per network and space, so the network runs once per image for ``fd`` and ``fd_multilayer``."""
    space = "multilayer" if view == "early" else view
    key = (id(net), space)
    if key not in memo:
        memo[key] = extract_features(net, images, space=space)
    feats, ref_feats = memo[key], _reference_features(net, ref, space)
    if view == "early":
        return feats[:, :net.early_dim], ref_feats[:, :net.early_dim]
    return feats, ref_feats


def evaluate_images(
    samples: torch.Tensor | np.ndarray, reference: Dataset, feature_net: FeatureNet,
    labels: torch.Tensor | None = None, teacher_samples: torch.Tensor | np.ndarray | None = None,
    kid_subsets: int = 10, kid_subset_size: int = 1000, inception: InceptionFeatures | None = None,
    second_net: FeatureNet | None = None, view: str = DEFAULT_VIEW,
) -> dict[str, float | str]:
    """Score image samples (model-space ``[N, C, H, W]`` or uint8 ``[N, H, W, C]``) against ``reference``.

    Returns

    - ``fd``: the Fréchet distance between Gaussians fitted to ``feature_net``'s features of the samples and of
      the reference images, in the feature ``view`` (default ``"early"``:
      :meth:`~rayflow.metrics.FeatureNet.early_features`, the per-channel spatial mean and std of the first two
      stages; the view that passed issue 11's degradation suite), and ``kid``/``kid_std``: KID on the same view;
    - ``fd_multilayer``: the FD of the statistics of every stage
      (:meth:`~rayflow.metrics.FeatureNet.multilayer_features`), the default ``fd`` from issue 11 until the
      early view replaced it, kept for continuity;
    - ``fd_classifier``: the FD of the pooled last-stage features, the ``fd`` before issue 11 (blind to blur,
      grain and fading), kept for continuity;
    - ``accuracy`` (how often ``feature_net`` classifies a conditional sample as its label; with ``labels``),
      ``fidelity`` (:func:`~rayflow.metrics.mean_pairwise_distance` to the teacher's samples from the same
      noise; with ``teacher_samples``), ``inception_fid``/``inception_kid`` (with ``inception``);
    - ``fd_net2``: ``fd`` (same view) under an independently trained ``second_net``, to check that two feature
      networks rank methods alike; with ``second_net``, whose name goes in ``feature_net_2``;
    - ``feature_net`` (the network's name) and ``feature_view`` (the view of ``fd``, ``kid`` and ``fd_net2``),
      so a number says what measured it.

    FD and KID go through torchmetrics (:func:`~rayflow.metrics.fd_kid_torchmetrics`). They are biased/noisier
    at small N, so compare methods at equal sample counts; use a held-out split as ``reference`` (the feature
    network was trained on the train split). Samples of another shape than the reference, or evidently in
    another value range, are refused.
    """
    from rayflow.metrics import FEATURE_SPACES

    require(view in FEATURE_SPACES, f"unknown feature view {view!r}; choose from {', '.join(FEATURE_SPACES)}")
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
    memo: dict[tuple[int, str], torch.Tensor] = {}
    fd, kid, kid_std = fd_kid_torchmetrics(*_view(feature_net, images, ref, view, memo), kid_subsets=kid_subsets,
                                           kid_subset_size=kid_subset_size)
    out.update(fd=fd, kid=kid, kid_std=kid_std)
    # fd_multilayer as the default fd of before was computed (torchmetrics), so older rows compare exactly
    out["fd_multilayer"] = fd if view == "multilayer" else fd_kid_torchmetrics(
        *_view(feature_net, images, ref, "multilayer", memo), kid_subsets=0)[0]
    out["fd_classifier"] = frechet_distance(*_view(feature_net, images, ref, "pooled", memo))
    if inception is not None:
        ifd, ikid, _ = fd_kid_torchmetrics(inception.extract(images), _reference_features(inception, ref, "inception"),
                                           kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
        out.update(inception_fid=ifd, inception_kid=ikid)
    if second_net is not None:
        require(second_net.input_shape == shape, f"second feature net {second_net.name!r} expects images "
                                                 f"{list(second_net.input_shape)}, not {list(shape)}")
        out["fd_net2"] = fd_kid_torchmetrics(*_view(second_net, images, ref, view, memo), kid_subsets=0)[0]
    if labels is not None:
        labels = torch.as_tensor(labels).long().reshape(-1)
        require(labels.shape[0] == x.shape[0], f"{labels.shape[0]} labels for {x.shape[0]} samples")
        require(bool(((labels >= 0) & (labels < feature_net.num_classes)).all()),
                f"labels must lie in 0..{feature_net.num_classes - 1} (the classes of {feature_net.name!r})")
        out["accuracy"] = classifier_accuracy(feature_net, images, labels)
    if teacher_samples is not None:
        out["fidelity"] = mean_pairwise_distance(x, _model_images(teacher_samples, shape, "teacher samples"))
    out["feature_net"] = feature_net.name
    out["feature_view"] = view
    if second_net is not None:
        out["feature_net_2"] = second_net.name
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
