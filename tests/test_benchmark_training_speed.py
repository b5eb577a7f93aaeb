"""benchmarks/training_speed.py: its CPU dry run, its refusals, and that a failing row is recorded, not fatal."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from conftest import benchmark_module
from test_data import make_mnist_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("training_speed.py", "bench_training_speed") as module:
        yield module


@pytest.fixture
def data_dir(tmp_path) -> Path:
    root = tmp_path / "fm"
    root.mkdir()
    make_mnist_dir(root, gz=True, n_train=32, n_test=8)
    return root


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _run(bench, data_dir, tmp_path, rows: str, *extra: str) -> dict:
    results = tmp_path / "speed.json"
    code = bench.main(["--tiny", "--allow-cpu", "--data", str(data_dir), "--out", str(tmp_path / "run"),
                       "--results", str(results), "--rows", rows, *extra])
    assert code == 0
    return json.loads(results.read_text())


def test_a_failing_row_is_recorded_and_the_rest_go_on(bench, data_dir, tmp_path, monkeypatch):
    def broken(self):
        raise RuntimeError("simulated out of memory")

    monkeypatch.setattr(bench.Bench, "row_inference", broken)
    doc = _run(bench, data_dir, tmp_path, "inference,teacher")
    assert doc["rows"][0] == {"what": "teacher inference, 1 NFE", "error": "RuntimeError: simulated out of memory",
                              "wall_s": doc["rows"][0]["wall_s"]}
    assert "--tiny" in doc["command"] and doc["versions"]["torch"] == torch.__version__ and doc["hardware"]
    assert doc["matmul_flops_per_s"] > 0
    row = doc["rows"][1]
    assert row["what"] == "teacher training" and "error" not in row, row
    assert row["samples_per_s"] > 0 and row["bare_samples_per_s"] > 0 and 0 < row["roofline_share"] < 1
    assert row["flops_per_sample"] > 0


def test_append_keeps_the_other_rows(bench, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(bench.Bench, "row_teacher", lambda self: {"samples_per_s": 1.0})
    monkeypatch.setattr(bench.Bench, "row_inference", lambda self: {"samples_per_s": 2.0})
    results = tmp_path / "speed.json"
    common = ["--tiny", "--allow-cpu", "--data", str(data_dir), "--out", str(tmp_path / "run"),
              "--results", str(results)]
    assert bench.main([*common, "--rows", "teacher"]) == 0
    assert bench.main([*common, "--rows", "inference", "--append"]) == 0
    doc = json.loads(results.read_text())
    assert [r["what"] for r in doc["rows"]] == ["teacher training", "teacher inference, 1 NFE"]
    assert bench.main([*common, "--rows", "teacher", "--append"]) == 0  # a row measured again replaces its old one
    assert [r["what"] for r in json.loads(results.read_text())["rows"]] == ["teacher inference, 1 NFE",
                                                                             "teacher training"]


def test_teacher_pool_rows_and_a_graphs_row_on_a_cpu(bench, data_dir, tmp_path, capsys):
    """The teacher side at steady state (a fixed-cost record, then one per pool, with counted NFEs and the ratio to
    the inference rate of the same run), and a CUDA-graphs method row that falls back on a CPU with one notice."""
    doc = _run(bench, data_dir, tmp_path, "teacher-pool,reflow-graphs", "--gen-batch", "4")
    rows = {r["what"]: r for r in doc["rows"]}
    assert all("error" not in r for r in rows.values()), rows
    fixed = rows["teacher pool: fixed cost (load, compile, capture)"]
    assert fixed["static_batch_sizes"] == [4, 2, 1] and fixed["gen_batch"] == 4 and not fixed["cuda_graphs"]
    assert fixed["fixed_s"] >= fixed["load_s"] > 0
    # tiny pools: 24 instances; K = 8 teacher calls each for the eps_mu average, 2 solver steps for the x0 and pairs
    per_instance = {"rayflow eps_mu, data x0, K=8 average": 8, "rayflow default, teacher x0 (dpm++2m 25)": 2,
                    "2-RF pairs (dpm++2m 25)": 2}
    assert [w for w in rows if w.startswith("teacher pool: ") and w != fixed["what"]] == \
        [f"teacher pool: {label}" for label in per_instance]
    for label, nfe in per_instance.items():
        row = rows[f"teacher pool: {label}"]
        assert row["pool_size"] == 24 and row["teacher_nfe"] == 24 * nfe and row["nfe_per_instance"] == nfe
        assert row["pool_s"] > 0 and row["teacher_nfe_per_s"] > 0 and row["over_inference"] > 0
    assert rows["teacher pool: rayflow eps_mu, data x0, K=8 average"]["host_noise_s"] > 0
    graphs = rows["reflow-graphs student training"]
    assert graphs["compile_mode"] == "reduce-overhead" and graphs["cuda_graphs"] is False
    assert graphs["graphs_fallback"] == "not compiled on a CPU" and graphs["samples_per_s"] > 0
    err = capsys.readouterr().err
    assert err.count("reflow-graphs: measured without CUDA graphs") == 1 and "Traceback" not in err


def test_profile_steps_profile_each_training_row_after_its_timed_steps(bench, data_dir, tmp_path):
    """--profile-steps N: every training row carries a profiler summary of N steps run after the timed ones (a CPU
    profile here: no GPU columns), and the Trainer ran the N + 1 extra steps that needs."""
    doc = _run(bench, data_dir, tmp_path, "teacher,reflow", "--profile-steps", "2", "--trace",
               str(tmp_path / "traces"), "--channels-last", "no")
    rows = {r["what"]: r for r in doc["rows"]}
    assert all("error" not in r for r in rows.values()), rows
    for what in ("teacher training", "reflow student training"):
        prof = rows[what]["profile"]
        assert prof["what"] == "Trainer step" and prof["cpu_ms_per_step"] > 0 and prof["gpu_ms_per_step"] is None
        assert prof["host_reads_per_step"] >= 0 and prof["top_gpu_ops_ms_per_step"] == {}
        assert prof["top_gpu_ops_calls_per_step"] == {}
        assert rows[what]["samples_per_s"] > 0  # the timed window is untouched by the profiler
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == ["reflow-2-rectified-flow.json",
                                                                  "speed-teacher.json"]
    assert doc["settings"]["channels_last"] == "no"
    log = (tmp_path / "run" / "teacher-training" / "train_log.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["step"] == 1 + 1 + 2 + 1  # --tiny: warmup 1, measure 1, a gap step, 2 profiled


def test_no_bare_and_a_timing_lock(bench, data_dir, tmp_path):
    """--no-bare leaves the bare columns empty; --timing-lock wraps the timed steps in the lock (here one process,
    --ready 1: it goes straight on) and the settings are recorded with the rows."""
    lock = tmp_path / "gpu.lock"
    doc = _run(bench, data_dir, tmp_path, "teacher", "--no-bare", "--timing-lock", str(lock), "--ready", "1",
               "--graphs-mode", "max-autotune")
    row = doc["rows"][0]
    assert row["samples_per_s"] > 0 and row["bare_samples_per_s"] is None and row["trainer_over_bare"] is None
    assert doc["settings"] == {"graphs_mode": "max-autotune", "cudnn_benchmark": False, "bare_loop": False,
                               "channels_last": "auto", "layout_optimization": "force", "kernel_tuning": "none"}
    assert lock.exists() and len(list(tmp_path.glob("gpu.lock.ready.*"))) == 1


def test_timing_lock_lets_one_holder_at_a_time(bench, tmp_path):
    """Two holders of the same lock file (separate opens, as two processes would have) never overlap, a nested
    acquire by the holder does not deadlock, and the ready barrier lets go once enough holders have arrived."""
    import threading

    path = str(tmp_path / "gpu.lock")
    events: list[str] = []
    first_in = threading.Event()

    def hold(name: str, signal: threading.Event | None) -> None:
        lock = bench.TimingLock(path)
        with lock:
            with lock:  # re-entrant
                events.append(f"{name} in")
                if signal is not None:
                    signal.set()
                    time.sleep(0.3)
                events.append(f"{name} out")

    a = threading.Thread(target=hold, args=("a", first_in))
    b = threading.Thread(target=lambda: (first_in.wait(10), hold("b", None)))
    a.start()
    b.start()
    a.join(20)
    b.join(20)
    assert events == ["a in", "a out", "b in", "b out"]
    ready = [bench.TimingLock(str(tmp_path / "other.lock"), ready=2, ready_timeout_s=30.0) for _ in range(2)]
    t0 = time.perf_counter()

    def arrive(lock) -> None:
        with lock:
            pass

    threads = [threading.Thread(target=arrive, args=(lock,)) for lock in ready]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert time.perf_counter() - t0 < 10 and len(list(tmp_path.glob("other.lock.ready.*"))) == 2


def test_refusals(bench, data_dir, tmp_path, capsys, monkeypatch):
    for flag, value in (("--gen-batch", "0"), ("--gen-batch", "big"), ("--pool-size", "0")):
        assert bench.main(["--tiny", "--allow-cpu", "--data", str(data_dir), flag, value]) == 2
        assert f"{flag} must be" in capsys.readouterr().err
    assert bench.main(["--tiny", "--allow-cpu", "--data", str(data_dir), "--rows", "teacher,lunch"]) == 2
    assert "unknown row(s) ['lunch']" in capsys.readouterr().err
    assert bench.main(["--tiny", "--allow-cpu", "--data", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--data", str(data_dir), "--out", str(tmp_path / "run")]) == 2
    assert "no GPU found" in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_dry_run_of_every_row(bench, data_dir, tmp_path):
    doc = _run(bench, data_dir, tmp_path, "all")
    rows = {r["what"]: r for r in doc["rows"]}
    assert all("error" not in r for r in rows.values()), rows
    for name in bench.METHODS:
        row = rows[f"{name} student training"]
        assert row["samples_per_s"] > 0 and row["bare_samples_per_s"] > 0 and row["teacher_nfe"] > 0
        assert row["teacher_side_nfe_per_s"] > 0
    assert [p["what"] for p in doc["profile"]] == ["old-style eager step", "Trainer step (eager, CPU)",
                                                   "Trainer step (eager, CPU, CUDA graphs asked for: fell back)"]
    assert all(rows[f"{name} student training"]["cuda_graphs"] is False for name in bench.GRAPH_ROWS)
    assert rows["teacher pool: 2-RF pairs (dpm++2m 25)"]["teacher_nfe"] > 0
    assert all(p["cpu_ms_per_step"] > 0 and "error" not in p for p in doc["profile"])


def test_window_clock_reports_the_median_window(bench, monkeypatch):
    """Ten steps of 4 samples in five windows of two steps; window times 1, 1, 4 (a stalled host), 1, 2 s: the
    median window's rate is 8 samples/s, where the whole span's (40 samples in 9 s) would be 4.4."""
    clock = bench.WindowClock(measure=10, windows=5, samples_per_step=4, device=torch.device("cpu"))
    walls = iter([0.0, 1.0, 2.0, 6.0, 7.0, 9.0])
    cpus = iter([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(walls))
    monkeypatch.setattr(bench.time, "process_time", lambda: next(cpus))
    for done in range(11):
        assert clock.rate() is None
        clock.at(done)
        clock.at(done)  # a second call at the same edge marks nothing
    assert clock.window_rates() == [8.0, 8.0, 2.0, 8.0, 4.0]
    assert clock.rate() == 8.0
    assert clock.summary() == {"windows": 5, "window_rates": [8.0, 8.0, 2.0, 8.0, 4.0],
                               "host_cpu_ms_per_step": 250.0, "wall_ms_per_step": 900.0}
    two = bench.WindowClock(measure=4, windows=2, samples_per_step=1, device=torch.device("cpu"))
    assert two.edges == [0, 2, 4]
    assert bench.WindowClock(measure=3, windows=5, samples_per_step=1, device=torch.device("cpu")).windows == 3
