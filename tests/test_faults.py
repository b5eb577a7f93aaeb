"""Faults: concurrent cache writers, two runs on one --out, orphan temporary files, file modes, seeded
initialisation, and kill -9 at random points followed by the same command (slow)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from rayflow.caches import ShardedCache, build_or_load, meta_fingerprint
from rayflow.checkpoint import (
    DirectoryLock,
    RunDirectory,
    check_not_finished_elsewhere,
    remove_orphan_tmp_files,
    write_json_atomic,
)
from rayflow.errors import RayflowError

SRC = str(Path(__file__).resolve().parents[1] / "src")


# ---------------------------------------------------------------------- two processes, one cache
def _fill(root: str, steps: int, barrier, results) -> None:
    """One 'run': a cache whose content depends on its setting ``steps`` (like RayFlow's teacher_steps)."""
    def make(index, start, count, g):
        time.sleep(0.02)  # widen the window in which the other process could interleave
        return {"v": torch.full((count, 2), float(steps))}

    barrier.wait()
    try:
        build_or_load(root, {"teacher_steps": steps}, 64, make, shard_size=8, progress=False)
        results.put((steps, "ok"))
    except RayflowError as exc:
        results.put((steps, f"refused: {exc}"))


@pytest.mark.parametrize("trial", range(3))
def test_two_processes_one_cache_different_settings(tmp_path, trial):
    ctx = mp.get_context("fork")
    root = tmp_path / "cache"
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_fill, args=(str(root), s, barrier, results)) for s in (20, 10)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    outcome = dict(results.get(timeout=5) for _ in procs)
    ok = [s for s, r in outcome.items() if r == "ok"]
    assert len(ok) == 1 or not ok, outcome  # exactly one succeeds, or both refuse
    refused = [r for r in outcome.values() if r != "ok"]
    assert all("cache was built with teacher_steps" in r for r in refused), outcome
    meta = json.loads((root / "meta.json").read_text())
    fp = meta_fingerprint(meta)
    shards = sorted(root.glob("shard-*.safetensors"))
    assert shards
    for path in shards:  # no shard ever disagrees with its meta
        with safe_open(str(path), "pt") as f:
            assert f.metadata()["fingerprint"] == fp
            assert float(f.get_tensor("v")[0, 0]) == meta["teacher_steps"]


def test_reader_refuses_a_shard_of_other_settings(tmp_path):
    def make(value):
        return lambda i, s, c, g: {"v": torch.full((c, 1), value)}

    build_or_load(tmp_path, {"k": 1}, 16, make(1.0), shard_size=8, progress=False)
    other = tmp_path / "other"
    build_or_load(other, {"k": 2}, 16, make(2.0), shard_size=8, progress=False)
    os.replace(other / "shard-00001.safetensors", tmp_path / "shard-00001.safetensors")  # a foreign shard
    with pytest.raises(RayflowError, match="other settings"):
        ShardedCache(tmp_path, {"k": 1}, 16, 8).load()
    with pytest.raises(RayflowError, match="other settings"):  # and building never silently reuses it
        build_or_load(tmp_path, {"k": 1}, 16, make(1.0), shard_size=8, progress=False)


def test_unfingerprinted_shard_is_recomputed(tmp_path):
    from rayflow.checkpoint import save_safetensors_atomic

    build_or_load(tmp_path, {"k": 1}, 8, lambda i, s, c, g: {"v": torch.ones(c, 1)}, shard_size=8, progress=False)
    save_safetensors_atomic({"v": torch.zeros(8, 1)}, tmp_path / "shard-00000.safetensors")  # an old-format shard
    out = build_or_load(tmp_path, {"k": 1}, 8, lambda i, s, c, g: {"v": torch.ones(c, 1)}, shard_size=8,
                        progress=False)
    assert torch.equal(out["v"], torch.ones(8, 1))


# ---------------------------------------------------------------------- run directories
def _hold_lock(path: str, ready, release) -> None:
    with DirectoryLock(path):
        ready.set()
        release.wait(30)


def test_second_run_on_one_out_refused(tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    p.start()
    try:
        assert ready.wait(30)
        with pytest.raises(RayflowError, match="another rayflow run"):
            RunDirectory(tmp_path).__enter__()
    finally:
        release.set()
        p.join(30)
    with RunDirectory(tmp_path):  # free again once the holder is gone
        pass


def test_finished_model_without_checkpoints_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(RayflowError, match="finished model"):
        check_not_finished_elsewhere(tmp_path)
    (tmp_path / "checkpoints" / "step-0000010").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-0000010" / "state.json").write_text("{}")
    check_not_finished_elsewhere(tmp_path)  # resumable: left to the trainer's configuration check


def test_orphan_tmp_files_removed_only_when_their_process_is_gone(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f".latest.{dead.pid}.abc123.tmp"
    live = tmp_path / f".latest.{os.getpid()}.xyz789.tmp"
    other = tmp_path / ".notes.tmp"
    for p in (orphan, live, other):
        p.write_text("x")
    assert remove_orphan_tmp_files(tmp_path) == [orphan]
    assert not orphan.exists() and live.exists() and other.exists()


def test_atomic_writes_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic({"a": 1}, tmp_path / "a.json")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        write_json_atomic({"a": 1}, tmp_path / "b.json")
        assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_teacher_initialisation_follows_the_seed(tmp_path):
    from rayflow.distillation import seeded_build
    from rayflow.models import default_model_config

    cfg = default_model_config((2,), 4)
    a, b, c = seeded_build(cfg, 0), seeded_build(cfg, 0), seeded_build(cfg, 1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


# ---------------------------------------------------------------------- kill -9, then the same command
MOG = "mog:dim=2,modes=4,std=0.1,seed=1,n=512"


def _cmd(*argv: str) -> list[str]:
    return [sys.executable, "-m", "rayflow.cli", *argv]


def _run_killed(argv: list[str], watch: Path, pattern: str, env: dict) -> None:
    """Start ``argv``, SIGKILL it as soon as ``watch`` holds a file matching ``pattern``, then let it be."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if watch.exists() and any(watch.glob(pattern)):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()


def _weights(d: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["teacher", "reflow-pairs", "rayflow-eps-mu"])
def test_kill_9_then_same_command_matches_uninterrupted(tmp_path, kind):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if kind == "teacher":
        def argv(out):
            return _cmd("train-teacher", "--data", MOG, "--out", str(out), "--max-steps", "40", "--batch-size", "32",
                        "--checkpoint-every", "10", "--no-progress", "--hidden", "32")
        watch, pattern = "checkpoints", "step-0000010"
    elif kind == "rayflow-eps-mu":
        def argv(out):
            return _cmd("distill", "--method", "rayflow", "--teacher", "exact", "--data", MOG, "--out", str(out),
                        "--cache", str(out.parent / f"cache-{out.name}"), "--max-steps", "10", "--batch-size", "32",
                        "--no-progress", "--option", "cache_size=2048", "--option", "cache_shard_size=256",
                        "--option", "teacher_steps=4", "--checkpoint-every", "5")
        watch, pattern = None, "**/shard-00000.safetensors"
    else:
        def argv(out):
            return _cmd("distill", "--method", "reflow", "--teacher", "exact", "--data", MOG, "--out", str(out),
                        "--cache", str(out.parent / f"cache-{out.name}"), "--max-steps", "10", "--batch-size", "32",
                        "--no-progress", "--option", "num_pairs=2048", "--option", "pair_steps=4",
                        "--checkpoint-every", "5")
        watch, pattern = None, "**/shard-00000.safetensors"
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert subprocess.run(argv(ref), env=env, capture_output=True).returncode == 0
    watch_dir = killed / watch if watch else tmp_path / "cache-killed"
    _run_killed(argv(killed), watch_dir, pattern, env)
    assert not (killed / "model.safetensors").exists(), "the kill came too late to test anything"
    done = subprocess.run(argv(killed), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = _weights(ref), _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
