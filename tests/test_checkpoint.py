"""Atomic files, safetensors/JSON reading with user-facing errors, and model directories."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rayflow.checkpoint import (
    join_state,
    load_model_dir,
    load_safetensors,
    load_state,
    read_json,
    save_model_dir,
    save_safetensors_atomic,
    save_state,
    split_state,
    write_json_atomic,
)
from rayflow.errors import RayflowError
from rayflow.models import ModelConfig, build_model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield

def _mlp(hidden: int = 32, num_classes: int = 0, prediction_type: str = "epsilon"):
    torch.manual_seed(0)
    cfg = ModelConfig(kind="mlp", sample_shape=(3,), hidden=hidden, depth=2, num_classes=num_classes,
                      prediction_type=prediction_type)
    model = build_model(cfg)
    torch.nn.init.normal_(model.out[-1].weight, std=0.5)  # zero-initialised: make the output non-trivial
    return model, cfg


def _boom(*args, **kwargs):
    raise OSError("simulated crash")


# ---------------------------------------------------------------------- atomic writes
def test_json_round_trip_and_no_temp_files(tmp_path):
    p = tmp_path / "sub" / "a.json"
    write_json_atomic({"x": 1, "y": [1, 2]}, p)
    write_json_atomic({"x": 2}, p)
    assert read_json(p) == {"x": 2}
    assert os.listdir(p.parent) == ["a.json"]


def test_json_crash_keeps_previous_file(tmp_path, monkeypatch):
    p = tmp_path / "a.json"
    write_json_atomic({"v": "old"}, p)
    monkeypatch.setattr(os, "replace", _boom)
    with pytest.raises(OSError, match="simulated"):
        write_json_atomic({"v": "new"}, p)
    monkeypatch.undo()
    assert read_json(p) == {"v": "old"}
    assert os.listdir(tmp_path) == ["a.json"]  # the temp file was cleaned up


def test_safetensors_crash_keeps_previous_file(tmp_path, monkeypatch):
    p = tmp_path / "w.safetensors"
    save_safetensors_atomic({"a": torch.ones(3)}, p, metadata={"k": "v"})
    monkeypatch.setattr(os, "replace", _boom)
    with pytest.raises(OSError):
        save_safetensors_atomic({"a": torch.zeros(5)}, p)
    monkeypatch.undo()
    assert torch.equal(load_safetensors(p)["a"], torch.ones(3))
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_safetensors_handles_views_shared_storage_and_scalars(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"t": base.t(), "tied_a": base, "tied_b": base, "scalar": torch.tensor(7.0)}
    save_safetensors_atomic(tensors, tmp_path / "x.safetensors")
    back = load_safetensors(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        assert torch.equal(back[k], v), k


# ---------------------------------------------------------------------- reading errors
def test_load_safetensors_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(RayflowError, match="missing.safetensors: no such file"):
        load_safetensors(missing)
    good = tmp_path / "good.safetensors"
    save_safetensors_atomic({"a": torch.randn(64, 64)}, good)
    data = good.read_bytes()
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(RayflowError, match="trunc.safetensors: not a readable safetensors"):
        load_safetensors(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 5)
    with pytest.raises(RayflowError, match="garbage.safetensors"):
        load_safetensors(garbage)


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(RayflowError, match="nope.json: no such file"):
        read_json(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RayflowError, match="bad.json: invalid JSON"):
        read_json(bad)
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    with pytest.raises(RayflowError, match="arr.json: expected a JSON object"):
        read_json(arr)


# ---------------------------------------------------------------------- nested state without pickle
def test_split_join_state_restores_optimizer_state_exactly(tmp_path):
    model, _ = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    model(torch.randn(4, 3), torch.full((4,), 10.0)).square().mean().backward()
    opt.step()
    sd = opt.state_dict()
    skeleton, tensors = split_state(sd)
    json.dumps(skeleton)  # JSON-able
    back = join_state(json.loads(json.dumps(skeleton)), tensors)
    assert back["param_groups"][0]["betas"] == (0.9, 0.99) and isinstance(back["param_groups"][0]["betas"], tuple)
    assert set(back["state"]) == set(sd["state"])  # int keys survive
    for i, st in sd["state"].items():
        for k, v in st.items():
            assert torch.equal(back["state"][i][k], v)
    save_state(sd, tmp_path / "o.safetensors", tmp_path / "o.json")
    opt2 = torch.optim.AdamW(model.parameters(), lr=5.0)
    opt2.load_state_dict(load_state(tmp_path / "o.safetensors", tmp_path / "o.json"))
    assert opt2.param_groups[0]["lr"] == 1e-3 and opt2.param_groups[0]["betas"] == (0.9, 0.99)


def test_split_state_scalars_and_refusals():
    import numpy as np

    skeleton, tensors = split_state({"a": np.float32(1.5), "b": np.int64(3), "c": [{"x": None}], "d": {}})
    assert join_state(json.loads(json.dumps(skeleton)), tensors) == {"a": 1.5, "b": 3, "c": [{"x": None}], "d": {}}
    with pytest.raises(TypeError, match="without pickle"):
        split_state({"f": object()})


# ---------------------------------------------------------------------- model directories
@pytest.mark.parametrize("num_classes,prediction_type", [(0, "epsilon"), (3, "v_prediction")])
def test_model_dir_round_trip_is_exact(tmp_path, num_classes, prediction_type):
    model, cfg = _mlp(num_classes=num_classes, prediction_type=prediction_type)
    (tmp_path / "keep.txt").write_text("other file")
    save_model_dir(tmp_path, model, {"model": cfg.to_dict(), "note": "hi"})
    loaded, config = load_model_dir(tmp_path)
    assert config["note"] == "hi" and "rayflow_version" in config
    assert (tmp_path / "keep.txt").read_text() == "other file"
    assert not loaded.training and loaded.prediction_type == prediction_type
    x, t = torch.randn(5, 3), torch.tensor([0.0, 10.5, 100.0, 500.0, 999.0])
    cond = torch.tensor([0, 1, 2, 3, 1]) if num_classes else None
    with torch.no_grad():
        assert torch.equal(loaded(x, t, cond), model.eval()(x, t, cond))


def test_load_model_dir_errors(tmp_path):
    model, cfg = _mlp()
    with pytest.raises(RayflowError, match="nowhere: no such directory"):
        load_model_dir(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RayflowError, match="file: not a directory"):
        load_model_dir(tmp_path / "file")
    with pytest.raises(RayflowError, match="no config.json"):
        load_model_dir(tmp_path)

    d = tmp_path / "m"
    save_model_dir(d, model, {"model": cfg.to_dict()})
    (d / "model.safetensors").rename(d / "moved.safetensors")
    with pytest.raises(RayflowError, match="no model.safetensors"):
        load_model_dir(d)
    (d / "moved.safetensors").rename(d / "model.safetensors")

    write_json_atomic({"train": {}}, d / "config.json")
    with pytest.raises(RayflowError, match='config.json: no "model" section'):
        load_model_dir(d)
    write_json_atomic({"model": {**cfg.to_dict(), "bogus": 1}}, d / "config.json")
    with pytest.raises(RayflowError, match="config.json: model config has unknown keys"):
        load_model_dir(d)

    write_json_atomic({"model": cfg.to_dict()}, d / "config.json")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(RayflowError, match="model.safetensors: not a readable safetensors"):
        load_model_dir(d)


def test_load_model_dir_weights_of_another_config(tmp_path):
    small, small_cfg = _mlp(hidden=32)
    big, big_cfg = _mlp(hidden=48)
    save_model_dir(tmp_path, small, {"model": big_cfg.to_dict()})  # config says 48, weights are 32
    with pytest.raises(RayflowError) as info:
        load_model_dir(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and "model.safetensors" in msg
    assert "'inp.weight' has shape (32, 3) in the file but (48, 3) in the model" in msg

    deeper = ModelConfig(**{**small_cfg.to_dict(), "depth": 3})
    save_model_dir(tmp_path, small, {"model": deeper.to_dict()})
    with pytest.raises(RayflowError, match=r"missing key 'blocks\.2\.0\.weight' \(shape \(32,\)\)"):
        load_model_dir(tmp_path)

    shallower = ModelConfig(**{**small_cfg.to_dict(), "depth": 1})
    save_model_dir(tmp_path, small, {"model": shallower.to_dict()})
    with pytest.raises(RayflowError, match=r"unexpected key 'blocks\.1\."):
        load_model_dir(tmp_path)
