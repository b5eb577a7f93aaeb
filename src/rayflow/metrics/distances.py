"""The distances between two sample sets: Fréchet distance, KID, sliced Wasserstein, RBF MMD, paired fidelity,
Kendall's tau, and FD/KID through torchmetrics.

Every distance is a pure function of two sample sets (tensors ``[N, ...]``, flattened to ``[N, d]``) and is
computed in float64, because the quantities involved (traces of covariance square roots, unbiased MMD sums)
are differences of large, nearly equal numbers. Random parts (KID subsets, sliced-Wasserstein directions)
take a ``torch.Generator``; without one they use a fixed seed, so re-running an evaluation gives the same
number and two methods evaluated in one run are measured with the same yardstick.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from rayflow.errors import require

#: RBF bandwidths of :func:`mmd_rbf`, in units of the per-coordinate RMS distance (see there).
DEFAULT_RBF_BANDWIDTHS: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# Kernel-matrix entries built at once (float64): 2^22 of them is 32 MiB per temporary, whatever N is.
_KERNEL_CHUNK = 1 << 22


# --------------------------------------------------------------------------------------------------- helpers


def _flat64(x: torch.Tensor, name: str = "samples") -> torch.Tensor:
    """``x`` as a float64 CPU matrix ``[N, d]`` (images and other shapes are flattened per sample)."""
    x = torch.as_tensor(x)
    require(x.ndim >= 1 and x.shape[0] > 0, f"{name}: need at least one sample, got shape {tuple(x.shape)}")
    return x.detach().to("cpu", torch.float64).reshape(x.shape[0], -1)


def _pair(a: torch.Tensor, b: torch.Tensor, min_n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sample sets flattened to float64, checking they live in the same space and are large enough."""
    a, b = _flat64(a, "first sample set"), _flat64(b, "second sample set")
    require(a.shape[1] == b.shape[1], f"sample sets have different dimensions: {a.shape[1]} vs {b.shape[1]}")
    require(min(a.shape[0], b.shape[0]) >= min_n,
            f"need at least {min_n} samples per set, got {a.shape[0]} and {b.shape[0]}")
    return a, b


def _default_generator(generator: torch.Generator | None) -> torch.Generator:
    # A fixed seed, not the global RNG: a metric must not depend on what ran before it.
    return generator if generator is not None else torch.Generator().manual_seed(0)


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                exclude_diagonal: bool) -> float:
    """``sum_{i,j} k(a_i, b_j)``, leaving out ``i == j`` when asked (then ``a`` is ``b``); built in row chunks."""
    rows = max(1, _KERNEL_CHUNK // b.shape[0])
    total = 0.0
    for start in range(0, a.shape[0], rows):
        block = kernel(a[start:start + rows], b)
        total += float(block.sum())
        if exclude_diagonal:
            total -= float(block[:, start:start + rows].diagonal().sum())
    return total


def _unbiased_mmd2(a: torch.Tensor, b: torch.Tensor,
                   kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
    """``sum_{i!=j} k(a_i,a_j)/(m(m-1)) + sum_{i!=j} k(b_i,b_j)/(n(n-1)) - 2 sum_{i,j} k(a_i,b_j)/(mn)``."""
    m, n = a.shape[0], b.shape[0]
    kaa = _kernel_sum(a, a, kernel, exclude_diagonal=True) / (m * (m - 1))
    kbb = _kernel_sum(b, b, kernel, exclude_diagonal=True) / (n * (n - 1))
    kab = _kernel_sum(a, b, kernel, exclude_diagonal=False) / (m * n)
    return kaa + kbb - 2.0 * kab



# --------------------------------------------------------------------------------------------------- distances


def _mean_cov(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a PSD matrix; eigenvalues that round-off made slightly negative count as 0."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

    ``FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` with sample means ``mu`` and unbiased
    covariances ``S``. ``S_a S_b`` is not symmetric, so the trace of its square root is computed as
    ``Tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}) = sum_i sqrt(lambda_i)`` over the eigenvalues of that symmetric PSD
    matrix (same eigenvalues as ``S_a S_b``), clamping round-off negatives to 0 - no complex ``sqrtm`` needed.
    The estimate is biased upwards for finite ``N``: compare methods at equal sample counts.
    Non-finite features (a diverged sampler) give ``nan`` rather than an exception.
    """
    a, b = _pair(feats_a, feats_b, min_n=2)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    mu_a, cov_a = _mean_cov(a)
    mu_b, cov_b = _mean_cov(b)
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2.0 * tr_sqrt
    return max(float(fd), 0.0)  # tiny negatives are round-off; FD >= 0 by construction


class FrechetStats:
    """Mean, covariance, its square root and its trace of one feature set (a fixed reference), computed once for
    scoring many sample sets against it with the formula of :func:`frechet_distance`.

    Works on the device and in the dtype of ``ref_feats`` (give float64: FD is a difference of large, nearly
    equal numbers), so a GPU can do the eigen-decompositions of a validation suite's many rows.
    """

    def __init__(self, ref_feats: torch.Tensor) -> None:
        b = torch.as_tensor(ref_feats)
        require(b.ndim == 2 and b.shape[0] >= 2, f"reference features: need [N >= 2, d], got {list(b.shape)}")
        self.dim = b.shape[1]
        self.mu, self.cov = _mean_cov(b)
        self.root = _psd_sqrt(self.cov)
        self.trace = self.cov.trace()

    def distance(self, feats: torch.Tensor) -> float:
        """:func:`frechet_distance` of ``feats [N, d]`` against the reference (``nan`` for non-finite features)."""
        a = torch.as_tensor(feats).to(self.mu.device, self.mu.dtype)
        require(a.ndim == 2 and a.shape[0] >= 2 and a.shape[1] == self.dim,
                f"features: need [N >= 2, {self.dim}], got {list(a.shape)}")
        if not bool(torch.isfinite(a).all()):
            return float("nan")
        mu, cov = _mean_cov(a)
        middle = self.root @ cov @ self.root
        tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
        return max(float((mu - self.mu).square().sum() + cov.trace() + self.trace - 2.0 * tr_sqrt), 0.0)


def _cubic_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def kernel_distance(
    feats_a: torch.Tensor, feats_b: torch.Tensor, num_subsets: int = 10, subset_size: int = 1000,
    generator: torch.Generator | None = None, device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """Kernel (Inception) distance, KID: ``(mean, std)`` of the unbiased MMD² over random subsets.

    Kernel ``k(x, y) = (x^T y / d + 1)^3``. For each of ``num_subsets`` subsets of ``m = min(subset_size,
    N_a, N_b)`` samples drawn without replacement from each set::

        MMD² = sum_{i!=j} k(a_i,a_j)/(m(m-1)) + sum_{i!=j} k(b_i,b_j)/(m(m-1)) - 2 sum_{i,j} k(a_i,b_j)/m²

    which is unbiased, so it is ~0 (and may be slightly negative) for two independent samples of one distribution
    at any ``N``. Scoring a set against *itself* gives a negative value (the diagonal is excluded on one side only).
    ``std`` is the spread across subsets (0 for a single subset). The kernel sums run in float64 on ``device``.
    """
    require(num_subsets >= 1, f"KID: num_subsets must be >= 1, got {num_subsets}")
    require(subset_size >= 2, f"KID: subset_size must be >= 2, got {subset_size}")
    a, b = (t.to(device) for t in _pair(feats_a, feats_b, min_n=2))
    g = _default_generator(generator)
    m = min(subset_size, a.shape[0], b.shape[0])
    values = torch.tensor([
        _unbiased_mmd2(a[torch.randperm(a.shape[0], generator=g)[:m]], b[torch.randperm(b.shape[0], generator=g)[:m]],
                       _cubic_kernel)
        for _ in range(num_subsets)
    ], dtype=torch.float64)
    std = float(values.std()) if num_subsets > 1 else 0.0
    return float(values.mean()), std


def _w2_squared_sorted(pa: torch.Tensor, pb: torch.Tensor) -> torch.Tensor:
    """Exact 1-D ``W2²`` between empirical measures, per column of sorted projections ``[N_a, P]``, ``[N_b, P]``.

    ``W2² = int_0^1 (F_a^{-1}(u) - F_b^{-1}(u))^2 du`` with step quantile functions: on the common refinement
    of the breakpoints ``{i/N_a} ∪ {j/N_b}`` both are constant, so the integral is a finite weighted sum.
    Breakpoints are exact integers on the grid ``1/(N_a N_b)``, so no floating-point ties are created.
    With ``N_a == N_b`` this is the usual ``mean_i (a_(i) - b_(i))^2``.
    """
    na, nb = pa.shape[0], pb.shape[0]
    if na == nb:
        return (pa - pb).square().mean(0)
    ends = torch.cat([torch.arange(1, na + 1) * nb, torch.arange(1, nb + 1) * na]).unique()  # sorted, in 1/(na nb)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    # The quantile index of each interval is that of its midpoint: floor(u * N) with u = (start + end) / (2 na nb).
    ia = ((starts + ends) // (2 * nb)).clamp(max=na - 1)
    ib = ((starts + ends) // (2 * na)).clamp(max=nb - 1)
    widths = (ends - starts).to(torch.float64) / (na * nb)
    return (widths[:, None] * (pa[ia] - pb[ib]).square()).sum(0)


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, num_projections: int = 256, generator: torch.Generator | None = None
) -> float:
    """Sliced 2-Wasserstein distance ``SW2 = ( E_theta W2²(theta^T a, theta^T b) )^{1/2}``.

    The expectation over directions ``theta`` uniform on the unit sphere is a Monte-Carlo mean over
    ``num_projections`` directions (normalised Gaussians); each 1-D ``W2²`` is exact, from sorted projections
    (unequal sample counts handled exactly via the quantile functions, see :func:`_w2_squared_sorted`).
    Reference values: in ``d = 1``, ``W2²(N(m1,s1²), N(m2,s2²)) = (m1-m2)² + (s1-s2)²``; a translation by
    ``v`` in ``d`` dimensions gives ``SW2 = ||v|| / sqrt(d)``, since ``E (theta^T v)² = ||v||² / d``.
    """
    require(num_projections >= 1, f"sliced Wasserstein: num_projections must be >= 1, got {num_projections}")
    a, b = _pair(a, b)
    g = _default_generator(generator)
    theta = torch.randn(num_projections, a.shape[1], generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=1, keepdim=True)
    pa, pb = (a @ theta.T).sort(0).values, (b @ theta.T).sort(0).values
    return float(_w2_squared_sorted(pa, pb).mean().sqrt())


def mmd_rbf(a: torch.Tensor, b: torch.Tensor, bandwidths: Sequence[float] = DEFAULT_RBF_BANDWIDTHS) -> float:
    """Unbiased MMD² with a sum of Gaussian (RBF) kernels.

    ``k(x, y) = sum_h exp(-||x - y||² / (2 d h²))`` - the bandwidths ``h`` are **absolute**, in units of the
    per-coordinate RMS distance ``||x - y|| / sqrt(d)``. Absolute rather than the median heuristic because a
    median-based bandwidth is re-fitted to every sample set, so two methods would be scored with different
    kernels; dividing by ``d`` keeps one set of bandwidths meaningful from 2-D to high-dimensional data of
    roughly unit per-coordinate scale (rayflow's data convention). The default ``0.1 .. 5`` spans the mode width
    of the Gaussian-mixture benchmarks up to their overall extent. Estimator as in :func:`kernel_distance`
    (``~0`` for equal distributions, may be slightly negative).
    """
    require(len(bandwidths) > 0 and all(h > 0 for h in bandwidths), f"MMD: bandwidths must be > 0, got {bandwidths}")
    a, b = _pair(a, b, min_n=2)
    d = a.shape[1]
    inv_two_h2 = torch.tensor([1.0 / (2.0 * d * h * h) for h in bandwidths], dtype=torch.float64)
    # O(N^2) kernel evaluations per bandwidth: a few seconds at N = 10^4 on a CPU.

    def kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sq = (x.square().sum(1, keepdim=True) + y.square().sum(1) - 2.0 * x @ y.T).clamp(min=0)
        return sum(torch.exp(-sq * c) for c in inv_two_h2.tolist())

    return _unbiased_mmd2(a, b, kernel)


def mean_pairwise_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fidelity to the teacher: ``(1/N) sum_i ||a_i - b_i|| / sqrt(d)``, the mean per-sample RMS distance.

    ``a_i`` is a few-step sample and ``b_i`` the teacher's many-step sample from the *same* initial noise, so
    this measures how well a distilled sampler reproduces the teacher's noise-to-data map, not just its
    distribution. Dividing by ``sqrt(d)`` makes it a per-pixel/per-coordinate RMS, comparable across sizes.
    """
    a, b = _flat64(a, "samples"), _flat64(b, "teacher samples")
    require(a.shape == b.shape,
            f"fidelity needs paired samples of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float(((a - b).norm(dim=1) / math.sqrt(a.shape[1])).mean())


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's rank correlation tau-b of two paired score lists (how alike two metrics rank the same rows).

    ``tau_b = (C - D) / sqrt((C + D + T_a) (C + D + T_b))`` over all pairs ``i < j``: ``C`` concordant, ``D``
    discordant, ``T_a`` / ``T_b`` tied in only ``a`` / only ``b``. 1 = the same order, -1 = reversed.
    """
    x, y = torch.as_tensor(list(a), dtype=torch.float64), torch.as_tensor(list(b), dtype=torch.float64)
    require(x.shape == y.shape and x.numel() >= 2, f"Kendall tau needs two paired lists of >= 2 values, got "
                                                   f"{x.numel()} and {y.numel()}")
    i, j = torch.triu_indices(x.numel(), x.numel(), offset=1)
    sx, sy = torch.sign(x[i] - x[j]), torch.sign(y[i] - y[j])
    concordant_minus_discordant = float((sx * sy).sum())
    nx, ny = float((sx != 0).sum()), float((sy != 0).sum())  # pairs not tied in a (in b)
    return concordant_minus_discordant / math.sqrt(nx * ny) if nx > 0 and ny > 0 else float("nan")



# --------------------------------------------------------------------------------------------------- torchmetrics


class _Precomputed(nn.Module):
    """The identity on feature vectors, as torchmetrics' ``feature`` extractor.

    rayflow extracts features itself (batched, on the network's device, reference features computed once) and
    hands them to torchmetrics' FID and KID, so the network runs once per image for both metrics.
    ``num_features`` spares torchmetrics its probe with a dummy 299x299 image.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fd_kid_torchmetrics(
    feats: torch.Tensor, ref_feats: torch.Tensor, kid_subsets: int = 10, kid_subset_size: int = 1000, seed: int = 0,
) -> tuple[float, float, float]:
    """``(FD, KID mean, KID std)`` of two feature sets through torchmetrics' ``FrechetInceptionDistance`` and
    ``KernelInceptionDistance`` (``feature=`` a custom module), in float64.

    Same formulas as :func:`frechet_distance` and :func:`kernel_distance` (kernel ``(x^T y / d + 1)^3``,
    unbiased MMD² over ``kid_subsets`` random subsets of ``m = min(kid_subset_size, N_a, N_b)``); the subsets
    are drawn under a forked global RNG seeded with ``seed`` (torchmetrics draws them from the global RNG), so
    the number does not depend on what ran before. Non-finite features give ``nan``. ``kid_subsets=0`` skips
    KID (its two numbers are ``nan``): the FD alone of a secondary view costs no kernel sums.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    a, b = _pair(feats, ref_feats, min_n=2)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan"), float("nan"), float("nan")
    require(kid_subsets >= 0 and kid_subset_size >= 2,
            f"KID: need subsets >= 0 and subset size >= 2, got {kid_subsets}, {kid_subset_size}")
    extractor = _Precomputed(a.shape[1])
    fid = FrechetInceptionDistance(feature=extractor, reset_real_features=False).set_dtype(torch.float64)
    fid.update(b, real=True)
    fid.update(a, real=False)
    fd = max(float(fid.compute()), 0.0)  # tiny negatives are round-off
    if kid_subsets == 0:
        return fd, float("nan"), float("nan")
    m = min(kid_subset_size, a.shape[0], b.shape[0])
    kid = KernelInceptionDistance(feature=extractor, subsets=kid_subsets, subset_size=m).set_dtype(torch.float64)
    kid.update(b, real=True)
    kid.update(a, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return fd, float(kid_mean), float(kid_std) if kid_subsets > 1 else 0.0
