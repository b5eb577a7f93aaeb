"""Pair machinery: window boundaries and merging, exact pairs, resumable / multi-process caches, refusals."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from rayflow import pairs as P
from rayflow.data import load_dataset
from rayflow.errors import RayflowError
from rayflow.gmm import ExactTeacher, GaussianMixture
from rayflow.methods.base import CountingDenoiser
from rayflow.samplers import ddim, dpm_solver_pp_2m, heun, make_timesteps, window_timesteps
from rayflow.schedules import VPSchedule

MOG = "mog:dim=8,modes=6,std=0.2,seed=3,n=2000"


@pytest.fixture(scope="module")
def setup():
    ds = load_dataset(MOG)
    sched = VPSchedule.linear(1000)
    return ds, sched, ExactTeacher(ds.mixture, sched, conditional=True)


# ---------------------------------------------------------------------- windows
def test_window_boundaries_and_bad_counts():
    assert P.window_boundaries(4, 1000).tolist() == [999, 749, 499, 249, -1]
    assert P.window_boundaries(1, 1000).tolist() == [999, -1]
    with pytest.raises(RayflowError, match="3 windows do not divide the schedule's 1000 timesteps"):
        P.window_boundaries(3, 1000)
    with pytest.raises(RayflowError, match="must be >= 1"):
        P.window_boundaries(0, 1000)


def test_progressive_merging_gives_the_intended_boundaries():
    b8, b4, b2 = P.check_stage_windows((8, 4, 2), 1000)
    assert b8.tolist() == [999, 874, 749, 624, 499, 374, 249, 124, -1]
    assert b4.tolist() == [999, 749, 499, 249, -1]
    assert b2.tolist() == [999, 499, -1]
    # every merged window is the union of whole windows of the previous stage
    assert torch.equal(P.merge_windows(b8, 2), b4) and torch.equal(P.merge_windows(b4, 2), b2)
    assert torch.equal(P.merge_windows(b8, 4), b2)
    with pytest.raises(RayflowError, match="stage 2 has 5 windows, which does not divide stage 1's 8"):
        P.check_stage_windows((8, 5), 1000)
    with pytest.raises(RayflowError, match="does not divide"):
        P.check_stage_windows((4, 8), 1000)


def test_window_index_and_subwindow_grid():
    b = P.window_boundaries(4, 1000)
    t = torch.tensor([999.0, 750.0, 749.0, 500.0, 249.0, 0.0, -1.0])
    assert P.window_index(t, b).tolist() == [0, 0, 1, 1, 3, 3, 3]
    b8 = P.window_boundaries(8, 1000)
    grid = P.subwindow_grid(torch.tensor([999.0, 499.0]), torch.tensor([749.0, 249.0]), b8, 1)
    assert grid.tolist() == [[999, 874, 749], [499, 374, 249]]
    grid = P.subwindow_grid(torch.tensor([249.0]), torch.tensor([-1.0]), b8, 2)
    assert grid.tolist() == [[249, 186.5, 124, 61.5, -1]]


# ---------------------------------------------------------------------- exact pairs
@pytest.mark.parametrize("solver,fn", [("ddim", ddim), ("dpm++2m", dpm_solver_pp_2m), ("heun", heun)])
def test_global_pairs_are_the_teacher_solution(setup, solver, fn):
    ds, sched, teacher = setup
    counter = CountingDenoiser(teacher)
    pool = P.global_pairs(P.teacher_global_solver(counter, sched, solver, 6, guidance=2.0), counter, ds, 40,
                          num_classes=6, label_dropout=0.3, seed=5, batch_size=16, shard_size=16)
    assert set(pool.tensors) == {"noise", "sample", "labels", "nfe"}
    labels = pool["labels"]
    assert 0 < int((labels == 6).sum()) < 40  # some labels dropped to the null label (CFG-sync)
    from rayflow.models.base import with_guidance

    ref = fn(with_guidance(teacher, 2.0), pool["noise"], make_timesteps(6, 1000), sched, labels)
    torch.testing.assert_close(pool["sample"], ref.float())
    per_item = {"ddim": 6, "dpm++2m": 6, "heun": 11}[solver] * 2  # CFG doubles the evaluations
    assert pool.nfe == counter.evaluations == 40 * per_item
    assert pool["nfe"].tolist() == [per_item] * 40


def test_window_pairs_are_noised_data_solved_over_the_window(setup):
    ds, sched, teacher = setup
    b = P.window_boundaries(4, 1000)
    counter = CountingDenoiser(teacher)
    pool = P.window_pairs(P.teacher_window_solver(counter, sched, "ddim", 3), counter, ds, sched, b, 64,
                          num_classes=6, seed=1)
    k = pool["window"]
    assert set(k.tolist()) == {0, 1, 2, 3}
    t_s, t_e = b[k], b[k + 1]
    ref = ddim(teacher, pool["z_start"], window_timesteps(t_s, t_e, 3), sched, pool["labels"])
    torch.testing.assert_close(pool["z_end"], ref.float())
    # z_start is a VP marginal of a real data point: its signal part matches a dataset row of the same label
    assert pool.nfe == 64 * 3 and pool.computed_nfe == 64 * 3


# ---------------------------------------------------------------------- caches
class Killed(Exception):
    pass


def _pool(root, ds, sched, teacher, kill_after=None, rank=0, world=1, barrier=None, num=90):
    counter = CountingDenoiser(teacher)
    solve = P.teacher_window_solver(counter, sched, "ddim", 2)
    calls = {"n": 0}

    def maybe_killed(z, t_s, t_e, cond):
        calls["n"] += 1
        if kill_after is not None and calls["n"] > kill_after:
            raise Killed
        return solve(z, t_s, t_e, cond)

    acc = None if world == 1 else SimpleNamespace(process_index=rank, num_processes=world, wait_for_everyone=barrier)
    return P.window_pairs(maybe_killed, counter, ds, sched, P.window_boundaries(4, 1000), num, num_classes=6,
                          seed=3, cache=root, meta=P.teacher_meta(teacher, solver="ddim", steps=2), shard_size=20,
                          batch_size=7, accelerator=acc), calls


def test_interrupted_generation_resumes_without_duplicates_or_losses(setup, tmp_path):
    ds, sched, teacher = setup
    full, _ = _pool(tmp_path / "full", ds, sched, teacher)
    with pytest.raises(Killed):  # dies inside the third shard (3 batches of 7 per shard of 20)
        _pool(tmp_path / "resumed", ds, sched, teacher, kill_after=7)
    done = sorted(p.name for p in (tmp_path / "resumed").glob("shard-*.safetensors"))
    assert done == ["shard-00000.safetensors", "shard-00001.safetensors"]
    (tmp_path / "resumed" / "shard-00002.safetensors").write_bytes(b"truncated by the kill")
    resumed, calls = _pool(tmp_path / "resumed", ds, sched, teacher)
    assert calls["n"] == 2 * 3 + 2  # only shards 2, 3 (3 batches each) and the short shard 4 (2 batches)
    for key in full.tensors:
        assert torch.equal(full[key], resumed[key]), key
    assert resumed.nfe == full.nfe == 90 * 2  # every item counted once, including the ones read back
    assert resumed.computed_nfe == (90 - 40) * 2
    in_memory, _ = _pool(None, ds, sched, teacher)
    for key in full.tensors:
        assert torch.equal(full[key], in_memory[key]), key


def test_each_process_writes_its_own_shards(setup, tmp_path):
    ds, sched, teacher = setup
    single, _ = _pool(tmp_path / "single", ds, sched, teacher, num=70)
    barrier = threading.Barrier(2)
    results: dict[int, object] = {}

    def worker(rank):
        results[rank] = _pool(tmp_path / "multi", ds, sched, teacher, rank=rank, world=2, barrier=barrier.wait,
                              num=70)[0]

    threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results[0].computed_nfe == 2 * 20 * 2 and results[1].computed_nfe == (20 + 10) * 2  # shards 0,2 | 1,3
    for rank in (0, 1):
        for key in single.tensors:
            assert torch.equal(single[key], results[rank][key]), key


def test_cache_from_another_teacher_is_refused(setup, tmp_path):
    ds, sched, teacher = setup
    _pool(tmp_path / "c", ds, sched, teacher, num=20)
    other = ExactTeacher(GaussianMixture.from_options(dim=8, modes=6, std=0.2, seed=4), sched, conditional=True)
    with pytest.raises(RayflowError, match="cache was built with teacher=.* but this run uses teacher="):
        _pool(tmp_path / "c", ds, sched, other, num=20)
    assert len(_pool(tmp_path / "c", ds, sched, teacher, num=20)[0]) == 20  # the right teacher reuses it
