"""ProReflow: the aligned loss and its gradient, presets and window merging, stage chaining with student-made
pairs, the ablations' relation to PeRFlow, refusals, and a short distillation that beats DDIM."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rayflow import pairs as P
from rayflow.cli import main as cli
from rayflow.data import load_dataset
from rayflow.distillation import distill, load_generator
from rayflow.errors import RayflowError
from rayflow.gmm import ExactTeacher, GaussianMixture
from rayflow.losses import aligned_velocity_loss
from rayflow.methods import get_method
from rayflow.methods.base import CountingDenoiser
from rayflow.methods.perflow import WindowObjective, WindowPoint, native_target, piecewise_solve
from rayflow.methods.proreflow import ProReflow, ProReflowConfig, stage_split
from rayflow.metrics import sliced_wasserstein
from rayflow.models import ModelConfig
from rayflow.samplers import ddim
from rayflow.schedules import VPSchedule
from rayflow.training import TrainConfig

MOG = "mog:dim=8,modes=6,std=0.2,seed=3"


# ---------------------------------------------------------------------- aligned v-prediction
@pytest.mark.parametrize("alpha", [0.0, 0.5, 3.0])
def test_aligned_loss_gradient_matches_finite_differences(alpha):
    torch.manual_seed(0)
    v_pred = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    v_star = torch.randn(5, 3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: aligned_velocity_loss(v, v_star, alpha)[0], (v_pred,), eps=1e-6,
                                    atol=1e-7)
    # and against the closed form: d/dv [|v - v*|^2 / d + alpha (1 - v.v* / |v||v*|)]
    loss = aligned_velocity_loss(v_pred, v_star, alpha)[0].sum()
    (grad,) = torch.autograd.grad(loss, v_pred)
    v, w = v_pred.detach().reshape(5, -1), v_star.reshape(5, -1)
    nv, nw = v.norm(dim=1, keepdim=True), w.norm(dim=1, keepdim=True)
    cos = (v * w).sum(1, keepdim=True) / (nv * nw)
    ref = 2 * (v - w) / v.shape[1] - alpha * (w / (nv * nw) - cos * v / nv**2)
    torch.testing.assert_close(grad.reshape(5, -1), ref)


def test_aligned_loss_separates_direction_from_magnitude():
    v_star = torch.randn(4, 6, dtype=torch.float64)
    loss, diag = aligned_velocity_loss(2.0 * v_star, v_star, alpha=0.7)  # right direction, twice the norm
    torch.testing.assert_close(diag["cos"], torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(diag["norm_ratio"], torch.full((4,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(loss, v_star.square().mean(1))  # only the MSE remains
    ortho = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    loss, diag = aligned_velocity_loss(ortho, torch.tensor([[0.0, 1.0]], dtype=torch.float64), alpha=0.7)
    assert float(diag["cos"]) == 0.0 and abs(float(loss) - (1.0 + 0.7)) < 1e-12


@pytest.mark.parametrize("parameterization", ["diff_eps", "ddim_eps", "velocity"])
def test_conversion_is_exact_on_a_straight_window(parameterization):
    """A student that outputs the chord's target has zero aligned loss, cosine 1 and norm ratio 1 anywhere on the
    window (one pool item, so every row of the batch is the same chord)."""
    sched = VPSchedule.linear(1000)
    b = P.window_boundaries(4, 1000)
    z_s, z_e = torch.randn(1, 8), torch.randn(1, 8)
    pool = P.Pairs({"window": torch.tensor([1]), "z_start": z_s, "z_end": z_e}, 0, 0)
    where = WindowPoint(b[1:2], b[1:2], b[2:3], 1000)
    target = native_target(z_s.double(), z_e.double(), where, sched, parameterization).float()

    class Oracle(torch.nn.Module):
        def forward(self, x, t, cond=None):
            return target.expand_as(x)

    objective = WindowObjective(pool, b, sched, 64, parameterization, loss_space="velocity", alpha=1.0)
    out = objective(Oracle(), 0, torch.Generator().manual_seed(0))
    assert float(out.loss) < 1e-6  # float32 pairs
    assert abs(out.logs["cos"] - 1) < 1e-6 and abs(out.logs["norm_ratio"] - 1) < 1e-5


# ---------------------------------------------------------------------- stages and presets
def test_presets_and_window_schedules():
    assert ProReflowConfig(preset="I").windows == (8, 4)
    assert ProReflowConfig(preset="proreflow-ii").windows == (8, 4, 2)
    assert ProReflow.from_options({"preset": "II"}).config.windows == (8, 4, 2)
    assert ProReflow.from_options({"windows": "16,8,4"}).stages() == [16, 8, 4]
    assert ProReflow.from_options({"preset": "I", "progressive": "0"}).stages() == [4]
    assert ProReflow.from_options({"preset": "II"}).nfes == (2, 4)
    with pytest.raises(RayflowError, match="give preset or windows, not both"):
        ProReflow.from_options({"preset": "I", "windows": "8,4"})
    with pytest.raises(RayflowError, match="unknown preset"):
        ProReflow.from_options({"preset": "III"})
    with pytest.raises(RayflowError, match="stage 2 has 3 windows, which does not divide stage 1's 8 windows"):
        ProReflow.from_options({"windows": "8,3"})
    assert stage_split(1000, 3, "equal") == [333, 333, 334]
    assert stage_split(1000, 2, "3,1") == [750, 250]
    with pytest.raises(RayflowError, match="stage_split"):
        stage_split(1000, 2, "1,1,1")


def test_student_pairs_over_merged_windows_are_the_previous_students_solve():
    """Stage-2 pairs: noised data at a 4-window start, solved by the stage-1 (8-window) student with one step per
    old window. With the exact teacher as a ddim_eps 'student' that solve is DDIM through the old boundary."""
    sched = VPSchedule.linear(1000)
    ds = load_dataset(MOG + ",n=400")
    teacher = ExactTeacher(ds.mixture, sched, conditional=True)
    b8, b4 = P.check_stage_windows((8, 4), 1000)
    method = ProReflow(ProReflowConfig(windows=(8, 4), parameterization="epsilon", student_steps_per_window=1))
    solve, counter = method._student_solver(teacher, b8, sched)
    pool = P.window_pairs(solve, counter, ds, sched, b4, 32, num_classes=6, seed=2)
    k = pool["window"]
    grid = torch.stack([b4[k], b8[2 * k + 1], b4[k + 1]], 1)  # start, the old boundary inside, end
    torch.testing.assert_close(pool["z_end"], ddim(teacher, pool["z_start"], grid, sched, pool["labels"]).float())
    ref = piecewise_solve(teacher, pool["z_start"], grid, b8, sched, "ddim_eps", pool["labels"])
    torch.testing.assert_close(pool["z_end"], ref.float())
    assert pool.nfe == 32 * 2  # two previous-stage evaluations per pair


def _tiny(steps=6, **extra):
    student = ModelConfig(kind="mlp", sample_shape=(8,), num_classes=6, hidden=32, depth=1)
    train = TrainConfig(max_steps=steps, batch_size=32, lr=1e-3, ema_decay=0, checkpoint_every=0, progress=False)
    return dict(student_model=student, progress=False, **extra), train


def test_stages_chain_and_record_what_made_their_pairs(tmp_path, one_thread):
    kw, train = _tiny(steps=9)
    method = ProReflow.from_options({"preset": "II", "pool_size": "64", "solver_steps": "2"})
    result = distill(method, "exact", MOG, tmp_path, train, **kw)
    s1 = json.loads((tmp_path / "stages" / "stage-1-w8" / "config.json").read_text())
    s2 = json.loads((tmp_path / "stages" / "stage-2-w4" / "config.json").read_text())
    s3 = json.loads((tmp_path / "config.json").read_text())
    assert [s["stage_windows"] for s in (s1, s2, s3)] == [8, 4, 2]
    assert [s["stage_pair_source"] for s in (s1, s2, s3)] == ["teacher", "student", "student"]
    assert [s["train"]["max_steps"] for s in (s1, s2, s3)] == [3, 3, 3]  # --max-steps is the total
    assert s1["method"]["config"]["windows"] == [8] and s2["method"]["config"]["windows"] == [8, 4]
    assert result.teacher_nfe == 64 * 2 == s3["teacher_nfe"]  # only stage 1 asks the teacher
    assert s2["stage_pair_nfe"] == s3["stage_pair_nfe"] == 64 * 4  # the previous student: 2 steps per old window
    # every stage directory is a sampler of its own windows
    for d, k in ((tmp_path / "stages" / "stage-1-w8", 8), (tmp_path / "stages" / "stage-2-w4", 4), (tmp_path, 2)):
        gen = load_generator(model=str(d))
        assert gen.method.config.windows[-1] == k
        assert torch.isfinite(gen.generate(torch.randn(5, 8), k)).all()
    # resuming from stage 3 reuses stages 1-2 and still reports stage 1's teacher cost
    again = ProReflow.from_options({"preset": "II", "pool_size": "64", "solver_steps": "2", "start_stage": "3"})
    assert distill(again, "exact", MOG, tmp_path, train, **kw).teacher_nfe == 64 * 2


def test_without_both_is_perflow(tmp_path, one_thread):
    kw, train = _tiny(steps=5)
    pro = distill(ProReflow.from_options({"preset": "I", "progressive": "0", "aligned": "0", "pool_size": "64"}),
                  "exact", MOG, tmp_path / "pro", train, **kw)
    per = distill(get_method("perflow").from_options({"windows": "4", "solver_steps": "8", "pool_size": "64"}),
                  "exact", MOG, tmp_path / "per", train, **kw)
    assert pro.teacher_nfe == per.teacher_nfe == 64 * 8
    for (name, a), b in zip(pro.student.state_dict().items(), per.student.state_dict().values()):
        assert torch.equal(a, b), name


def test_missing_previous_stage_is_a_one_line_error(tmp_path, capsys):
    code = cli(["distill", "--method", "proreflow", "--teacher", "exact", "--data", MOG, "--out", str(tmp_path),
                "--max-steps", "4", "--no-progress", "--option", "preset=II", "--option", "start_stage=2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "stage 2 (4 windows) starts from stage 1's model" in err and "stage-1-w8/model.safetensors" in err
    code = cli(["distill", "--method", "proreflow", "--teacher", "exact", "--data", MOG, "--out", str(tmp_path),
                "--option", "windows=8,3"])
    assert code == 2 and "does not divide stage 1's 8 windows" in capsys.readouterr().err
    code = cli(["distill", "--method", "proreflow", "--teacher", "exact", "--data", MOG, "--out", str(tmp_path),
                "--option", "windows=6,3"])
    assert code == 2 and "6 windows do not divide the schedule's 1000 timesteps" in capsys.readouterr().err


def test_stage_cache_from_another_previous_stage_is_refused(tmp_path, one_thread):
    kw, train = _tiny(steps=4)
    opts = {"preset": "I", "pool_size": "32", "solver_steps": "1"}
    distill(ProReflow.from_options(opts), "exact", MOG, tmp_path / "a", train, cache_dir=tmp_path / "c", **kw)
    train.seed = 1  # another stage-1 student, so stage 2's cached pairs no longer match it
    with pytest.raises(RayflowError, match="cache was built with"):
        distill(ProReflow.from_options(opts), "exact", MOG, tmp_path / "b", train, cache_dir=tmp_path / "c", **kw)


# ---------------------------------------------------------------------- quality
def test_short_distillation_beats_ddim_at_4_nfe(tmp_path, one_thread):
    student = ModelConfig(kind="mlp", sample_shape=(8,), num_classes=6, hidden=64, depth=2)
    train = TrainConfig(max_steps=600, batch_size=256, lr=3e-3, ema_decay=0.99, checkpoint_every=0, progress=False)
    method = ProReflow.from_options({"preset": "I", "pool_size": "2048", "solver_steps": "2"})
    result = distill(method, "exact", MOG, tmp_path, train, student_model=student, progress=False)
    sched = VPSchedule.linear(1000)
    mix = GaussianMixture.from_options(dim=8, modes=6, std=0.2, seed=3)
    teacher = CountingDenoiser(ExactTeacher(mix, sched, conditional=True))
    labels = torch.arange(3000) % 6
    noise = torch.randn(3000, 8, generator=torch.Generator().manual_seed(1))
    truth, _ = mix.sample(3000, torch.Generator().manual_seed(2), labels)
    sw = lambda x: sliced_wasserstein(x, truth, generator=torch.Generator().manual_seed(0))  # noqa: E731
    student_sw = sw(load_generator(model=str(tmp_path)).generate(noise, 4, cond=labels))
    baseline = sw(ddim(teacher, noise, torch.tensor([999.0, 749, 499, 249, -1]), sched, labels))
    assert student_sw < 0.9 * baseline, (student_sw, baseline)
    assert result.teacher_nfe == 2048 * 2


@pytest.mark.parametrize("method,options", [
    ("reflow", ["pair_steps=3"]), ("perflow", ["solver_steps=2"]), ("rectified-diffusion", ["pair_steps=3"]),
    ("rectified-diffusion", ["phased=1", "phase_steps=2"]), ("proreflow", ["preset=II", "solver_steps=1"]),
])
def test_cli_distill_then_sample_round_trip(tmp_path, capsys, one_thread, method, options):
    opts = [x for o in ["pool_size=64", *options] for x in ("--option", o)]
    code = cli(["distill", "--method", method, "--teacher", "exact", "--data", MOG, "--out", str(tmp_path / "s"),
                "--max-steps", "6", "--batch-size", "16", "--no-progress", *opts])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "s" / "config.json").read_text())
    assert saved["method"]["name"] == method and saved["teacher_nfe"] > 0
    assert saved["method"]["config"].get("parameterization") != "auto"  # resolved before it was saved
    assert cli(["sample", "--model", str(tmp_path / "s"), "--steps", "2", "--num", "12",
                "--out", str(tmp_path / "x.npz")]) == 0
    x = np.load(tmp_path / "x.npz")["x"]
    assert x.shape == (12, 8) and np.isfinite(x).all()
