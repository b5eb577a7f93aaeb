"""Datasets: every loader on tiny files built in tmp_path, and every kind of bad input as a RayflowError."""

from __future__ import annotations

import gzip
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rayflow.data import (
    DATASET_NAMES,
    DEFAULT_DATA,
    Dataset,
    load_dataset,
    parse_spec,
    to_uint8_images,
)
from rayflow.errors import RayflowError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ---------------------------------------------------------------------- helpers
def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    magic = (0x08 << 8 | arr.ndim) if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = False, magic: int | None = None) -> Path:
    data = idx_bytes(arr, magic)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_mnist_dir(root: Path, gz: bool, n_train: int = 7, n_test: int = 3, hw: int = 28) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, hw, hw), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
        arrays[prefix] = (images, labels)
    return arrays


def raises_naming(match: str):
    return pytest.raises(RayflowError, match=match)


# ---------------------------------------------------------------------- parse_spec
def test_parse_spec_grammar():
    assert parse_spec("mog:dim=8,modes=6") == ("mog", {"dim": "8", "modes": "6"})
    assert parse_spec("digits") == ("digits", {})
    assert parse_spec("  MOG : Dim = 8 , modes=6 ") == ("mog", {"dim": "8", "modes": "6"})
    # values keep case and may contain ':' and '=' (Windows paths, odd file names)
    assert parse_spec("npy:path=C:/Data/x=1.npz") == ("npy", {"path": "C:/Data/x=1.npz"})


@pytest.mark.parametrize(
    "spec, match",
    [
        ("", "empty data spec"),
        ("   ", "empty data spec"),
        (":dim=2", "no dataset name"),
        ("mog:", "nothing after ':'"),
        ("mog:dim", "not of the form key=value"),
        ("mog:dim=2,,modes=3", "empty option"),
        ("mog:dim=2,", "empty option"),
        ("mog:=2", "has no key"),
        ("mog:dim=", "'dim' has an empty value"),
        ("mog:dim=2,DIM=3", "'dim' is given twice"),
    ],
)
def test_parse_spec_rejects(spec, match):
    with raises_naming(match):
        parse_spec(spec)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(RayflowError) as info:
        load_dataset("cifar:path=x")
    assert "'cifar'" in str(info.value)
    assert all(name in str(info.value) for name in DATASET_NAMES)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("digits:foo=1", "digits: unknown option 'foo'; valid options: limit, pad, split"),
        ("digits:split=val", "split must be one of train|test"),
        ("digits:limit=0", "limit must be >= 1"),
        ("digits:limit=ten", "limit must be an integer, got 'ten'"),
        ("digits:pad=4", "pad=4 is smaller than the 8x8 images"),
        ("digits:pad=x", "pad must be an integer"),
        ("mog:std=0", "mog: std must be > 0"),
        ("mog:std=-1", "mog: std must be > 0"),
        ("mog:std=abc", "mog: std must be a number, got 'abc'"),
        ("mog:std=nan", "std must be finite"),
        ("mog:dim=0", "dim must be >= 1"),
        ("mog:modes=2.5", "modes must be an integer"),
        ("mog:layout=hex", "layout must be one of ring|random"),
        ("mog:layout=ring,dim=3", "layout=ring needs dim=2"),
        ("mog:conditional=maybe", "conditional must be one of"),
        ("mog:seed=-1", "seed must be >= 0"),
        ("mog:scale=0", "scale must be > 0"),
        ("idx:labels=x", "idx: missing option images="),
        ("folder:size=8", "folder: missing option path="),
        ("npy:pad=8", "npy: missing option path="),
    ],
)
def test_bad_options(spec, match):
    with raises_naming(match):
        load_dataset(spec)


def test_bad_split_argument():
    with raises_naming("unknown split 'val'"):
        load_dataset("digits", split="val")


# ---------------------------------------------------------------------- digits
def test_digits_default():
    assert DEFAULT_DATA == "digits"
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert isinstance(train, Dataset)
    assert train.x.shape == (1500, 1, 8, 8) and test.x.shape == (297, 1, 8, 8)
    assert train.x.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert train.sample_shape == (1, 8, 8) and len(train) == 1500
    assert train.kind == "image" and train.num_classes == 10 and train.spec == "digits"
    for d in (train, test):
        assert float(d.x.min()) == -1.0 and float(d.x.max()) == 1.0
        # pixels 0..16 map to multiples of 1/8
        assert torch.equal(d.x * 8, (d.x * 8).round())
    assert set(train.labels.tolist()) == set(range(10))
    # train and test partition the 1797 images: together they are exactly scikit-learn's set, each image once
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = (bunch.images / 8 - 1).reshape(1797, 64).tolist()
    full = sorted(tuple(r) + (int(y),) for r, y in zip(pixels, bunch.target))
    both = torch.cat([train.x, test.x]).flatten(1).double().tolist()
    assert sorted(tuple(r) + (int(y),) for r, y in zip(both, torch.cat([train.labels, test.labels]))) == full
    # deterministic, and the spec's split option wins over the argument
    again = load_dataset("digits:split=test", split="train")
    assert torch.equal(again.x, test.x) and torch.equal(again.labels, test.labels)
    assert again.spec == "digits:split=test"


def test_digits_limit_and_pad():
    d = load_dataset("digits:limit=5,pad=16")
    assert d.x.shape == (5, 1, 16, 16)
    full = load_dataset("digits")
    assert torch.equal(d.x[:, :, 4:12, 4:12], full.x[:5])
    assert torch.equal(d.labels, full.labels[:5])
    assert load_dataset("digits:pad=pow2").x.shape == (1500, 1, 8, 8)


# ---------------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_dir_round_trip(tmp_path, gz):
    arrays = make_mnist_dir(tmp_path, gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        d = load_dataset(f"mnist:path={tmp_path}", split=split)
        images, labels = arrays[prefix]
        assert d.x.shape == (len(images), 1, 28, 28) and d.kind == "image" and d.num_classes == 10
        assert np.array_equal(to_uint8_images(d.x)[..., 0], images)
        assert d.labels.tolist() == labels.tolist()
    d = load_dataset(f"fashion-mnist:path={tmp_path},limit=2,split=test")
    assert d.x.shape == (2, 1, 28, 28) and d.labels.tolist() == arrays["t10k"][1][:2].tolist()


def test_idx_padding(tmp_path):
    arrays = make_mnist_dir(tmp_path, gz=True, n_train=4, n_test=1)
    images = arrays["train"][0]
    for pad in ("32", "pow2"):
        d = load_dataset(f"mnist:path={tmp_path},pad={pad}")
        assert d.x.shape == (4, 1, 32, 32)
        u8 = to_uint8_images(d.x)[..., 0]
        assert np.array_equal(u8[:, 2:30, 2:30], images)  # centred: 2 pixels of border on every side
        border = d.x.clone()
        border[:, :, 2:30, 2:30] = 0
        assert float(border.abs().sum()) == (32 * 32 - 28 * 28) * 4  # every border pixel is exactly -1
        assert bool((d.x[:, :, :2] == -1).all())
    assert load_dataset(f"mnist:path={tmp_path},pad=28").x.shape == (4, 1, 28, 28)
    with raises_naming("pad=27 is smaller than the 28x28 images"):
        load_dataset(f"mnist:path={tmp_path},pad=27")
    # an odd margin: the extra row/column goes after the image
    d = load_dataset(f"mnist:path={tmp_path},pad=31")
    assert np.array_equal(to_uint8_images(d.x)[:, 1:29, 1:29, 0], images)


def test_idx_generic_files(tmp_path):
    images = np.arange(3 * 5 * 4, dtype=np.uint8).reshape(3, 5, 4)
    labels = np.array([0, 4, 2], dtype=np.uint8)
    img_path = write_idx(tmp_path / "imgs.idx", images)
    lab_path = write_idx(tmp_path / "labs.idx.gz", labels, gz=True)
    d = load_dataset(f"idx:images={img_path},labels={lab_path}")
    assert d.x.shape == (3, 1, 5, 4) and d.num_classes == 5 and d.labels.tolist() == [0, 4, 2]
    assert np.array_equal(to_uint8_images(d.x)[..., 0], images)
    # non-square images pad to a square canvas
    assert load_dataset(f"idx:images={img_path},pad=pow2").x.shape == (3, 1, 8, 8)
    unlabelled = load_dataset(f"idx:images={img_path},limit=2")
    assert unlabelled.labels is None and unlabelled.num_classes == 0 and len(unlabelled) == 2
    # the class count comes from the whole label file, not the kept subset
    assert load_dataset(f"idx:images={img_path},labels={lab_path},limit=1").num_classes == 5


def test_idx_bad_files(tmp_path):
    images = np.zeros((4, 6, 6), dtype=np.uint8)
    good = write_idx(tmp_path / "good-images", images)
    labels3 = write_idx(tmp_path / "three-labels", np.zeros(3, dtype=np.uint8))

    truncated = tmp_path / "truncated-images"
    truncated.write_bytes(idx_bytes(images)[:-5])
    with raises_naming(r"truncated-images: file is shorter than its header claims.*needs 144 bytes.*found 139"):
        load_dataset(f"idx:images={truncated}")

    short_header = tmp_path / "short-header"
    short_header.write_bytes(idx_bytes(images)[:9])
    with raises_naming("short-header: truncated IDX header"):
        load_dataset(f"idx:images={short_header}")

    trailing = tmp_path / "trailing-images"
    trailing.write_bytes(idx_bytes(images) + b"xx")
    with raises_naming("trailing-images: 2 unexpected bytes"):
        load_dataset(f"idx:images={trailing}")

    with raises_naming(r"three-labels: wrong IDX magic number: found 2049 \(0x00000801\), expected 2051"):
        load_dataset(f"idx:images={labels3}")
    with raises_naming("good-images: wrong IDX magic number: found 2051.*expected 2049"):
        load_dataset(f"idx:images={good},labels={good}")

    with raises_naming("three-labels: 3 labels but .*good-images holds 4 images"):
        load_dataset(f"idx:images={good},labels={labels3}")

    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x00\x00")
    with raises_naming("tiny: 2 bytes is too short"):
        load_dataset(f"idx:images={tiny}")

    empty = write_idx(tmp_path / "empty-images", np.zeros((0, 6, 6), dtype=np.uint8))
    with raises_naming("empty-images: IDX header declares an empty array"):
        load_dataset(f"idx:images={empty}")

    with raises_naming("missing-file: no such file"):
        load_dataset(f"idx:images={tmp_path / 'missing-file'}")
    with raises_naming("not a regular file"):
        load_dataset(f"idx:images={tmp_path}")


def test_idx_bad_gzip(tmp_path):
    data = gzip.compress(idx_bytes(np.zeros((4, 6, 6), dtype=np.uint8)))
    cut = tmp_path / "cut-images.gz"
    cut.write_bytes(data[: len(data) // 2])
    with raises_naming("cut-images.gz: truncated gzip file"):
        load_dataset(f"idx:images={cut}")

    corrupt = tmp_path / "corrupt-images.gz"
    corrupt.write_bytes(data[:10] + bytes(b ^ 0xFF for b in data[10:]))
    with raises_naming("corrupt-images.gz: corrupt gzip file"):
        load_dataset(f"idx:images={corrupt}")

    fake = tmp_path / "fake-images.gz"
    fake.write_bytes(b"this is not gzip")
    with raises_naming("fake-images.gz: named .gz but is not gzip data"):
        load_dataset(f"idx:images={fake}")


def test_mnist_dir_errors(tmp_path):
    with raises_naming(f"mnist: directory {tmp_path / 'nope'} does not exist"):
        load_dataset(f"mnist:path={tmp_path / 'nope'}")
    with raises_naming("has no train-images-idx3-ubyte or train-images-idx3-ubyte.gz"):
        load_dataset(f"mnist:path={tmp_path}")
    make_mnist_dir(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with raises_naming("has no t10k-labels-idx1-ubyte"):
        load_dataset(f"mnist:path={tmp_path}", split="test")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 2, 10], dtype=np.uint8))
    with raises_naming("t10k-labels-idx1-ubyte: label 10 is out of range 0..9"):
        load_dataset(f"mnist:path={tmp_path}", split="test")


@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="no shared MNIST beside the repository")
def test_real_mnist_test_split():
    d = load_dataset(f"mnist:path={SHARED_DATA / 'mnist'},split=test,limit=100")
    assert d.x.shape == (100, 1, 28, 28) and d.num_classes == 10
    assert float(d.x.min()) == -1.0 and float(d.x.max()) == 1.0
    # the first ten digits of the official t10k set
    assert d.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert float((d.x == -1).float().mean()) > 0.7  # mostly background


# ---------------------------------------------------------------------- folder
def make_png(path: Path, value: int, size: tuple[int, int] = (6, 6), mode: str = "L") -> None:
    colour = value if mode == "L" else (value, 255 - value, 0)
    Image.new(mode, size, colour).save(path)


def test_folder_classes(tmp_path):
    for cls, value in (("b_dog", 255), ("a_cat", 0)):
        (tmp_path / cls).mkdir()
        for i in range(2):
            make_png(tmp_path / cls / f"{i}.png", value, mode="RGB")
    (tmp_path / "a_cat" / "notes.txt").write_text("not an image")
    d = load_dataset(f"folder:path={tmp_path},size=4,channels=1")
    assert d.x.shape == (4, 1, 4, 4) and d.num_classes == 2 and d.kind == "image"
    assert d.labels.tolist() == [0, 0, 1, 1]  # sorted class names: a_cat=0, b_dog=1
    rgb = load_dataset(f"folder:path={tmp_path},size=4")
    assert rgb.x.shape == (4, 3, 4, 4)
    u8 = to_uint8_images(rgb.x)
    assert (u8[0] == [0, 255, 0]).all() and (u8[3] == [255, 0, 0]).all()
    assert len(load_dataset(f"folder:path={tmp_path},size=4,limit=3")) == 3


def test_folder_unlabelled_and_errors(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        make_png(flat / f"{i}.png", 128, size=(5, 7))
    d = load_dataset(f"folder:path={flat},size=8,channels=1")
    assert d.x.shape == (3, 1, 8, 8) and d.labels is None and d.num_classes == 0
    assert np.allclose(to_uint8_images(d.x), 128, atol=1)

    empty = tmp_path / "empty"
    empty.mkdir()
    with raises_naming("empty holds no images"):
        load_dataset(f"folder:path={empty}")
    (empty / "cls").mkdir()
    with raises_naming("class folder .*cls holds no images"):
        load_dataset(f"folder:path={empty}")
    with raises_naming("does not exist"):
        load_dataset(f"folder:path={tmp_path / 'missing'}")
    with raises_naming("channels must be one of 1|3"):
        load_dataset(f"folder:path={flat},channels=2")

    (flat / "sub").mkdir()
    make_png(flat / "sub" / "x.png", 0)
    with raises_naming("mixes class subfolders with loose images"):
        load_dataset(f"folder:path={flat}")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"\x89PNG not really")
    with raises_naming("cannot read image .*bad.png"):
        load_dataset(f"folder:path={broken}")


# ---------------------------------------------------------------------- npy / npz
def test_npy_vectors_and_images(tmp_path):
    vec = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float64)
    np.save(tmp_path / "vec.npy", vec)
    d = load_dataset(f"npy:path={tmp_path / 'vec.npy'}")
    assert d.kind == "vector" and d.x.shape == (10, 3) and d.x.dtype == torch.float32 and d.labels is None
    assert np.allclose(d.x.numpy(), vec, atol=1e-6)

    u8 = np.random.default_rng(1).integers(0, 256, size=(4, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "img.npz", x=u8, labels=np.array([0, 1, 2, 1]))
    d = load_dataset(f"npy:path={tmp_path / 'img.npz'}")
    assert d.kind == "image" and d.x.shape == (4, 3, 6, 6) and d.num_classes == 3
    assert np.array_equal(to_uint8_images(d.x), u8)
    assert d.labels.tolist() == [0, 1, 2, 1]

    nchw = np.linspace(-1, 1, 2 * 1 * 5 * 5, dtype=np.float32).reshape(2, 1, 5, 5)
    np.save(tmp_path / "nchw.npy", nchw)
    d = load_dataset(f"npy:path={tmp_path / 'nchw.npy'},pad=pow2")
    assert d.x.shape == (2, 1, 8, 8) and torch.equal(d.x[:, :, 1:6, 1:6], torch.from_numpy(nchw))

    gray = np.full((3, 4, 4), 255, dtype=np.uint8)
    np.save(tmp_path / "gray.npy", gray)
    d = load_dataset(f"npy:path={tmp_path / 'gray.npy'},limit=2")
    assert d.x.shape == (2, 1, 4, 4) and bool((d.x == 1).all())


def test_npy_refuses_pickles(tmp_path):
    marker = tmp_path / "unpickled"
    obj = np.empty(2, dtype=object)
    obj[0], obj[1] = _Marker(str(marker)), 1
    np.savez(tmp_path / "obj.npz", x=obj)
    with raises_naming("obj.npz"):
        load_dataset(f"npy:path={tmp_path / 'obj.npz'}")
    # a raw pickle with an .npy name is refused too
    (tmp_path / "raw.npy").write_bytes(pickle.dumps(_Marker(str(marker))))
    with raises_naming("raw.npy"):
        load_dataset(f"npy:path={tmp_path / 'raw.npy'}")
    assert not marker.exists()


class _Marker:
    """Unpickling this writes a file, so a test can tell whether anything was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path(self.path).write_text, ("unpickled",))


def test_npy_bad_files(tmp_path):
    def expect(name: str, match: str, spec_extra: str = "") -> None:
        with raises_naming(match):
            load_dataset(f"npy:path={tmp_path / name}{spec_extra}")

    np.savez(tmp_path / "nox.npz", images=np.zeros((2, 3)))
    expect("nox.npz", r"nox.npz has no array 'x' \(found images\)")
    expect("missing.npy", "file .*missing.npy does not exist")
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    expect("junk.npy", "cannot load .*junk.npy")
    with zipfile.ZipFile(tmp_path / "half.npz", "w") as zf:
        zf.writestr("x.npy", b"\x93NUMPY\x01\x00")
    expect("half.npz", "cannot load .*half.npz")
    np.save(tmp_path / "strings.npy", np.array(["a", "b"]))
    expect("strings.npy", "x must be a numeric array")
    np.save(tmp_path / "flat.npy", np.zeros(5))
    expect("flat.npy", "x must be .* got shape")
    np.save(tmp_path / "nan.npy", np.array([[0.0, np.nan]]))
    expect("nan.npy", "NaN or infinite")
    np.save(tmp_path / "int16.npy", np.zeros((2, 4, 4), dtype=np.int16))
    expect("int16.npy", "integer images must be uint8")
    np.save(tmp_path / "ambiguous.npy", np.zeros((2, 3, 4, 3), dtype=np.uint8))
    expect("ambiguous.npy", "cannot tell the channel axis")
    assert load_dataset(f"npy:path={tmp_path / 'ambiguous.npy'},layout=nhwc").x.shape == (2, 3, 3, 4)
    np.save(tmp_path / "vec.npy", np.zeros((2, 3)))
    expect("vec.npy", "pad and layout apply to images", ",pad=8")
    np.savez(tmp_path / "badlabels.npz", x=np.zeros((2, 3)), labels=np.array([0.5, 1.0]))
    expect("badlabels.npz", "labels must be a 1-D integer array")
    np.savez(tmp_path / "fewlabels.npz", x=np.zeros((2, 3)), labels=np.array([0]))
    expect("fewlabels.npz", "1 labels for 2 samples")
    np.savez(tmp_path / "neglabels.npz", x=np.zeros((2, 3)), labels=np.array([0, -1]))
    expect("neglabels.npz", "labels must be >= 0")


def test_npy_warns_on_unscaled_floats(tmp_path):
    np.save(tmp_path / "f.npy", np.full((2, 4, 4), 200.0, dtype=np.float32))
    with pytest.warns(UserWarning, match="not \\[-1, 1\\]"):
        d = load_dataset(f"npy:path={tmp_path / 'f.npy'}")
    assert float(d.x.max()) == 200.0


# ---------------------------------------------------------------------- mog
def test_mog_dataset():
    d = load_dataset("mog:dim=8,modes=6,std=0.2,seed=3,n=500")
    assert d.x.shape == (500, 8) and d.x.dtype == torch.float32 and d.kind == "vector"
    assert d.labels.dtype == torch.int64 and d.num_classes == 6 and set(d.labels.tolist()) == set(range(6))
    assert d.sample_shape == (8,) and d.mixture is not None and d.mixture.num_modes == 6
    assert d.spec == "mog:dim=8,modes=6,n=500,seed=3,std=0.2"
    # points sit near their own component's mean
    dist = (d.x.double() - d.mixture.means[d.labels]).norm(dim=1)
    assert float(dist.mean()) < 0.2 * 8**0.5 * 1.2

    same = load_dataset("mog: n=500 ,seed=3,std=0.2,modes=6,dim=8")
    assert torch.equal(same.x, d.x) and torch.equal(same.labels, d.labels) and same.spec == d.spec
    other = load_dataset("mog:dim=8,modes=6,std=0.2,seed=4,n=500")
    assert not torch.equal(other.mixture.means, d.mixture.means)
    test = load_dataset("mog:dim=8,modes=6,std=0.2,seed=3,n=500", split="test")
    assert torch.equal(test.mixture.means, d.mixture.means) and not torch.equal(test.x, d.x)

    ring = load_dataset("mog")
    assert ring.x.shape == (20000, 2) and ring.num_classes == 8
    assert torch.allclose(ring.mixture.means.norm(dim=1), torch.ones(8, dtype=torch.float64))
    uncond = load_dataset("mog:conditional=0,n=2e2")
    assert uncond.labels is None and uncond.num_classes == 0 and len(uncond) == 200


def test_sample_truth():
    d = load_dataset("mog:dim=3,modes=4,std=0.1,n=10,layout=random,scale=2")
    x1, y1 = d.sample_truth(300, torch.Generator().manual_seed(0))
    x2, y2 = d.sample_truth(300, torch.Generator().manual_seed(0))
    assert x1.shape == (300, 3) and y1.shape == (300,) and torch.equal(x1, x2) and torch.equal(y1, y2)
    fixed = torch.full((50,), 2, dtype=torch.long)
    x, y = d.sample_truth(50, torch.Generator().manual_seed(1), labels=fixed)
    assert torch.equal(y, fixed)
    assert torch.allclose(x.double().mean(0), d.mixture.means[2], atol=0.1)
    with raises_naming("labels must lie in 0..3"):
        d.sample_truth(2, torch.Generator(), labels=torch.tensor([0, 4]))
    with raises_naming(r"labels must have shape \[3\]"):
        d.sample_truth(3, torch.Generator(), labels=torch.tensor([0, 1]))
    with raises_naming("only mog datasets"):
        load_dataset("digits:limit=2").sample_truth(4, torch.Generator())


# ---------------------------------------------------------------------- to_uint8_images
def test_to_uint8_images():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 3.0, -7.0, float("nan")]).reshape(1, 1, 2, 4)
    out = to_uint8_images(x)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 4, 1)
    assert out[0, :, :, 0].tolist() == [[0, 0, 128, 191], [255, 255, 0, 0]]
    rgb = torch.stack([torch.full((2, 2), -1.0), torch.zeros(2, 2), torch.ones(2, 2)])[None]
    assert to_uint8_images(rgb)[0, 0, 0].tolist() == [0, 128, 255]
    levels = torch.arange(256, dtype=torch.float32) / 127.5 - 1
    assert to_uint8_images(levels.reshape(1, 1, 16, 16)).flatten().tolist() == list(range(256))
    with raises_naming(r"expects images \[N, C, H, W\]"):
        to_uint8_images(torch.zeros(3, 4, 4))
