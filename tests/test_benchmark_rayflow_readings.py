"""benchmarks/rayflow_readings.py (issue #14): its refusals, and the --tiny --allow-cpu dry run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import benchmark_module

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("rayflow_readings.py", "bench_rayflow_readings") as module:
        yield module


def test_refuses_without_a_gpu_and_bad_arguments(bench, fm_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = tmp_path / "run"
    assert bench.main(["--data", str(fm_dir), "--out", str(run)]) == 2
    assert "no GPU found" in capsys.readouterr().err
    assert bench.main(["--data", str(fm_dir), "--out", str(run), "--allow-cpu"]) == 2  # only with --tiny
    assert "no GPU found" in capsys.readouterr().err
    assert not run.exists()
    common = ["--data", str(fm_dir), "--out", str(run), "--tiny", "--allow-cpu"]
    for extra, message in ((["--readings", "start,magic"], "unknown readings ['magic']"),
                           (["--teachers", "cosine"], "unknown teachers ['cosine']"),
                           (["--parts", "students,lunch"], "unknown parts ['lunch']"),
                           (["--seeds", "0,x"], "expected comma-separated integers")):
        assert bench.main([*common, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("rayflow_readings: error:") and message in err, err
    assert bench.main(["--data", str(tmp_path / "nowhere"), "--out", str(run), "--tiny", "--allow-cpu"]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_tiny_dry_run_trains_the_scaled_linear_teacher_and_resumes(bench, fm_dir, tmp_path, capsys):
    """The dry run's teacher-sd part from scratch (the students' part is the slow end-to-end test below)."""
    run = tmp_path / "run"
    args = ["--data", str(fm_dir), "--out", str(run), "--results", str(tmp_path / "res"), "--tiny", "--allow-cpu",
            "--teachers", "sd", "--parts", "teacher-sd", "--jobs", "1", "--sd-init", "scratch", "--teacher-steps", "2"]
    assert bench.main(args) == 0
    cfg = json.loads((run / "sd" / "teacher" / "config.json").read_text())
    assert cfg["schedule"]["kind"] == "scaled_linear" and cfg["model"]["kind"] == "unet"
    assert "init_from" not in cfg
    assert not (run / "linear").exists()  # only the teachers asked for
    stamp = (run / "sd" / "teacher" / "model.safetensors").stat().st_mtime_ns
    assert bench.main(args) == 0
    assert (run / "sd" / "teacher" / "model.safetensors").stat().st_mtime_ns == stamp
    assert "jobs" in json.loads((run / "timing.json").read_text())
    assert bench.main([*args[:-1], "3"]) == 2
    assert "made with another configuration" in capsys.readouterr().err


def test_scaled_linear_teacher_fine_tuned_from_the_linear_one(bench, fm_dir, tmp_path):
    """--sd-init linear (the default): the sd teacher starts from the linear teacher's weights, on its own
    schedule, and is packed for a later call (--pack), which adopts it with --sd-teacher."""
    from safetensors.torch import load_file

    run, packed = tmp_path / "run", tmp_path / "packed"
    args = ["--data", str(fm_dir), "--out", str(run), "--results", str(tmp_path / "res"), "--tiny", "--allow-cpu",
            "--teachers", "sd", "--parts", "teacher-sd", "--jobs", "1", "--teacher-steps", "1"]
    assert bench.main([*args, "--pack", str(packed)]) == 0
    cfg = json.loads((run / "sd" / "teacher" / "config.json").read_text())
    assert cfg["schedule"]["kind"] == "scaled_linear"
    assert cfg["init_from"] == str(run / "linear" / "teacher")
    assert cfg["model"] == json.loads((run / "linear" / "teacher" / "config.json").read_text())["model"]
    linear = load_file(str(run / "linear" / "teacher" / "model.safetensors"))
    sd = load_file(str(run / "sd" / "teacher" / "model.safetensors"))
    assert linear.keys() == sd.keys()
    # one update (EMA included) moves the weights a little, not back to a fresh initialisation
    diff = max(float((linear[k].float() - sd[k].float()).abs().max()) for k in linear)
    assert 0 < diff < 0.05
    import tarfile

    assert sorted(p.name for p in packed.iterdir()) == ["readings.tar.gz", "sd-teacher.tar.gz"]
    with tarfile.open(packed / "sd-teacher.tar.gz") as tar:
        tar.extractall(tmp_path / "back", filter="data")
    again = tmp_path / "run2"
    args2 = [a if a != str(run) else str(again) for a in args]
    assert bench.main([*args2, "--sd-teacher", str(tmp_path / "back" / "sd-teacher")]) == 0
    assert load_file(str(again / "sd" / "teacher" / "model.safetensors")).keys() == sd.keys()
    assert json.loads((again / "sd" / "rows" / "teacher_train.json").read_text())["reused"].endswith("sd-teacher")


def _fm_rows(name, fds, teacher_nfe):
    """Rows as benchmarks/fashion_mnist.py's student loop writes them (inputs to the report, not results)."""
    return [{"method": name, "nfe": n, "steps": n, "sampler": None, "fd": fd, "kid": fd / 10, "accuracy": 0.5,
             "teacher_nfe": teacher_nfe} for n, fd in zip((1, 2, 4, 8), fds)]


def test_report_reads_the_students_rows_seed_by_seed(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the report needs no GPU
    run, res = tmp_path / "run", tmp_path / "res"
    rows = run / "sd" / "rows"
    rows.mkdir(parents=True)
    (rows / "reference.json").write_text(json.dumps([{"method": "teacher ddim-50", "nfe": 50, "fd": 0.5}]))
    for name, fds in (("rr-trajectory", (1.0, 0.9, 0.8, 0.7)), ("rr-trajectory@seed1", (2.0, 1.9, 1.8, 1.7)),
                      ("rr-trajectory-uniform-t", (1.5, 1.0, 0.8, 0.7)),
                      ("rr-trajectory-uniform-t@seed1", (2.1, 1.9, 1.8, 1.7))):
        (rows / f"method-{name}.json").write_text(json.dumps(_fm_rows(name, fds, 100)))
    student = run / "sd" / "students" / "rr-trajectory"
    student.mkdir(parents=True)
    (student / "time_sampler.json").write_text(json.dumps(
        {"sampler": "learned", "num_timesteps": 1000, "snapshots": [{"step": 1, "probs": [0.01] * 100}]}))
    assert bench.main(["--out", str(run), "--results", str(res), "--parts", "report", "--teachers", "sd",
                       "--data", str(tmp_path)]) == 0
    out = json.loads((res / "rayflow_readings.json").read_text())
    students = [r for r in out if r["seed"] is not None]
    assert {(r["reading"], r["seed"]) for r in students} == {
        ("trajectory", 0), ("trajectory", 1), ("trajectory-uniform-t", 0), ("trajectory-uniform-t", 1)}
    assert all({"reading", "teacher", "seed", "nfe", "fd", "kid", "accuracy", "teacher_nfe"} <= set(r)
               for r in students)
    md = (res / "rayflow_readings.md").read_text()
    assert "| trajectory | 2 | 1.50 ± 0.71 (3.00×)" in md
    assert "- 1 NFE: +0.3000 ± 0.2828 over 2 seed(s): +0.5000, +0.1000" in md
    for name in ("rayflow_readings_fd_sd.png", "rayflow_readings_fd_trajectory.png",
                 "rayflow_readings_time_sampler.png"):
        assert (res / name).is_file(), name


@pytest.mark.slow
def test_tiny_dry_run_end_to_end(bench, fm_dir, tmp_path, capsys):
    run, results = tmp_path / "run", tmp_path / "results"
    args = ["--data", str(fm_dir), "--out", str(run), "--results", str(results), "--tiny", "--allow-cpu",
            "--readings", "start,start-uniform-t", "--seeds", "0,1", "--jobs", "1", "--steps", "2",
            "--teacher-steps", "2"]
    assert bench.main(args) == 0
    rows = json.loads((results / "rayflow_readings.json").read_text())
    students = [r for r in rows if r["seed"] is not None]
    keys = {"reading", "teacher", "seed", "nfe", "fd", "kid", "accuracy", "teacher_nfe"}
    assert all(keys <= set(r) for r in students)
    assert {(r["reading"], r["teacher"], r["seed"]) for r in students} == {
        (n, t, s) for n in ("start", "start-uniform-t") for t in ("linear", "sd") for s in (0, 1)}
    assert {r["nfe"] for r in students} == {1, 2, 4, 8}
    # both teachers have their 50-step DDIM reference row, and the second one is on the scaled-linear schedule
    assert {r["teacher"] for r in rows if r["reading"] == "teacher ddim-50"} == {"linear", "sd"}
    sd = json.loads((run / "sd" / "teacher" / "config.json").read_text())
    assert sd["schedule"]["kind"] == "scaled_linear"
    # the start reading's pool costs the teacher's ODE only (tiny: 64 instances x 2 DPM-Solver++ steps)
    assert {r["teacher_nfe"] for r in students} == {64 * 2}
    md = (results / "rayflow_readings.md").read_text()
    assert "paired over seeds" in md and "| start | 2 |" in md
    for name in ("rayflow_readings_fd_linear.png", "rayflow_readings_fd_sd.png", "rayflow_readings_fd_start.png",
                 "rayflow_readings_time_sampler.png"):
        assert (results / name).is_file(), name
    # resumed: nothing is trained again, and a changed budget is refused
    stamp = (run / "sd" / "teacher" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert bench.main([*args, "--parts", "teacher-sd,students"]) == 0
    assert (run / "sd" / "teacher" / "model.safetensors").stat().st_mtime_ns == stamp
    assert ": done" not in capsys.readouterr().out
    assert bench.main([*args, "--steps", "3"]) == 2
    assert "made with another configuration" in capsys.readouterr().err


def test_paired_time_sampler_difference_is_per_seed(bench):
    rows = [{"reading": r, "teacher": "sd", "seed": s, "nfe": 1, "fd": fd, "teacher_nfe": 1}
            for r, s, fd in (("start", 0, 1.0), ("start", 1, 2.0), ("start-uniform-t", 0, 1.5),
                             ("start-uniform-t", 1, 2.1))]
    md = bench.summarise(rows)
    assert "- 1 NFE: +0.3000 ± 0.2828 over 2 seed(s): +0.5000, +0.1000" in md


def _sched_args(tmp_path, **kw):
    import argparse

    base = dict(threads=1, jobs=2, gpus=1, budget_s=0.0, student_s=0.0, teacher_s=0.0, out=str(tmp_path))
    return argparse.Namespace(**{**base, **kw})


def _stand_in(durations, fail=()):
    """Worker command lines that sleep for a job's duration (and exit 1 for the jobs in ``fail``)."""
    import sys

    def command(args, job):
        code = 1 if job.name in fail else 0
        sleep = durations.get(job.name, 0.05)
        return [sys.executable, "-c", f"import time, sys; time.sleep({sleep}); sys.exit({code})"]
    return command


def test_schedule_runs_pools_first_and_keeps_a_slot_for_a_waiting_row(bench, tmp_path, capsys):
    Job = bench.Job
    pool = Job("pool", "linear", "start")
    jobs = [pool, Job("student", "linear", "start", 1, deps=[pool.name]),
            Job("student", "linear", "reflow", 1), Job("student", "linear", "perflow", 0)]
    out = bench._schedule(jobs, _sched_args(tmp_path, jobs=2), {},
                          _stand_in({pool.name: 0.6, "student:linear:reflow:1": 1.2}), tick=0.05)
    assert set(out.values()) == {"done"} and len(out) == 4
    log = [line for line in capsys.readouterr().out.splitlines() if "started" in line]
    order = [line.split("] ")[1].split(": started")[0] for line in log]
    # reflow starts at once; perflow (lower priority) must not take the slot that start@1 waits for
    assert order[:2] == ["pool:linear:start", "student:linear:reflow:1"]
    assert order.index("student:linear:start:1") < order.index("student:linear:perflow:0")
    assert json.loads((tmp_path / "jobs.json").read_text())["outcome"] == out


def test_schedule_skips_what_cannot_fit_the_budget_and_what_lost_an_input(bench, tmp_path, capsys):
    Job = bench.Job
    teacher = Job("teacher", "sd")
    jobs = [Job("student", "linear", "reflow", 1), teacher, Job("student", "sd", "reflow", 0, deps=[teacher.name]),
            Job("student", "linear", "reflow", 2)]
    # margins of seconds: a worker's start costs about a second on a loaded machine
    args = _sched_args(tmp_path, jobs=3, budget_s=6.0, student_s=1.0, teacher_s=0.1)
    out = bench._schedule(jobs, args, {}, _stand_in({"student:linear:reflow:1": 30.0}, fail={teacher.name}),
                          tick=0.05)
    assert out["teacher:sd"].startswith("failed")
    assert out["student:sd:reflow:0"] == "skipped (an input failed)"
    assert out["student:linear:reflow:1"] == "stopped at the budget"  # still running at 6 s
    assert out["student:linear:reflow:2"] == "done"


def test_schedule_skips_a_long_job_whose_estimate_exceeds_the_budget(bench, tmp_path):
    Job = bench.Job
    jobs = [Job("student", "linear", "reflow", 1), Job("student", "linear", "reflow", 2)]
    args = _sched_args(tmp_path, jobs=1, budget_s=4.0, student_s=3.5)  # the second cannot start before 0.5 s
    out = bench._schedule(jobs, args, {}, _stand_in({"student:linear:reflow:1": 0.5}), tick=0.05)
    assert out == {"student:linear:reflow:1": "done",
                   "student:linear:reflow:2": "skipped (would not finish within the budget)"}


def test_plan_orders_each_rows_inputs_before_it(bench, tmp_path):
    cfg = bench.fm.BenchConfig.dry_run()
    rows = [("linear", "reflow", 1), ("linear", "start", 1), ("sd", "start", 0), ("linear", "start-uniform-t", 1)]
    jobs = bench.plan_jobs(tmp_path, cfg, bench.PARTS, ["linear", "sd"], rows)
    names = [j.name for j in jobs]
    assert names == ["reference:linear", "student:linear:reflow:1", "pool:linear:start", "student:linear:start:1",
                     "teacher:sd", "reference:sd", "pool:sd:start", "student:sd:start:0",
                     "student:linear:start-uniform-t:1"]
    by = {j.name: j for j in jobs}
    assert by["student:linear:start-uniform-t:1"].deps == ["pool:linear:start"]  # shares start's pool
    assert by["student:sd:start:0"].deps == ["teacher:sd", "pool:sd:start"]
    assert by["student:linear:reflow:1"].deps == []  # it waits for the reference only to score
    with pytest.raises(bench.RayflowError, match="teacher-sd"):
        bench.plan_jobs(tmp_path, cfg, ("students",), ["sd"], [("sd", "start", 0)])


def test_rows_option_and_merge(bench):
    assert bench.parse_rows("linear:start:1, sd:reflow:0", ["linear", "sd"]) == [
        ("linear", "start", 1), ("sd", "reflow", 0)]
    for bad, message in (("linear:start", "TEACHER:READING:SEED"), ("linear:magic:0", "unknown reading"),
                         ("cosine:start:0", "not among --teachers")):
        with pytest.raises(bench.RayflowError, match=message):
            bench.parse_rows(bad, ["linear", "sd"])
    old = [{"teacher": "linear", "reading": "start", "seed": 0, "nfe": 1, "fd": 1.0},
           {"teacher": "linear", "reading": "start", "seed": 1, "nfe": 1, "fd": 9.0}]
    new = [{"teacher": "linear", "reading": "start", "seed": 1, "nfe": 1, "fd": 2.0}]
    assert bench.merge_rows(new, old) == [old[0], new[0]]


def test_a_workers_command_carries_the_students_compile_mode_and_the_fd_view(bench, tmp_path):
    import argparse

    args = argparse.Namespace(data="D", out=str(tmp_path), threads=1, sd_init="linear", teacher="T", tiny=True,
                              allow_cpu=True, steps=None, teacher_steps=None, student_compile_mode=None,
                              fd_view="multilayer")
    job = bench.Job("student", "linear", "start", 0)
    cmd = bench.worker_command(args, job)
    assert "--student-compile-mode" not in cmd and cmd[cmd.index("--fd-view") + 1] == "multilayer"
    args.student_compile_mode = "reduce-overhead"
    cmd = bench.worker_command(args, job)
    assert cmd[cmd.index("--student-compile-mode") + 1] == "reduce-overhead"
    assert bench._config(args).student_compile_mode == "reduce-overhead"


def test_merge_refuses_rows_scored_with_another_network_or_view(bench):
    def row(seed, net="net-a", view="early"):
        r = {"teacher": "linear", "reading": "start", "seed": seed, "nfe": 1, "fd": 1.0, "feature_net": net}
        return {**r, "feature_view": view} if view is not None else r

    assert len(bench.merge_rows([row(1)], [row(0), row(1)])) == 2  # same metric: seed 0 kept, seed 1 replaced
    with pytest.raises(bench.RayflowError, match="not comparable"):
        bench.merge_rows([row(1)], [row(0, view="multilayer")])
    with pytest.raises(bench.RayflowError, match="not comparable"):
        bench.merge_rows([row(1)], [row(0, net="net-b")])
    # rows from before feature_view (BENCHMARKS section 7) were scored with the multi-layer view
    assert len(bench.merge_rows([row(1, view="multilayer")], [row(0, view=None)])) == 2
    with pytest.raises(bench.RayflowError, match="not comparable"):
        bench.merge_rows([row(1)], [row(0, view=None)])
