"""benchmarks/ae_feature_nets.py: the recipe of the committed feature networks of the default fd (CPU, seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import benchmark_module


@pytest.fixture(scope="module")
def script():
    with benchmark_module("ae_feature_nets.py", "bench_ae_feature_nets") as module:
        yield module


def test_trains_the_pair_with_the_autoencoder_term_and_records_them(script, fm_dir, tmp_path):
    from rayflow.data import load_dataset
    from rayflow.metrics import load_feature_net, train_feature_net

    out, results = tmp_path / "net", tmp_path / "nets.json"
    common = ["--data", str(fm_dir), "--out", str(out), "--steps", "2", "--batch-size", "8", "--results", str(results)]
    assert script.main([*common, "--nets", "2"]) == 0
    assert script.main([*common, "--nets", "1"]) == 0  # a second process's entry joins the first one's
    record = json.loads(results.read_text())["nets"]
    assert set(record) == {str(out), str(out) + "-2"}
    for path, (width, dim, seed) in ((out, (32, 128, 12)), (tmp_path / "net-2", (24, 64, 13))):
        net = load_feature_net(path)
        entry = record[str(path)]
        assert (net.width, net.feature_dim, entry["seed"], entry["recon_weight"]) == (width, dim, seed, 1.0)
        assert net.name.startswith("rayflow-cnn-ae/") and 0 <= entry["test_accuracy"] <= 1
        # the saved network is exactly train_feature_net with those settings (the recipe is the record)
        train = load_dataset(f"fashion-mnist:path={fm_dir},pad=32", split="train")
        want = train_feature_net(train, steps=2, batch_size=8, width=width, feature_dim=dim, seed=seed,
                                 recon_weight=1.0, progress=False)
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), want.state_dict().values()))


def test_bad_arguments_are_one_line_errors(script, fm_dir, tmp_path, capsys):
    assert script.main(["--data", str(fm_dir), "--nets", "3", "--results", str(tmp_path / "r.json")]) == 2
    assert script.main(["--data", str(tmp_path / "nowhere"), "--results", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("rayflow: error: ") for line in err), err
