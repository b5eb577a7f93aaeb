"""2-Rectified Flow / InstaFlow: the flow view of an epsilon network is exact, Euler on it is DDIM, and a short
distillation beats DDIM at 1, 2 and 4 NFE; the CLI path and its refusals."""

from __future__ import annotations

import json

import pytest
import torch

from rayflow.cli import main as cli
from rayflow.distillation import distill, load_generator
from rayflow.gmm import ExactTeacher, GaussianMixture
from rayflow.methods import get_method
from rayflow.methods.reflow import FlowStudent, euler_flow, flow_timesteps, vp_point
from rayflow.metrics import sliced_wasserstein
from rayflow.models import ModelConfig
from rayflow.samplers import ddim, make_timesteps
from rayflow.schedules import VPSchedule
from rayflow.training import TrainConfig

MOG = "mog:dim=8,modes=6,std=0.2,seed=3"


@pytest.mark.parametrize("schedule", [VPSchedule.linear(1000), VPSchedule.scaled_linear(1000)])
def test_flow_view_of_the_exact_teacher_is_the_exact_flow_velocity(schedule):
    mix = GaussianMixture.from_options(dim=8, modes=6, std=0.2, seed=3)
    flow = FlowStudent(ExactTeacher(mix, schedule), schedule)
    x = torch.randn(32, 8, dtype=torch.float64) * 1.3
    tested = 0
    for tau in (0.05, 0.3, 0.5, 0.7, 0.9, 0.95):
        taus = torch.full((32,), tau, dtype=torch.float64)
        r = ((1 - taus) ** 2 + taus**2).sqrt()
        a, s = (1 - taus) / r, taus / r  # x_tau / r = a x0 + s eps, a VP point with the same (x0, eps)
        if not float(schedule.alphas_cumprod[-1]) < float(a[0] ** 2) < float(schedule.alphas_cumprod[0]):
            continue  # outside the teacher's table (scaled_linear: tau = 0.95); the conversion clamps there
        tested += 1
        eps = mix.posterior_eps(x / r[:, None], a, s)
        x0 = (x / r[:, None] - s[:, None] * eps) / a[:, None]
        u = flow(x, taus * 1000 - 1)
        # exact up to the float32 timestep the Denoiser convention passes to the teacher
        torch.testing.assert_close(u, eps - x0, rtol=1e-6, atol=1e-6)
    assert tested >= 5


def test_euler_on_the_flow_view_is_ddim_on_the_matching_grid():
    sched = VPSchedule.linear(1000)
    teacher = ExactTeacher(GaussianMixture.from_options(dim=8, modes=6, std=0.2, seed=3), sched)
    flow = FlowStudent(teacher, sched)
    tau = torch.linspace(0.97, 0.0, 5, dtype=torch.float64)  # alpha_bar(tau = 0.97) is inside the table
    grid = tau * 1000 - 1
    _, t_vp, a, s = vp_point(tau, sched)
    t_vp[-1] = -1.0  # tau = 0 is clean data
    x_vp = torch.randn(64, 8, dtype=torch.float64)
    r0 = float(((1 - tau[0]) ** 2 + tau[0] ** 2).sqrt())
    out = euler_flow(flow, x_vp * r0, grid, 1000)
    torch.testing.assert_close(out, ddim(teacher, x_vp, t_vp, sched), rtol=1e-6, atol=1e-6)
    # one step from pure noise (tau = 1, the teacher at its noisiest timestep) is DDIM's one step
    noise = torch.randn(64, 8, dtype=torch.float64)
    torch.testing.assert_close(euler_flow(flow, noise, flow_timesteps(1, 1000), 1000),
                               ddim(teacher, noise, make_timesteps(1, 1000), sched))


def _sw(x, truth):
    return sliced_wasserstein(x, truth, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reflow")
    method = get_method("reflow").from_options({"pool_size": "2048", "pair_steps": "10"})
    student = ModelConfig(kind="mlp", sample_shape=(8,), num_classes=6, hidden=64, depth=2)
    train = TrainConfig(max_steps=300, batch_size=256, lr=3e-3, ema_decay=0.99, checkpoint_every=0, progress=False)
    result = distill(method, "exact", MOG, out, train, student_model=student, progress=False)
    torch.set_num_threads(threads)
    return method, result, out


def test_short_distillation_beats_ddim_at_1_2_4_nfe(short_run):
    method, result, out = short_run
    assert method.config.parameterization == "flow"
    sched = VPSchedule.linear(1000)
    mix = GaussianMixture.from_options(dim=8, modes=6, std=0.2, seed=3)
    teacher = ExactTeacher(mix, sched, conditional=True)
    labels = torch.arange(3000) % 6
    noise = torch.randn(3000, 8, generator=torch.Generator().manual_seed(1))
    truth, _ = mix.sample(3000, torch.Generator().manual_seed(2), labels)
    gen = load_generator(model=str(out))
    for nfe in (1, 2, 4):
        student = _sw(gen.generate(noise, nfe, cond=labels), truth)
        baseline = _sw(ddim(teacher, noise, make_timesteps(nfe, 1000), sched, labels), truth)
        assert student < 0.9 * baseline, (nfe, student, baseline)
    assert result.teacher_nfe == 2048 * 10 == result.logs["teacher_nfe_this_run"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["teacher_nfe"] == 2048 * 10 and saved["model"]["prediction_type"] == "flow"


def test_one_step_distillation_runs_and_reports_costs(tmp_path, one_thread):
    method = get_method("reflow").from_options({"pool_size": "256", "pair_steps": "4", "one_step_distill": "1",
                                                "distill_num_pairs": "128", "distill_pair_steps": "3"})
    student = ModelConfig(kind="mlp", sample_shape=(8,), num_classes=6, hidden=32, depth=1)
    train = TrainConfig(max_steps=10, batch_size=32, lr=1e-3, ema_decay=0, checkpoint_every=0, progress=False)
    result = distill(method, "exact", MOG, tmp_path, train, student_model=student, progress=False)
    assert result.teacher_nfe == 256 * 4 and result.logs["student_pair_nfe"] == 128 * 3
    steps = [json.loads(x)["train"]["max_steps"] for x in
             [(tmp_path / "stages" / "2-rectified-flow" / "config.json").read_text(),
              (tmp_path / "config.json").read_text()]]
    assert steps == [5, 5]  # --max-steps is the total, split between reflow and the one-step stage
    x = load_generator(model=str(tmp_path)).generate(torch.randn(10, 8), 1)
    assert torch.isfinite(x).all()


def test_cache_from_another_teacher_is_refused_by_the_cli(tmp_path, capsys, one_thread):
    base = ["distill", "--method", "reflow", "--teacher", "exact", "--data", MOG, "--max-steps", "2",
            "--batch-size", "16", "--no-progress", "--cache", str(tmp_path / "cache"),
            "--option", "pool_size=64", "--option", "pair_steps=2"]
    assert cli([*base, "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert cli([*base, "--out", str(tmp_path / "b")]) == 0  # same teacher: the cache is reused
    assert "128 teacher evaluations" in capsys.readouterr().out  # ... and still reports what the pairs cost
    code = cli([*base, "--out", str(tmp_path / "c"), "--schedule", "scaled_linear"])  # another exact teacher
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "cache was built with teacher=" in err and "use another --cache directory" in err
