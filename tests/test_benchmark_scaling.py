"""benchmarks/scaling.py on a CPU (gloo): its 1- and 2-process launches, the sharded pool build, the scaling table,
the kill-and-resume part, and its refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("scaling.py", "bench_scaling") as module:
        yield module


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    # a test runner started under a launcher must not hand its world to the launches
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _args(fm_dir, tmp_path, *extra: str) -> list[str]:
    return ["--tiny", "--allow-cpu", "--data", str(fm_dir), "--scratch", str(tmp_path / "scratch"),
            "--results", str(tmp_path / "scaling.json"), *extra]


def test_pairs_split_over_two_gloo_processes(bench, fm_dir, tmp_path):
    """One RayFlow eps_mu pool built by 1 and by 2 processes: four shards, two per rank, the same bytes either way,
    and a scaling row (CPU numbers: only that they exist)."""
    code = bench.main(_args(fm_dir, tmp_path, "--parts", "pairs", "--pair-methods", "rayflow"))
    assert code == 0
    doc = json.loads((tmp_path / "scaling.json").read_text())
    assert set(doc) == {"cpu"}  # a CPU run never lands under the GPU key
    cpu = doc["cpu"]
    assert "meaningless" in cpu["note"] or "say nothing about GPUs" in cpu["note"]
    rows = {r["processes"]: r for r in cpu["rows"]}
    assert set(rows) == {1, 2} and all("error" not in r for r in rows.values()), rows
    assert rows[1]["shards"] == rows[2]["shards"] == 4 and rows[2]["instances"] == 128
    assert rows[2]["shards_identical_to_1_process"] is True
    (row,) = cpu["scaling"]
    assert row["part"] == "pairs" and row["processes"] == 2 and row["target"] == 0.95
    assert row["efficiency"] == pytest.approx(rows[2]["instances_per_s"] / (2 * rows[1]["instances_per_s"]),
                                              abs=1e-3)
    assert cpu["versions"]["torch"] == torch.__version__ and "--tiny" in cpu["command"]


def test_scaling_table(bench):
    rows = [{"part": "sd", "what": "x", "processes": 1, "samples_per_s": 100.0, "host": "a"},
            {"part": "sd", "what": "x", "processes": 2, "samples_per_s": 190.0, "host": "a"},
            {"part": "fm", "what": "y", "processes": 2, "samples_per_s": 5.0},  # no 1-process row: no efficiency
            {"part": "pairs", "what": "z", "processes": 1, "instances_per_s": 10.0, "host": "a"},
            {"part": "pairs", "what": "z", "processes": 2, "error": "boom"}]
    (row,) = bench.scaling_table(rows)
    assert row["efficiency"] == 0.95 and row["meets_target"] and row["same_host"]
    rows[1]["samples_per_s"] = 170.0
    assert not bench.scaling_table(rows)[0]["meets_target"]  # 0.85 < the 0.90 target of the SD row


def test_refusals(bench, fm_dir, tmp_path, capsys, monkeypatch):
    for bad, words in ((["--parts", "fm,lunch"], "lunch"), (["--num-processes", "1,x"], "integers"),
                       (["--methods", "nope"], "nope"), (["--resume-steps", "5"], "even")):
        assert bench.main(_args(fm_dir, tmp_path, *bad)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("rayflow: error:") and words in err[0]
    assert bench.main(_args(tmp_path / "nowhere", tmp_path)) == 2
    assert "no such directory" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--data", str(fm_dir), "--results", str(tmp_path / "scaling.json")]) == 2
    assert "no GPU found" in capsys.readouterr().err
    assert not (tmp_path / "scaling.json").exists() and not (tmp_path / "scratch").exists()


@pytest.mark.slow
def test_full_dry_run_with_kill_and_resume(bench, fm_dir, tmp_path):
    """Every part on 1 and 2 processes; the killed 2-process RayFlow run resumes to the uninterrupted weights."""
    code = bench.main(_args(fm_dir, tmp_path, "--methods", "rayflow,reflow", "--resume-seeds", "2"))
    cpu = json.loads((tmp_path / "scaling.json").read_text())["cpu"]
    assert code == 0, cpu
    assert all("error" not in r for r in cpu["rows"]), cpu["rows"]
    parts = {(r["part"], r["processes"]) for r in cpu["rows"]}
    assert parts == {(p, n) for p in ("fm", "sd", "pairs") for n in (1, 2)}
    assert {r["part"] for r in cpu["scaling"]} == {"fm", "sd", "pairs"}
    res = cpu["resume"]
    assert "error" not in res, res
    assert res["killed_launch_exit_code"] != 0 and not res["final_model_after_kill"]
    assert res["checkpoints_after_kill"] == ["step-0000003"]
    assert res["resumed_bit_identical"] and res["resumed_max_abs_weight_diff"] == 0.0
    assert len(res["sample_distance_2proc_to_1proc_seeds"]) == 2 and res["distance_ratio"] > 0
    assert os.path.isdir(tmp_path / "scratch" / "resume" / "resumed" / "checkpoints")
