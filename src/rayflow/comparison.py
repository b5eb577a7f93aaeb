"""Side-by-side measurement: every generator at every NFE, from the same noise, scored the same way.

:class:`Scorer` fixes the reference once per data set - the held-out images and a feature classifier trained on
the training split (for images), or fresh draws from the true distribution (for Gaussian mixtures) - so every
row of a comparison is measured against the same thing. :func:`compare` runs generators over a list of NFEs and
returns flat rows (``method``, ``nfe``, metrics, seconds per sample) as the demo and the benchmarks write them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rayflow.data import Dataset, load_dataset
from rayflow.errors import require
from rayflow.evaluation import DEFAULT_VIEW, evaluate_images, evaluate_vectors
from rayflow.metrics import FeatureNet, InceptionFeatures, load_feature_net, save_feature_net, train_feature_net


def ensure_feature_net(train_data: Dataset, directory: str | Path | None, steps: int = 600,
                       progress: bool = True, device: str | torch.device = "cpu",
                       recon_weight: float = 1.0) -> FeatureNet:
    """Load the feature network from ``directory``, or train it on ``train_data`` and save it there.

    A new network is trained with the autoencoder term (``recon_weight``, default 1.0; see
    :func:`~rayflow.metrics.train_feature_net`), whose early view is the default ``fd``. A saved network is used
    as it is, whatever it was trained with; its name (``rayflow-cnn-ae/...`` or ``rayflow-cnn/...``) goes with
    every row it scores.
    """
    if directory is not None and (Path(directory) / "feature_net.safetensors").exists():
        return load_feature_net(directory).to(device)
    net = train_feature_net(train_data, steps=steps, progress=progress, device=device, recon_weight=recon_weight)
    if directory is not None:
        save_feature_net(net, directory)
    return net


#: the second feature network's architecture: another width and head size than :func:`ensure_feature_net`'s
SECOND_NET_WIDTH, SECOND_NET_FEATURE_DIM = 24, 64


def ensure_second_feature_net(train_data: Dataset, directory: str | Path, steps: int = 600, seed: int = 1,
                              progress: bool = True, device: str | torch.device = "cpu",
                              recon_weight: float = 1.0) -> FeatureNet:
    """Load the second, independently trained feature network from ``directory``, or train it and save it there.

    It differs from :func:`ensure_feature_net`'s in width (24), head (64-d) and seed, and is trained the same way
    (autoencoder term ``recon_weight``), so the ``fd_net2`` it gives checks that a ranking of methods does not
    hinge on one network (Kendall tau between ``fd`` and ``fd_net2``).
    """
    if (Path(directory) / "feature_net.safetensors").exists():
        return load_feature_net(directory).to(device)
    net = train_feature_net(train_data, steps=steps, seed=seed, progress=progress, device=device,
                            width=SECOND_NET_WIDTH, feature_dim=SECOND_NET_FEATURE_DIM, recon_weight=recon_weight)
    save_feature_net(net, directory)
    return net


@dataclass
class Scorer:
    """Scores samples of one data set against a fixed reference."""

    reference: Dataset
    feature_net: FeatureNet | None = None
    truth: torch.Tensor | None = None  # vectors: fresh samples of the true distribution
    inception: InceptionFeatures | None = None  # images: also Inception FID/KID (the [fid] extra)
    second_net: FeatureNet | None = None  # images: also fd_net2, the fd of an independently trained network
    view: str = DEFAULT_VIEW  # images: the feature view of fd/kid/fd_net2 (evaluate_images; rows say which)

    @classmethod
    def for_data(cls, spec: str, feature_net_dir: str | Path | None = None, reference_num: int = 10000,
                 seed: int = 0, feature_steps: int = 600, progress: bool = True,
                 device: str | torch.device = "cpu") -> Scorer:
        reference = load_dataset(spec, split="test")
        if reference.kind == "image":
            net = ensure_feature_net(load_dataset(spec, split="train"), feature_net_dir, feature_steps, progress,
                                     device)
            return cls(reference, feature_net=net)
        require(reference.mixture is not None,
                f"{spec}: vector data without a known distribution; compare against a held-out .npz instead")
        truth, _ = reference.sample_truth(reference_num, torch.Generator().manual_seed(seed + 99))
        return cls(reference, truth=truth)

    def score(self, x: torch.Tensor, labels: torch.Tensor | None = None,
              teacher_x: torch.Tensor | None = None) -> dict[str, Any]:
        x = torch.as_tensor(x).float()
        if self.feature_net is not None:
            use_labels = labels if (labels is not None and self.feature_net.num_classes > 0) else None
            return evaluate_images(x, self.reference, self.feature_net, labels=use_labels, teacher_samples=teacher_x,
                                   inception=self.inception, second_net=self.second_net, view=self.view,
                                   kid_subset_size=min(1000, x.shape[0], self.reference.x.shape[0]))
        return evaluate_vectors(x.reshape(x.shape[0], -1), self.truth, teacher_x)


def evaluate_npz(samples: dict[str, Any], dataset: Dataset, teacher_samples: dict[str, Any] | None = None,
                 feature_net_dir: str | Path | None = None, reference_num: int = 10000, seed: int = 0,
                 inception_fid: bool = False) -> dict:
    """What ``rayflow eval`` prints: the samples of an ``.npz`` scored against ``dataset``'s reference
    (with ``inception_fid``, also Inception FID/KID; a missing ``[fid]`` extra is a :class:`RayflowError`)."""
    inception = InceptionFeatures() if inception_fid else None  # before the feature net: fail fast
    scorer = Scorer.for_data(dataset.spec, feature_net_dir, reference_num, seed)
    require(scorer.feature_net is not None or not inception_fid,
            f"{dataset.spec}: inception-fid scores images, not vector data")
    scorer.inception = inception
    x = torch.as_tensor(samples["x"])
    labels = torch.as_tensor(samples["labels"]) if samples.get("labels") is not None else None
    teacher = torch.as_tensor(teacher_samples["x"]) if teacher_samples is not None else None
    return scorer.score(x, labels, teacher)


def compare(generators: dict[str, Any], nfes: list[int], noise: torch.Tensor, scorer: Scorer,
            labels: torch.Tensor | None = None, teacher_x: torch.Tensor | None = None,
            batch_size: int | None = None, keep: dict[tuple[str, int], torch.Tensor] | None = None,
            extra: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Score each generator within each NFE budget (at the largest NFE it can spend without exceeding it),
    from the same ``noise`` and ``labels``.

    ``generators`` maps a row name to ``(FewStepModel, sampler_or_None)``. Rows record the steps and sampler,
    the seconds per sample, and whatever ``extra[name]`` holds (e.g. the teacher NFEs a method spent).
    ``keep`` (if given) receives the samples, keyed by ``(name, nfe)``.
    """
    from rayflow.samplers import steps_for_nfe

    rows = []
    for name, (gen, sampler) in generators.items():
        done: set[int] = set()
        for budget in nfes:
            steps = steps_for_nfe(sampler, budget) if gen.method is None else budget
            nfe = gen.nfe(steps, sampler)  # Heun spends 2N-1: budgets 2, 4, 8 become 1, 3, 7
            if nfe in done or nfe > budget:
                continue
            done.add(nfe)
            t0 = time.perf_counter()
            x = gen.generate(noise, steps, cond=labels, sampler=sampler, batch_size=batch_size).float()
            seconds = time.perf_counter() - t0
            if keep is not None:
                keep[(name, nfe)] = x
            row = {"method": name, "nfe": nfe, "steps": steps, **({"sampler": sampler} if sampler else {}),
                   **scorer.score(x, labels, teacher_x), "sec_per_sample": seconds / x.shape[0],
                   **(extra or {}).get(name, {})}
            rows.append(row)
    return rows
