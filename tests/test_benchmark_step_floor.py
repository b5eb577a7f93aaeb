"""benchmarks/step_floor.py: its CPU dry run (the bare-loop variants run, the graph variants are skipped with a
note) and its refusals."""

from __future__ import annotations

import json

import pytest

from conftest import benchmark_module


@pytest.fixture(scope="module")
def floor():
    with benchmark_module("step_floor.py", "bench_step_floor") as module:
        yield module


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_dry_run_records_every_variant(floor, tmp_path, capsys) -> None:
    results = tmp_path / "floor.json"
    code = floor.main(["--tiny", "--allow-cpu", "--warmup", "1", "--measure", "2", "--profile",
                       "--results", str(results)])
    assert code == 0
    doc = json.loads(results.read_text())
    rows = {row["what"]: row for row in doc["rows"]}
    for name in ("base", "base-plain"):
        assert rows[name]["samples_per_s"] > 0 and "error" not in rows[name]
        assert rows[f"{name} profile (3 steps)"]["kernels_per_step"] > 0
    for name in ("step", "step-eager"):
        assert rows[name] == {"what": name, "skipped": "CUDA graphs need a GPU"}
    assert "CUDA graphs need a GPU" in capsys.readouterr().err
    assert doc["batch"] == 8 and doc["command"].startswith("python ")


@pytest.mark.parametrize("argv, message", [(["--variants", "base,fast"], "unknown variant"),
                                           ([], "no GPU")])
def test_refusals(floor, tmp_path, capsys, argv, message) -> None:
    assert floor.main([*argv, "--results", str(tmp_path / "x.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
