"""Rectified Diffusion: the first-order path and implied noise are exact, pseudo-Huber is what the code computes,
and short distillations (plain and phased) beat DDIM at the same NFE."""

from __future__ import annotations

import pytest
import torch

from rayflow import pairs as P
from rayflow.cli import main as cli
from rayflow.distillation import distill, load_generator
from rayflow.gmm import ExactTeacher, GaussianMixture
from rayflow.losses import pseudo_huber
from rayflow.methods import get_method
from rayflow.methods.base import CountingDenoiser
from rayflow.methods.rectified_diffusion import PhasedObjective, first_order_step, implied_noise
from rayflow.metrics import sliced_wasserstein
from rayflow.models import ModelConfig
from rayflow.samplers import ddim, make_timesteps
from rayflow.schedules import VPSchedule
from rayflow.training import TrainConfig

MOG = "mog:dim=8,modes=6,std=0.2,seed=3"


def test_first_order_path_through_two_points_is_exact():
    sched = VPSchedule.scaled_linear(1000)
    x_s, x_e = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    t_s, t_e = torch.full((8,), 749.0), torch.full((8,), 499.0)
    eps = implied_noise(x_s, x_e, t_s, t_e, sched)
    torch.testing.assert_close(first_order_step(x_s, eps, t_s, t_e, sched), x_e)
    for t in (700.0, 600.0, 500.0):  # Eq. 2 composes: any point of the path jumps to the same end
        tt = torch.full((8,), t)
        x_t = first_order_step(x_s, eps, t_s, tt, sched)
        torch.testing.assert_close(first_order_step(x_t, eps, tt, t_e, sched), x_e)
    # to data (t = -1, a = 1, sigma = 0): x0 = x_t / a_t - eps sigma_t, the DDIM x0 prediction
    x0 = first_order_step(x_s, eps, t_s, torch.full((8,), -1.0), sched)
    a, s = sched.a(t_s)[:, None], sched.s(t_s)[:, None]
    torch.testing.assert_close(x0, (x_s - s * eps) / a)


def test_pseudo_huber_is_the_elementwise_formula():
    pred, target = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    c = 0.3
    ref = (((pred - target) ** 2 + c * c).sqrt() - c).mean(1)
    torch.testing.assert_close(pseudo_huber(pred, target, c), ref)
    small = torch.full((1, 3), 1e-4, dtype=torch.float64)
    torch.testing.assert_close(pseudo_huber(small, torch.zeros_like(small), 1.0), torch.tensor([0.5e-8],
                               dtype=torch.float64))  # quadratic below c
    big = torch.full((1, 3), 100.0, dtype=torch.float64)
    assert abs(float(pseudo_huber(big, torch.zeros_like(big), 1e-3)) - 100.0) < 1e-2  # absolute above c


def test_phased_objective_is_zero_for_the_implied_noise():
    sched = VPSchedule.linear(1000)
    mix = GaussianMixture.from_options(dim=8, modes=6, std=0.2, seed=3)
    from rayflow.data import load_dataset

    ds = load_dataset(MOG + ",n=500,conditional=0")
    teacher = CountingDenoiser(ExactTeacher(mix, sched))
    b = P.window_boundaries(4, 1000)
    pool = P.window_pairs(P.teacher_window_solver(teacher, sched, "ddim", 3), teacher, ds, sched, b, 64)

    class Oracle(torch.nn.Module):  # returns, for the batch it is asked about, the implied noise of its pairs
        prediction_type = "epsilon"

        def forward(self, x, t, cond=None):
            return self.eps

    objective = PhasedObjective(pool, b, sched, batch_size=64, loss="mse")
    oracle = Oracle()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 64, (64,), generator=torch.Generator().manual_seed(0))
    k = pool["window"][idx]
    oracle.eps = implied_noise(pool["z_start"][idx], pool["z_end"][idx], b[k], b[k + 1], sched).float()
    assert float(objective(oracle, 0, g).loss) < 1e-9


def _sw(x, truth):
    return sliced_wasserstein(x, truth, generator=torch.Generator().manual_seed(0))


def _run(tmp_path_factory, name, options, schedule):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp(name)
    method = get_method("rectified-diffusion").from_options(options)
    student = ModelConfig(kind="mlp", sample_shape=(8,), num_classes=6, hidden=64, depth=2)
    train = TrainConfig(max_steps=300, batch_size=256, lr=3e-3, ema_decay=0.99, checkpoint_every=0, progress=False)
    result = distill(method, "exact", MOG, out, train, student_model=student, progress=False, schedule_name=schedule)
    torch.set_num_threads(threads)
    return result, out


# plain: DDPM's linear teacher with the default (scaled-linear) student schedule; phased: it keeps the teacher's
# schedule, so it runs on Stable Diffusion's, the one it was made for (on DDPM's linear schedule a fresh epsilon
# student cannot learn the noisiest phase in this budget: docs/proreflow.md)
@pytest.mark.parametrize("options,schedule", [({"pool_size": "2048", "pair_steps": "10"}, "linear"),
                                              ({"pool_size": "2048", "phased": "1", "phase_steps": "4"},
                                               "scaled_linear")], ids=["plain", "phased"])
def test_short_distillation_beats_ddim_at_4_nfe(tmp_path_factory, options, schedule):
    result, out = _run(tmp_path_factory, "rd", options, schedule)
    assert load_generator(model=str(out)).method.config.student_schedule == (
        "teacher" if "phased" in options else "scaled_linear")
    sched = VPSchedule.from_name(schedule)
    nfes = (4,)
    mix = GaussianMixture.from_options(dim=8, modes=6, std=0.2, seed=3)
    teacher = ExactTeacher(mix, sched, conditional=True)
    labels = torch.arange(3000) % 6
    noise = torch.randn(3000, 8, generator=torch.Generator().manual_seed(1))
    truth, _ = mix.sample(3000, torch.Generator().manual_seed(2), labels)
    gen = load_generator(model=str(out))
    for nfe in nfes:
        student = _sw(gen.generate(noise, nfe, cond=labels), truth)
        baseline = _sw(ddim(teacher, noise, make_timesteps(nfe, 1000), sched, labels), truth)
        assert student < 0.9 * baseline, (nfe, student, baseline)
    per_pair = 4 if "phased" in options else 10
    assert result.teacher_nfe == 2048 * per_pair


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    code = cli(["distill", "--method", "rectified-diffusion", "--teacher", "exact", "--data", MOG, "--out",
                str(tmp_path), "--max-steps", "1", "--no-progress", "--option", "phased=1", "--option", "phases=7"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "7 windows do not divide the schedule's 1000 timesteps" in err and err.count("\n") == 0
    code = cli(["distill", "--method", "rectified-diffusion", "--teacher", "exact", "--data", MOG, "--out",
                str(tmp_path), "--option", "phased=1", "--option", "student_schedule=linear"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "phased variant keeps the teacher's schedule" in err
