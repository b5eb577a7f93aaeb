"""Evaluation round trips: sample files, result tables, plots and grids, and the image/vector scorers."""

from __future__ import annotations

import json
import math
import zipfile

import numpy as np
import pytest
import torch

from rayflow.errors import RayflowError
from rayflow.evaluation import (
    EvalResult,
    evaluate_images,
    evaluate_vectors,
    format_table,
    load_samples_npz,
    make_result,
    plot_metric_vs_nfe,
    save_grid_by_method,
    save_sample_grid,
    save_samples_npz,
    scatter_2d,
    write_results,
)
from rayflow.metrics import train_feature_net

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, size: tuple[int, int] | None = None) -> None:
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 100
    with Image.open(path) as im:
        im.verify()
    if size is not None:
        with Image.open(path) as im:
            assert im.size == size


# --------------------------------------------------------------------------------------------------- sample files


def test_samples_npz_round_trip(tmp_path):
    x = torch.randn(5, 1, 8, 8)
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4])
    path = save_samples_npz(tmp_path / "s.npz", x, images=images, labels=labels)
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temp file left behind
    with np.load(path, allow_pickle=False) as raw:  # the on-disk format `rayflow sample` writes
        assert raw["x"].dtype == np.float32 and raw["images"].dtype == np.uint8 and raw["labels"].dtype == np.int64
    got = load_samples_npz(path)
    assert torch.equal(got["x"], x) and np.array_equal(got["images"], images) and torch.equal(got["labels"], labels)

    save_samples_npz(tmp_path / "v.npz", np.zeros((3, 2), dtype=np.float64))
    got = load_samples_npz(tmp_path / "v.npz")
    assert got["x"].dtype == torch.float32 and got["images"] is None and got["labels"] is None


def test_load_samples_npz_errors_name_the_file(tmp_path):
    with pytest.raises(RayflowError, match="missing.npz"):
        load_samples_npz(tmp_path / "missing.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file at all")
    with pytest.raises(RayflowError, match="garbage.npz"):
        load_samples_npz(garbage)
    good = save_samples_npz(tmp_path / "good.npz", np.zeros((4, 2), np.float32))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:-30])
    with pytest.raises(RayflowError, match="truncated.npz"):
        load_samples_npz(truncated)
    no_x = tmp_path / "no_x.npz"
    np.savez(no_x, samples=np.zeros((2, 2), np.float32))
    with pytest.raises(RayflowError, match="no array 'x'"):
        load_samples_npz(no_x)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(RayflowError, match="pickled.npz"):
        load_samples_npz(pickled)
    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros((2, 2), np.float32))
    with pytest.raises(RayflowError, match="not a .npz"):
        load_samples_npz(plain)
    bad_labels = tmp_path / "bad_labels.npz"
    np.savez(bad_labels, x=np.zeros((3, 2), np.float32), labels=np.zeros(2, np.int64))
    with pytest.raises(RayflowError, match="labels"):
        load_samples_npz(bad_labels)
    assert zipfile.is_zipfile(good)


# --------------------------------------------------------------------------------------------------- tables


def sample_rows() -> list[EvalResult]:
    return [
        EvalResult("rayflow", 4, {"fd": 12.345678, "kid": 0.0123456}, {"sampler": "euler"}),
        EvalResult("rayflow", 1, {"fd": 250.0, "kid": 0.00001234}),
        EvalResult("ddim", 2, {"fd": float("nan"), "accuracy": 0.5}),
    ]


def test_rows_and_table():
    r = make_result("proreflow", 2, {"fd": 1.5, "kid": 0.01, "feature_net": "rayflow-cnn/digits"}, wall_s=3.2)
    assert r.metrics == {"fd": 1.5, "kid": 0.01}
    assert r.extra == {"feature_net": "rayflow-cnn/digits", "wall_s": 3.2}
    assert r.to_row() == {"method": "proreflow", "nfe": 2, "fd": 1.5, "kid": 0.01,
                          "feature_net": "rayflow-cnn/digits", "wall_s": 3.2}
    with pytest.raises(ValueError):
        EvalResult("x", 1, {"fd": 1.0}, {"fd": 2.0}).to_row()

    table = format_table(sample_rows()).splitlines()
    assert table[0] == "| method | nfe | fd | kid | accuracy |"
    assert table[1] == "|---|---:|---:|---:|---:|"
    # sorted by method then NFE; extras (sampler) are not columns; missing values are a dash
    assert table[2] == "| ddim | 2 | nan | – | 0.5 |"
    assert table[3] == "| rayflow | 1 | 250 | 1.234e-05 | – |"
    assert table[4] == "| rayflow | 4 | 12.35 | 0.01235 | – |"
    # plain flat dicts (e.g. read back from results.json) format the same way
    assert format_table([r.to_row() for r in sample_rows()]).splitlines()[2:] == table[2:]


def test_write_results(tmp_path):
    js, md = write_results(sample_rows(), tmp_path / "out")
    assert js.name == "results.json" and md.name == "results.md"
    rows = json.loads(js.read_text())  # strict JSON: NaN is written as null
    assert [(r["method"], r["nfe"]) for r in rows] == [("ddim", 2), ("rayflow", 1), ("rayflow", 4)]
    assert rows[0]["fd"] is None and rows[2] == {"method": "rayflow", "nfe": 4, "fd": 12.345678,
                                                  "kid": 0.0123456, "sampler": "euler"}
    assert md.read_text() == format_table(sample_rows())
    write_results(sample_rows()[:1], tmp_path / "out", name="other")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["other.json", "other.md", "results.json",
                                                                   "results.md"]


# --------------------------------------------------------------------------------------------------- figures


def test_plot_metric_vs_nfe(tmp_path):
    rows = [EvalResult(m, n, {"fd": 10.0 / n + i}) for i, m in enumerate(["a", "b"]) for n in (1, 2, 4, 8)]
    assert_png(plot_metric_vs_nfe(rows, "fd", tmp_path / "fd.png", reference=("teacher, 50 steps", 0.5)))
    assert_png(plot_metric_vs_nfe([r.to_row() for r in rows], "fd", tmp_path / "fd2.png", title="t", reference=1.0))
    many = [EvalResult(f"m{i}", n, {"fd": 10.0 / n + i, "kid": 0.1 - i / 100}) for i in range(12) for n in (1, 2)]
    assert_png(plot_metric_vs_nfe(many, "fd", tmp_path / "fd_log.png", log_y=True))  # 12 lines, 12 colours
    assert_png(plot_metric_vs_nfe(many, "kid", tmp_path / "kid_lin.png", log_y=True))  # a negative KID: linear
    with pytest.raises(RayflowError, match="no results have metric 'kid'"):
        plot_metric_vs_nfe(rows, "kid", tmp_path / "kid.png")


def test_sample_grids(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
    # 8x8 images are enlarged 4x: 4 per row -> (4 * 9 + 1) * 4 wide, 3 rows -> (3 * 9 + 1) * 4 high
    assert_png(save_sample_grid(gray, tmp_path / "gray.png", nrow=4), size=(148, 112))
    rgb = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    assert_png(save_sample_grid(torch.from_numpy(rgb), tmp_path / "rgb.png"), size=(3 * 33 + 1, 34))
    assert_png(save_grid_by_method({"teacher (50 steps)": gray, "rayflow 1-step": gray[:5]}, tmp_path / "m.png"))
    with pytest.raises(RayflowError):
        save_sample_grid(np.zeros((2, 8, 8, 1), np.float32), tmp_path / "bad.png")


def test_scatter_2d(tmp_path):
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(300, 2, generator=g)
    samples = {"teacher": torch.randn(200, 2, generator=g), "one-step": torch.randn(200, 3, generator=g) * 2}
    assert_png(scatter_2d(samples, tmp_path / "s.png", truth=truth))
    assert_png(scatter_2d({"only": np.array([[0.0, 1.0], [1.0, 0.0], [np.nan, 1.0]])}, tmp_path / "s1.png"))
    with pytest.raises(RayflowError):
        scatter_2d({"1d": torch.zeros(5, 1)}, tmp_path / "bad.png")


# --------------------------------------------------------------------------------------------------- scoring


def two_class_dataset(n: int, seed: int):
    data = pytest.importorskip("rayflow.data")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = torch.full((n, 1, 8, 8), -0.8)
    x[labels == 0, :, :, :4] = 0.8
    x[labels == 1, :, :, 4:] = 0.8
    x = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return data.Dataset(x=x, labels=labels, num_classes=2, kind="image", spec="toy")


@pytest.fixture(scope="module")
def toy():
    train = two_class_dataset(64, 0)
    return train, train_feature_net(train, steps=40, batch_size=32, progress=False)


def test_evaluate_images(toy):
    train, net = toy
    test = two_class_dataset(60, 1)
    own = evaluate_images(test.x, test, net, labels=test.labels, teacher_samples=test.x)
    # the unbiased KID of a set against itself is slightly negative: the two "samples" are not independent
    assert own["fd"] < 1e-6 and own["kid"] <= 0 and own["kid_std"] >= 0
    assert own["accuracy"] == 1.0 and own["fidelity"] == 0.0 and own["feature_net"] == "rayflow-cnn-ae/toy"

    other = evaluate_images(two_class_dataset(60, 2).x, test, net, labels=test.labels)
    noise = evaluate_images(torch.rand(60, 1, 8, 8) * 2 - 1, test, net, labels=test.labels, teacher_samples=test.x)
    assert 0 < other["fd"] < noise["fd"] and other["kid"] < noise["kid"]
    assert noise["kid"] > 0.05 and noise["accuracy"] < 1.0
    assert noise["fidelity"] > 0.3 and "fidelity" not in other

    # the uint8 images of a samples file score exactly like the model-space tensor they were made from
    from rayflow.data import to_uint8_images

    as_uint8 = evaluate_images(to_uint8_images(test.x), test, net, labels=test.labels)
    assert as_uint8["fd"] == pytest.approx(own["fd"], abs=1e-9) and as_uint8["accuracy"] == 1.0

    with pytest.raises(RayflowError, match="expected images"):
        evaluate_images(torch.zeros(4, 3, 8, 8), test, net)
    with pytest.raises(RayflowError, match="labels"):
        evaluate_images(test.x, test, net, labels=torch.full((60,), 5))


def test_evaluate_vectors():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(400, 2, generator=g)
    same = evaluate_vectors(ref, ref, teacher_samples=ref)
    assert same["sw"] < 1e-12 and same["fidelity"] == 0.0
    fresh = evaluate_vectors(torch.randn(400, 2, generator=g), ref)
    shifted = evaluate_vectors(ref + torch.tensor([1.0, 0.0]), ref)
    assert shifted["sw"] == pytest.approx(1 / math.sqrt(2), rel=0.15)  # |v| / sqrt(d)
    assert shifted["mmd"] > 0.05 and shifted["mmd"] > 20 * abs(fresh["mmd"]) and shifted["sw"] > 3 * fresh["sw"]
    assert set(shifted) == {"sw", "mmd"}


def test_format_comparison_reads_at_a_glance():
    from rayflow.evaluation import format_comparison

    rows = [{"method": "teacher ddim-50", "nfe": 50, "fd": 1.5},
            {"method": "heun", "nfe": 2, "fd": 25.8}, {"method": "heun", "nfe": 4, "fd": 9.0},
            {"method": "reflow", "nfe": 2, "fd": 4.0}, {"method": "reflow", "nfe": 4, "fd": 3.0},
            {"method": "rayflow", "nfe": 2, "fd": 3.5}, {"method": "rayflow", "nfe": 4, "fd": 3.2},
            {"method": "broken", "nfe": 2, "fd": 2.0}]
    lines = format_comparison(rows, "fd", sort_nfe=4, names={"reflow": "2-Rectified Flow"},
                              reference="teacher ddim-50").splitlines()
    assert "lower is better" in lines[0]
    assert lines[2] == "| method | NFE 2 | NFE 4 |"
    assert lines[4] == "| teacher ddim-50 (reference, NFE 50) | 1.5 | 1.5 |"
    # sorted by NFE 4 (best first), a method without NFE 4 last; the best of each column in bold
    assert [line.split(" | ")[0][2:] for line in lines[5:]] == ["2-Rectified Flow", "rayflow", "heun", "broken"]
    assert lines[5] == "| 2-Rectified Flow | 4 | **3** |" and lines[8] == "| broken | **2** | – |"
    acc = [{"method": "a", "nfe": 1, "accuracy": 0.5}, {"method": "b", "nfe": 1, "accuracy": 0.9}]
    higher = format_comparison(acc, "accuracy", sort_nfe=1).splitlines()
    assert "higher is better" in higher[0] and higher[4] == "| b | **0.9** |"
