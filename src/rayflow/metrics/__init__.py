"""Sample-quality metrics and the small image feature network they are measured with.

Every distance is a pure function of two sample sets (tensors ``[N, ...]``, flattened to ``[N, d]``) and is
computed in float64, because the quantities involved (traces of covariance square roots, unbiased MMD sums)
are differences of large, nearly equal numbers. Random parts (KID subsets, sliced-Wasserstein directions)
take a ``torch.Generator``; without one they use a fixed seed, so re-running an evaluation gives the same
number and two methods evaluated in one run are measured with the same yardstick.

Image metrics (Fréchet distance, KID, classifier accuracy) use :class:`FeatureNet`, a compact CNN trained on
the dataset itself. Its numbers are therefore *not* comparable with published FID/KID (Inception features);
they are comparable across methods, step counts and runs that use the same saved network, which is what
rayflow reports (the network's name travels with every result).

By responsibility::

    distances.py    frechet_distance, FrechetStats, kernel_distance (KID), sliced_wasserstein, mmd_rbf,
                    mean_pairwise_distance, kendall_tau, fd_kid_torchmetrics
    feature_net.py  FeatureNet, extract_features, classifier_accuracy, train / save / load_feature_net
    inception.py    the optional Inception FID network: InceptionFeatures, resize_for_inception
"""

from __future__ import annotations

from rayflow.metrics.distances import (
    DEFAULT_RBF_BANDWIDTHS,
    FrechetStats,
    fd_kid_torchmetrics,
    frechet_distance,
    kendall_tau,
    kernel_distance,
    mean_pairwise_distance,
    mmd_rbf,
    sliced_wasserstein,
)
from rayflow.metrics.feature_net import (
    FEATURE_NET_CONFIG,
    FEATURE_NET_WEIGHTS,
    FEATURE_SPACES,
    FeatureNet,
    atomic_write_bytes,
    classifier_accuracy,
    extract_features,
    load_feature_net,
    save_feature_net,
    train_feature_net,
)
from rayflow.metrics.inception import (
    INCEPTION_INPUT_RANGE,
    INCEPTION_INSTALL,
    INCEPTION_SIZE,
    InceptionFeatures,
    inception_weights_path,
    resize_for_inception,
)

__all__ = [
    "DEFAULT_RBF_BANDWIDTHS",
    "FEATURE_NET_CONFIG",
    "FEATURE_NET_WEIGHTS",
    "FEATURE_SPACES",
    "INCEPTION_INPUT_RANGE",
    "INCEPTION_INSTALL",
    "INCEPTION_SIZE",
    "FeatureNet",
    "FrechetStats",
    "InceptionFeatures",
    "atomic_write_bytes",
    "classifier_accuracy",
    "extract_features",
    "fd_kid_torchmetrics",
    "frechet_distance",
    "inception_weights_path",
    "kendall_tau",
    "kernel_distance",
    "load_feature_net",
    "mean_pairwise_distance",
    "mmd_rbf",
    "resize_for_inception",
    "save_feature_net",
    "sliced_wasserstein",
    "train_feature_net",
]
