"""Metrics against closed forms and brute force; the feature network's training, saving and loading."""

from __future__ import annotations

import json
import math
import os
import time
from types import SimpleNamespace

import pytest
import torch

from rayflow.errors import RayflowError
from rayflow.metrics import (
    FEATURE_NET_CONFIG,
    FEATURE_NET_WEIGHTS,
    FeatureNet,
    classifier_accuracy,
    extract_features,
    frechet_distance,
    kernel_distance,
    load_feature_net,
    mean_pairwise_distance,
    mmd_rbf,
    save_feature_net,
    sliced_wasserstein,
    train_feature_net,
)


def exact_gaussian_sample(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``n`` points whose sample mean and unbiased sample covariance are *exactly* ``mean`` and ``cov``."""
    z = torch.randn(n, mean.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(z.T @ z / (n - 1))
    white = torch.linalg.solve_triangular(chol, z.T, upper=False).T  # sample covariance exactly I
    return mean + white @ torch.linalg.cholesky(cov).T


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def rotation(theta: float) -> torch.Tensor:
    return torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64)


# --------------------------------------------------------------------------------------------------- Fréchet


def test_frechet_diagonal_closed_form():
    # Diagonal covariances commute: FD = ||mu_a - mu_b||^2 + sum_i (sigma_a,i - sigma_b,i)^2.
    mu_a, mu_b = vec(0.0, 1.0, -2.0), vec(1.0, 1.0, 0.5)
    sd_a, sd_b = vec(1.0, 2.0, 0.5), vec(3.0, 0.5, 0.5)
    a = exact_gaussian_sample(400, mu_a, torch.diag(sd_a**2), seed=1)
    b = exact_gaussian_sample(500, mu_b, torch.diag(sd_b**2), seed=2)
    expected = float((mu_a - mu_b).square().sum() + (sd_a - sd_b).square().sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


def test_frechet_nondiagonal_closed_forms():
    # Shared eigenvectors: Tr((S_a S_b)^1/2) = sum sqrt(l_a l_b), so FD = |dmu|^2 + sum (sqrt l_a - sqrt l_b)^2.
    q = rotation(0.7)
    la, lb = vec(4.0, 0.25), vec(1.0, 2.0)
    mu_a, mu_b = vec(0.5, -1.0), vec(0.0, 0.0)
    a = exact_gaussian_sample(300, mu_a, q @ torch.diag(la) @ q.T, seed=3)
    b = exact_gaussian_sample(300, mu_b, q @ torch.diag(lb) @ q.T, seed=4)
    expected = float((mu_a - mu_b).square().sum() + (la.sqrt() - lb.sqrt()).square().sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)

    # Non-commuting 2x2: for a 2x2 matrix M with real non-negative eigenvalues, Tr(M^1/2) = sqrt(Tr M + 2 sqrt(det M)).
    cov_a = rotation(0.3) @ torch.diag(vec(3.0, 0.2)) @ rotation(0.3).T
    cov_b = rotation(-1.1) @ torch.diag(vec(0.5, 2.0)) @ rotation(-1.1).T
    a = exact_gaussian_sample(300, mu_a, cov_a, seed=5)
    b = exact_gaussian_sample(300, mu_b, cov_b, seed=6)
    m = cov_a @ cov_b
    tr_sqrt = math.sqrt(float(m.trace()) + 2 * math.sqrt(float(torch.linalg.det(m))))
    expected = float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace()) - 2 * tr_sqrt
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_self_is_zero_and_bad_inputs():
    x = torch.randn(200, 32, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(x, x)) < 1e-8
    # rank-deficient covariances (N < d) are where a naive sqrtm goes complex; the eigen route stays real and >= 0
    y = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))
    assert 0 <= frechet_distance(y, y) < 1e-8
    assert math.isnan(frechet_distance(torch.full((5, 3), float("nan")), x[:, :3]))
    with pytest.raises(RayflowError):
        frechet_distance(x, x[:, :5])
    with pytest.raises(RayflowError):
        frechet_distance(x[:1], x)


# --------------------------------------------------------------------------------------------------- KID


def brute_mmd2(a: torch.Tensor, b: torch.Tensor, k) -> float:
    m, n = len(a), len(b)
    kaa = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kbb = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kab = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return float(kaa + kbb - 2 * kab)


def test_kid_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 3, generator=g, dtype=torch.float64)
    b = torch.randn(6, 3, generator=g, dtype=torch.float64) + 0.5
    cubic = lambda x, y: (x @ y / 3 + 1) ** 3  # noqa: E731
    # one subset of the full size is a permutation of both sets, which the estimator is invariant to
    mean, std = kernel_distance(a, b, num_subsets=1, subset_size=6)
    assert mean == pytest.approx(brute_mmd2(a, b, cubic), rel=1e-10)
    assert std == 0.0


def test_kid_same_vs_shifted_distribution():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1500, 16, generator=g), torch.randn(1500, 16, generator=g)
    same, same_std = kernel_distance(a, b, num_subsets=10, subset_size=500)
    shifted, _ = kernel_distance(a, b + 0.5, num_subsets=10, subset_size=500)
    assert abs(same) < 0.01 and same_std > 0
    assert shifted > 0.1 and shifted > 20 * abs(same)
    # no generator: a fixed seed, so the same call gives the same number
    assert kernel_distance(a, b, 5, 200) == kernel_distance(a, b, 5, 200)
    # subsets larger than the data are clipped to it
    assert math.isfinite(kernel_distance(a[:50], b[:80], 3, 1000)[0])


# --------------------------------------------------------------------------------------------------- sliced W2


def gaussian_quantiles(n: int, mean: float, std: float) -> torch.Tensor:
    """A deterministic 'sample' of N(mean, std^2): its quantiles at the midpoints (i + 1/2) / n."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return (mean + std * torch.special.ndtri(u))[:, None]


@pytest.mark.parametrize("n_a,n_b", [(4000, 4000), (3000, 4000)])
def test_sliced_wasserstein_1d_gaussian_closed_form(n_a, n_b):
    # In d = 1 every direction is +-1, so SW2 = W2 = sqrt((m1 - m2)^2 + (s1 - s2)^2).
    a, b = gaussian_quantiles(n_a, 1.0, 2.0), gaussian_quantiles(n_b, -0.5, 0.5)
    expected = math.sqrt(1.5**2 + 1.5**2)
    assert sliced_wasserstein(a, b, num_projections=4) == pytest.approx(expected, rel=5e-3)


def test_sliced_wasserstein_unequal_counts_exact():
    # Quantile functions {0,1} (steps at 1/2) and {0,1,2} (steps at 1/3, 2/3) differ by 1 on [1/3,1/2) and
    # [2/3,1): W2^2 = 1/6 + 1/3 = 1/2.
    a = torch.tensor([[1.0], [0.0]])
    b = torch.tensor([[2.0], [0.0], [1.0]])
    assert sliced_wasserstein(a, b, num_projections=3) == pytest.approx(math.sqrt(0.5), rel=1e-12)
    assert sliced_wasserstein(b, a, num_projections=3) == pytest.approx(math.sqrt(0.5), rel=1e-12)
    # duplicating every point leaves the empirical measure, hence the distance, unchanged
    assert sliced_wasserstein(torch.cat([a, a]), b, num_projections=3) == pytest.approx(math.sqrt(0.5), rel=1e-12)


def test_sliced_wasserstein_identical_and_translated():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=g, dtype=torch.float64)
    assert sliced_wasserstein(x, x[torch.randperm(500, generator=g)]) < 1e-12
    # translation by v: each projection shifts by theta.v, so SW2^2 = E (theta.v)^2 = |v|^2 / d
    v = vec(3.0, -1.0, 0.5, 2.0)
    sw = sliced_wasserstein(x, x + v, num_projections=4096)
    assert sw == pytest.approx(float(v.norm()) / 2.0, rel=0.03)  # Monte-Carlo over directions: ~0.8% std


# --------------------------------------------------------------------------------------------------- MMD, fidelity


def test_mmd_rbf_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(7, 2, generator=g, dtype=torch.float64)
    b = torch.randn(5, 2, generator=g, dtype=torch.float64) + 1.0
    bws = (0.5, 1.0, 2.0)
    rbf = lambda x, y: sum(math.exp(-float((x - y).square().sum()) / (2 * 2 * h * h)) for h in bws)  # noqa: E731
    assert mmd_rbf(a, b, bws) == pytest.approx(brute_mmd2(a, b, rbf), rel=1e-10)


def test_mmd_rbf_gaussian_closed_form_and_null():
    # For x ~ N(mu_x, s_x^2 I), y ~ N(mu_y, s_y^2 I) in d dims and k = exp(-|x-y|^2 / (2 l^2)), with our
    # convention l^2 = d h^2: E k(x, y) = (l^2 / (l^2 + s_x^2 + s_y^2))^(d/2) exp(-|mu_x - mu_y|^2 / (2 (l^2 + ..)))
    # In d = 8 the convention matters: without the factor d the expected value would be about half this one.
    d, s_a, s_b = 8, 0.5, 0.8

    def ek(sx: float, sy: float, dmu2: float, h: float) -> float:
        v = d * h * h + sx**2 + sy**2
        return (d * h * h / v) ** (d / 2) * math.exp(-dmu2 / (2 * v))

    bws = (0.5, 1.0)
    expected = sum(ek(s_a, s_a, 0, h) + ek(s_b, s_b, 0, h) - 2 * ek(s_a, s_b, 1.0, h) for h in bws)
    g = torch.Generator().manual_seed(3)
    shift = torch.zeros(d, dtype=torch.float64)
    shift[0] = 1.0
    a = s_a * torch.randn(1500, d, generator=g, dtype=torch.float64)
    b = shift + s_b * torch.randn(1500, d, generator=g, dtype=torch.float64)
    assert mmd_rbf(a, b, bws) == pytest.approx(expected, rel=0.15)
    same = mmd_rbf(a, s_a * torch.randn(1500, d, generator=g, dtype=torch.float64), bws)
    assert abs(same) < 0.05 * expected


def test_mmd_chunks_agree_with_single_block(monkeypatch):
    import rayflow.metrics.distances as m

    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(50, 3, generator=g), torch.randn(40, 3, generator=g)
    whole = mmd_rbf(a, b)
    monkeypatch.setattr(m, "_KERNEL_CHUNK", 7 * 40)  # 7 rows of 40 columns at a time
    assert mmd_rbf(a, b) == pytest.approx(whole, rel=1e-12, abs=1e-15)


def test_mean_pairwise_distance():
    a = torch.zeros(3, 4)
    b = torch.tensor([[2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    # per-sample RMS distances: 2, 0, 4 / 2 = 2 -> mean 4 / 3
    assert mean_pairwise_distance(a, b) == pytest.approx(4 / 3)
    assert mean_pairwise_distance(a.reshape(3, 1, 2, 2), b.reshape(3, 1, 2, 2)) == pytest.approx(4 / 3)
    with pytest.raises(RayflowError):
        mean_pairwise_distance(a, b[:2])


# --------------------------------------------------------------------------------------------------- FeatureNet


def two_class_images(n: int, seed: int) -> SimpleNamespace:
    """8x8 images: class 0 bright on the left, class 1 bright on the right, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = torch.full((n, 1, 8, 8), -0.8)
    x[labels == 0, :, :, :4] = 0.8
    x[labels == 1, :, :, 4:] = 0.8
    x = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return SimpleNamespace(x=x, labels=labels, num_classes=2, kind="image", spec="toy:two-halves")


@pytest.fixture(scope="module")
def toy_net() -> FeatureNet:
    return train_feature_net(two_class_images(64, 0), steps=40, batch_size=32, seed=0, progress=False)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 8, 16)])
def test_feature_net_shapes(shape):
    net = FeatureNet(shape, num_classes=10)
    x = torch.zeros(2, *shape)
    assert net.features(x).shape == (2, 128)
    assert net(x).shape == (2, 10)


def test_feature_net_rejects_small_inputs():
    with pytest.raises(RayflowError):
        FeatureNet((1, 4, 8), num_classes=10)
    net = FeatureNet((1, 8, 8), num_classes=2)
    with pytest.raises(RayflowError, match="expects images"):
        extract_features(net, torch.zeros(2, 3, 8, 8))


def test_train_feature_net_learns_and_is_deterministic(toy_net):
    test = two_class_images(40, 1)
    assert classifier_accuracy(toy_net, test.x, test.labels) >= 0.95
    assert toy_net.name == "rayflow-cnn-ae/toy:two-halves" and toy_net.data_spec == "toy:two-halves"
    state = torch.random.get_rng_state()
    again = train_feature_net(two_class_images(64, 0), steps=40, batch_size=32, seed=0, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    for p, q in zip(toy_net.parameters(), again.parameters()):
        assert torch.equal(p, q)


def test_feature_net_save_load_round_trip(toy_net, tmp_path):
    save_feature_net(toy_net, tmp_path / "net")
    assert sorted(p.name for p in (tmp_path / "net").iterdir()) == [FEATURE_NET_CONFIG, FEATURE_NET_WEIGHTS]
    cfg = json.loads((tmp_path / "net" / FEATURE_NET_CONFIG).read_text())
    assert cfg["input_shape"] == [1, 8, 8] and cfg["num_classes"] == 2
    assert cfg["name"] == "rayflow-cnn-ae/toy:two-halves" and cfg["data_spec"] == "toy:two-halves"
    loaded = load_feature_net(tmp_path / "net")
    x = two_class_images(16, 2).x
    assert torch.equal(extract_features(loaded, x), extract_features(toy_net, x))
    assert loaded.name == toy_net.name and not loaded.training
    save_feature_net(toy_net, tmp_path / "net")  # overwriting in place works and leaves no temp files behind
    assert len(list((tmp_path / "net").iterdir())) == 2


def test_load_feature_net_errors_name_the_file(toy_net, tmp_path):
    d = tmp_path / "net"
    with pytest.raises(RayflowError, match=FEATURE_NET_CONFIG):
        load_feature_net(d)
    save_feature_net(toy_net, d)
    weights = d / FEATURE_NET_WEIGHTS
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(RayflowError, match=FEATURE_NET_WEIGHTS):
        load_feature_net(d)
    weights.write_bytes(b"\x00" * 64)  # garbage
    with pytest.raises(RayflowError, match=FEATURE_NET_WEIGHTS):
        load_feature_net(d)
    weights.unlink()
    with pytest.raises(RayflowError, match=FEATURE_NET_WEIGHTS):
        load_feature_net(d)

    weights.write_bytes(good)
    cfg_path = d / FEATURE_NET_CONFIG
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "num_classes": 10}))  # weights no longer fit the config
    with pytest.raises(RayflowError, match="do not match"):
        load_feature_net(d)
    cfg_path.write_text("{not json")
    with pytest.raises(RayflowError, match=FEATURE_NET_CONFIG):
        load_feature_net(d)


@pytest.mark.slow
def test_feature_net_digits_accuracy():
    data = pytest.importorskip("rayflow.data")
    train, test = data.load_dataset("digits", "train"), data.load_dataset("digits", "test")
    start = time.perf_counter()
    net = train_feature_net(train, seed=0, progress=False)
    elapsed = time.perf_counter() - start
    accuracy = classifier_accuracy(net, test.x, test.labels)
    assert accuracy > 0.9, accuracy
    # The time budget is only meaningful on an otherwise idle machine: torch threads competing with other
    # processes for 2 cores slow training by an order of magnitude.
    if os.getloadavg()[0] < (os.cpu_count() or 1):
        assert elapsed < 30, elapsed
    assert net.name == "rayflow-cnn-ae/digits"
