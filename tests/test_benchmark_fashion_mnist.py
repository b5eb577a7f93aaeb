"""benchmarks/fashion_mnist.py: its refusals, its resume, and the committed teacher (CPU, no GPU needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import benchmark_module
from rayflow.distillation import load_generator

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "benchmarks" / "checkpoints" / "fashion-mnist-teacher"
FEATURE_NET = REPO / "benchmarks" / "checkpoints" / "fashion-mnist-feature-net"  # the classifier of older rows
AE_NETS = (REPO / "benchmarks" / "checkpoints" / "fashion-mnist-ae-feature-net",
           REPO / "benchmarks" / "checkpoints" / "fashion-mnist-ae-feature-net-2")


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("fashion_mnist.py", "bench_fashion_mnist") as module:
        yield module


def test_refuses_a_wrong_data_path(bench, tmp_path, capsys):
    assert bench.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), "--allow-cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fashion_mnist: error: --data") and "no such directory" in err
    assert not (tmp_path / "run").exists()


def test_refuses_to_start_without_a_gpu(bench, fm_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--data", str(fm_dir), "--out", str(tmp_path / "run")]) == 2
    assert "no GPU found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_refuses_unknown_parts_variants_and_teacher_dirs(bench, fm_dir, tmp_path, capsys):
    common = ["--data", str(fm_dir), "--out", str(tmp_path / "run"), "--tiny", "--allow-cpu"]
    assert bench.main([*common, "--parts", "teacher,lunch"]) == 2
    assert "unknown part(s) ['lunch']" in capsys.readouterr().err
    assert bench.main([*common, "--methods", "rayflow,sdxl-turbo"]) == 2
    assert "unknown variant(s) ['sdxl-turbo']" in capsys.readouterr().err
    assert bench.main([*common, "--teacher", str(tmp_path), "--parts", "teacher"]) == 2
    assert "not a saved model directory (missing model.safetensors, config.json)" in capsys.readouterr().err


def test_a_finished_part_is_skipped_and_a_changed_config_refused(bench, fm_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--data", str(fm_dir), "--out", str(run), "--tiny", "--allow-cpu", "--parts", "teacher",
            "--teacher-steps", "4"]
    assert bench.main(args) == 0
    weights = run / "teacher" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert json.loads((run / "rows" / "teacher_train.json").read_text())["final_loss"] > 0
    assert bench.main(args) == 0  # resumed: the finished teacher is not trained again
    assert weights.stat().st_mtime_ns == stamp
    timing = json.loads((run / "rows" / "timing.json").read_text())
    assert set(timing) == {"teacher"}
    capsys.readouterr()
    assert bench.main([*args[:-1], "5"]) == 2
    assert "made with another configuration" in capsys.readouterr().err
    # the students' compile mode is part of the configuration too (CUDA graphs change what a run measures)
    assert json.loads((run / "bench_config.json").read_text())["student_compile_mode"] == "default"
    assert bench.main([*args, "--student-compile-mode", "reduce-overhead"]) == 2
    assert "made with another configuration" in capsys.readouterr().err


def test_the_committed_teacher_loads_and_samples(tmp_path):
    """The checkpoint under benchmarks/ stays loadable by this code (shape, classes, prediction type)."""
    teacher = load_generator(model=str(TEACHER))
    assert teacher.sample_shape == (1, 32, 32) and teacher.num_classes == 10
    assert teacher.model.prediction_type == "epsilon"
    x = teacher.generate(torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)), 1,
                         cond=torch.tensor([0, 7]), sampler="ddim")
    assert x.shape == (2, 1, 32, 32) and torch.isfinite(x).all()
    assert (FEATURE_NET / "feature_net.safetensors").is_file()


def test_a_benchmark_run_can_adopt_the_committed_teacher(bench, fm_dir, tmp_path):
    run = tmp_path / "run"
    assert bench.main(["--data", str(fm_dir), "--out", str(run), "--tiny", "--allow-cpu", "--parts", "teacher",
                       "--teacher", str(TEACHER), "--feature-net", str(FEATURE_NET)]) == 0
    assert (run / "teacher" / "model.safetensors").read_bytes() == (TEACHER / "model.safetensors").read_bytes()
    assert json.loads((run / "rows" / "teacher_train.json").read_text()) == {"reused": str(TEACHER)}
    assert (run / "feature-net" / "feature_net.safetensors").is_file()


def test_the_committed_autoencoder_pair_scores_by_default_and_a_run_never_mixes_networks(bench, fm_dir, tmp_path,
                                                                                         capsys):
    """fd and fd_net2 come from the committed pair (issue 11); a run whose rows came from another net is refused."""
    from rayflow.metrics import load_feature_net

    nets = [load_feature_net(d) for d in AE_NETS]
    assert [(n.width, n.feature_dim) for n in nets] == [(32, 128), (24, 64)]
    assert all(n.name.startswith("rayflow-cnn-ae/fashion-mnist") and n.input_shape == (1, 32, 32) for n in nets)
    assert (bench.FEATURE_NET, bench.FEATURE_NET_2) == AE_NETS and bench.FD_VIEW == "early"
    run = tmp_path / "run"
    args = ["--data", str(fm_dir), "--out", str(run), "--tiny", "--allow-cpu", "--parts", "teacher", "--teacher",
            str(TEACHER)]
    assert bench.main(args) == 0
    for target, source in zip(("feature-net", "feature-net-2"), AE_NETS):
        assert (run / target / "feature_net.safetensors").read_bytes() == \
            (source / "feature_net.safetensors").read_bytes()
    assert bench.main(args) == 0  # the same networks again: fine
    capsys.readouterr()
    assert bench.main([*args, "--feature-net", str(FEATURE_NET)]) == 2
    err = capsys.readouterr().err
    assert "holds another feature network" in err and len(err.strip().splitlines()) == 1
    assert bench.main([*args[:-2], "--parts", "report", "--feature-net", str(FEATURE_NET)]) == 2  # nothing measured
    assert "nothing measured yet" in capsys.readouterr().err


def test_report_writes_tau_and_which_networks_scored(bench, tmp_path, capsys):
    run, results = tmp_path / "run", tmp_path / "results"
    names = {"feature_net": "rayflow-cnn-ae/a", "feature_net_2": "rayflow-cnn-ae/b", "feature_view": "early"}
    rows = [{"method": "teacher ddim-50", "nfe": 50, "fd": 0.1, "fd_net2": 0.2, **names},
            {"method": "ddim", "nfe": 1, "fd": 3.0, "fd_net2": 2.0, **names},
            {"method": "ddim", "nfe": 2, "fd": 1.0, "fd_net2": 1.5, **names}]
    bench.save_rows(run, "reference", rows[:1])
    bench.save_rows(run, "samplers", rows[1:])
    bench.part_report(run, bench.BenchConfig.dry_run(), results)
    meta = json.loads((results / "fashion_mnist_meta.json").read_text())
    assert meta["kendall_tau_fd_vs_fd_net2"] == pytest.approx(1.0) and meta["kendall_tau_rows"] == 3
    assert meta["scored_with"] == [names]
    assert (results / "fashion_mnist_fd_net2.png").is_file()
    bench.save_rows(run, "samplers", [{**rows[1], "feature_net": "rayflow-cnn/old"}, rows[2]])
    bench.part_report(run, bench.BenchConfig.dry_run(), results)
    assert "scored with 2 different networks/views" in capsys.readouterr().out


def test_seed_summary_is_the_mean_and_sample_std(bench, tmp_path):
    rows = [{"method": m, "nfe": n, "fd": fd} for m, n, fd in (
        ("rayflow", 1, 0.6), ("rayflow@seed1", 1, 0.7), ("rayflow@seed2", 1, 0.8),
        ("rayflow", 4, 1.0), ("rayflow@seed1", 4, 1.0), ("rayflow@seed2", 4, 1.0), ("reflow", 1, 0.2))]
    bench.write_seed_summary(rows, tmp_path)
    summary = json.loads((tmp_path / "fashion_mnist_seeds.json").read_text())
    assert [(r["method"], r["nfe"], r["seeds"]) for r in summary] == [("rayflow", 1, 3), ("rayflow", 4, 3)]
    assert summary[0]["fd_mean"] == pytest.approx(0.7) and summary[0]["fd_std"] == pytest.approx(0.1)
    assert summary[1]["fd_std"] == 0.0
    assert "| rayflow | 3 | 0.700 ± 0.100 | 1.000 ± 0.000 |" in (tmp_path / "fashion_mnist_seeds.md").read_text()


def test_refuses_bad_seeds(bench, fm_dir, tmp_path, capsys):
    args = ["--data", str(fm_dir), "--out", str(tmp_path / "run"), "--tiny", "--allow-cpu", "--seeds", "0,one"]
    assert bench.main(args) == 2
    assert "--seeds '0,one': expected comma-separated integers" in capsys.readouterr().err


# ---------------------------------------------------------------------- the methods part as parallel workers
WORKER = '''
import json, sys, time
from pathlib import Path
args = sys.argv[1:]
run = Path(args[args.index("--out") + 1])
unit = args[args.index("--units") + 1]
name = unit.split(":")[0]
events = run / "events.txt"
with open(events, "a") as f:
    f.write(f"start {name} {time.time()}\\n")
if name == "rayflow":  # the cache builder: its pool is done once its student logs
    time.sleep(0.5)
    (run / "students" / name).mkdir(parents=True, exist_ok=True)
    (run / "students" / name / "train_log.jsonl").write_text("{}\\n")
    time.sleep(1.0)
if name == "reflow":
    print("simulated failure in", name)
    sys.exit(3)
with open(events, "a") as f:
    f.write(f"end {name} {time.time()}\\n")
'''


def test_job_plan_waits_only_for_a_shared_cache(bench):
    cfg = bench.BenchConfig()
    plan = bench.job_plan([("reflow", 0), ("rayflow-learned-time-sampler", 0), ("rayflow", 0), ("rayflow", 1),
                           ("reflow", 1)], cfg)
    assert plan == [(("rayflow", 0), None), (("reflow", 0), None), (("reflow", 1), None),  # own caches
                    (("rayflow-learned-time-sampler", 0), ("rayflow", 0)), (("rayflow", 1), ("rayflow", 0))]


def test_parallel_workers_run_side_by_side_and_a_failure_keeps_the_rest(bench, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "rows").mkdir(parents=True)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    units = [("rayflow", 0), ("rayflow-learned-time-sampler", 0), ("reflow", 0), ("perflow", 0)]
    with pytest.raises(bench.RayflowError, match=r"1 job\(s\) failed \(reflow\)"):
        bench.run_parallel(run, bench.BenchConfig(), units, jobs=4, worker_argv=["--out", str(run)], threads=1,
                           script=script)
    out = capsys.readouterr().out
    assert "FAILED reflow (exit 3)" in out and "simulated failure in reflow" in out
    events = [line.split() for line in (run / "events.txt").read_text().splitlines()]
    when = {(kind, name): float(t) for kind, name, t in events}
    assert ("end", "perflow") in when and ("end", "rayflow-learned-time-sampler") in when
    assert ("end", "reflow") not in when
    # the variant that reads RayFlow's cache started only after RayFlow's student began training ...
    assert when[("start", "rayflow-learned-time-sampler")] > when[("start", "rayflow")] + 0.5
    # ... and the others did not wait: they ran beside RayFlow
    assert when[("start", "perflow")] < when[("end", "rayflow")]
    timing = json.loads((run / "rows" / "timing_methods.json").read_text())
    assert set(timing) == {"rayflow", "rayflow-learned-time-sampler", "reflow", "perflow", "parallel_jobs",
                           "threads_per_job"} and timing["parallel_jobs"] == 4
    assert (run / "logs" / "methods-reflow.log").read_text().strip() == "simulated failure in reflow"
