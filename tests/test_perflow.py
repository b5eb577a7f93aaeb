"""PeRFlow: exact window conversions, the piecewise sampler, a short distillation that beats DDIM, bad input."""

from __future__ import annotations

import pytest
import torch

from rayflow import pairs as P
from rayflow.cli import main as cli
from rayflow.distillation import distill, load_generator
from rayflow.errors import RayflowError
from rayflow.gmm import ExactTeacher, GaussianMixture
from rayflow.methods import get_method
from rayflow.methods.perflow import (
    WindowPoint,
    epsilon_target,
    native_target,
    piecewise_solve,
    piecewise_timesteps,
    window_coefficients,
    window_end_prediction,
    window_velocity,
)
from rayflow.metrics import sliced_wasserstein
from rayflow.models import ModelConfig
from rayflow.samplers import ddim
from rayflow.schedules import VPSchedule
from rayflow.training import TrainConfig

MOG = "mog:dim=8,modes=6,std=0.2,seed=3"


class Oracle(torch.nn.Module):
    """Outputs the target that makes the straight chord from (z_s, t_s) to (z_e, t_e) exact, at any point on it."""

    prediction_type = "epsilon"
    num_classes = 0

    def __init__(self, z_s, z_e, t_s, t_e, schedule, parameterization):
        super().__init__()
        self.where = WindowPoint(torch.full((z_s.shape[0],), float(t_s), dtype=torch.float64),
                                 torch.full((z_s.shape[0],), float(t_s), dtype=torch.float64),
                                 torch.full((z_s.shape[0],), float(t_e), dtype=torch.float64), schedule.T)
        self.target = native_target(z_s, z_e, self.where, schedule, parameterization)

    def forward(self, x, t, cond=None):
        return self.target


@pytest.mark.parametrize("parameterization", ["diff_eps", "ddim_eps", "velocity"])
@pytest.mark.parametrize("schedule", [VPSchedule.linear(1000), VPSchedule.scaled_linear(1000)])
def test_conversions_are_exact_on_a_straight_window(parameterization, schedule):
    torch.manual_seed(0)
    z_s, z_e = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 6, dtype=torch.float64)
    t_s, t_e = 749.0, 499.0
    oracle = Oracle(z_s, z_e, t_s, t_e, schedule, parameterization)
    chord = (z_e - z_s) / ((t_e - t_s) / 1000)
    for t in (749.0, 700.0, 600.5, 500.0):
        where = WindowPoint(torch.full((16,), t, dtype=torch.float64), oracle.where.t_start, oracle.where.t_end, 1000)
        w = (t - t_s) / (t_e - t_s)
        z_t = z_s + (z_e - z_s) * w
        torch.testing.assert_close(window_end_prediction(oracle.target, z_t, where, schedule, parameterization), z_e)
        torch.testing.assert_close(window_velocity(oracle.target, z_t, where, schedule, parameterization), chord)
    for steps in (1, 3):  # the piecewise sampler walks the chord exactly, whatever the number of steps
        grid = torch.linspace(t_s, t_e, steps + 1, dtype=torch.float64)
        out = piecewise_solve(oracle, z_s, grid, torch.tensor([999.0, t_s, t_e, -1.0], dtype=torch.float64),
                              schedule, parameterization)
        torch.testing.assert_close(out, z_e)


def test_epsilon_coefficients_match_perflow():
    sched = VPSchedule.scaled_linear(1000)
    t_s, t_e = torch.tensor([999.0]), torch.tensor([749.0])
    ab_s, ab_e = sched.alpha_bar(t_s), sched.alpha_bar(t_e)
    lam, eta = window_coefficients(sched, t_s, t_e, "diff_eps")
    gamma = (ab_s / ab_e).sqrt()  # z_s = gamma z_e + sqrt(1 - gamma^2) eps: the forward process from e to s
    torch.testing.assert_close(lam, 1 / gamma)
    torch.testing.assert_close(eta, -(1 - gamma**2).sqrt() / gamma)
    z_e, eps = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    z_s = gamma * z_e + (1 - gamma**2).sqrt() * eps
    torch.testing.assert_close(epsilon_target(z_s, z_e, lam, eta), eps)


def test_ddim_eps_student_starts_as_the_teacher_ddim():
    sched = VPSchedule.linear(1000)
    teacher = ExactTeacher(GaussianMixture.from_options(dim=8, modes=6, std=0.2, seed=3), sched)
    b = P.window_boundaries(4, 1000)
    x = torch.randn(64, 8, dtype=torch.float64)
    out = piecewise_solve(teacher, x, piecewise_timesteps(4, b), b, sched, "ddim_eps")
    torch.testing.assert_close(out, ddim(teacher, x, b, sched))


def test_steps_are_spread_over_the_windows():
    b = P.window_boundaries(4, 1000)
    assert piecewise_timesteps(4, b).tolist() == [999, 749, 499, 249, -1]
    assert piecewise_timesteps(6, b).tolist() == [999, 874, 749, 624, 499, 249, -1]  # noisiest windows first
    assert piecewise_timesteps(2, b).tolist() == [999, 499, -1]
    assert piecewise_timesteps(1, b).tolist() == [999, -1]


def _sw(x, truth):
    return sliced_wasserstein(x, truth, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP: more threads only contend on a shared CPU
    out = tmp_path_factory.mktemp("perflow")
    method = get_method("perflow").from_options({"pool_size": "2048", "solver_steps": "4"})
    student = ModelConfig(kind="mlp", sample_shape=(8,), num_classes=6, hidden=64, depth=2)
    train = TrainConfig(max_steps=300, batch_size=256, lr=3e-3, ema_decay=0.99, checkpoint_every=0, progress=False)
    result = distill(method, "exact", MOG, out, train, student_model=student, progress=False)
    torch.set_num_threads(threads)
    return method, result, out


def test_short_distillation_beats_ddim_at_4_nfe(short_run):
    method, result, out = short_run
    assert method.config.parameterization == "auto"  # distill() resolves into a new method, leaving this one
    assert result.method.config.parameterization == "flow"  # auto: a fresh student predicts the flow velocity
    sched = VPSchedule.linear(1000)
    mix = GaussianMixture.from_options(dim=8, modes=6, std=0.2, seed=3)
    teacher = ExactTeacher(mix, sched, conditional=True)
    labels = torch.arange(3000) % 6
    noise = torch.randn(3000, 8, generator=torch.Generator().manual_seed(1))
    truth, _ = mix.sample(3000, torch.Generator().manual_seed(2), labels)
    gen = load_generator(model=str(out))  # the saved student samples with the saved (resolved) config
    student = _sw(gen.generate(noise, 4, cond=labels), truth)
    baseline = _sw(ddim(teacher, noise, torch.tensor([999.0, 749, 499, 249, -1]), sched, labels), truth)
    assert student < 0.9 * baseline, (student, baseline)
    assert result.teacher_nfe == 2048 * 4 == result.logs["teacher_nfe_this_run"]


def test_bad_window_count_is_a_one_line_error(tmp_path, capsys):
    code = cli(["distill", "--method", "perflow", "--teacher", "exact", "--data", MOG, "--out", str(tmp_path / "o"),
                "--max-steps", "1", "--no-progress", "--option", "windows=3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "3 windows do not divide the schedule's 1000 timesteps" in err
    with pytest.raises(RayflowError, match="unknown parameterization"):
        get_method("perflow").from_options({"parameterization": "x0"})


@pytest.mark.parametrize("loss_space", ["native", "velocity"])
@pytest.mark.parametrize("parameterization", ["window_epsilon", "ddim_eps", "flow"])
def test_the_objectives_window_table_gives_the_schedules_values(parameterization, loss_space, monkeypatch):
    """The objective gathers each row's window coefficients from its per-window table: the same loss and logs, bit
    for bit, as reading the schedule at every row's window, and no schedule read during a step."""
    import rayflow.windows as W
    from rayflow.methods.perflow import WindowObjective

    sched = VPSchedule.linear(1000)
    b = P.window_boundaries(4, 1000)
    n = 48
    pool = P.Pairs({"window": torch.arange(n) % 4, "z_start": torch.randn(n, 6), "z_end": torch.randn(n, 6)}, 0, 0)
    net = torch.nn.Linear(6, 6).double()

    def model(x, t, cond=None):
        return net(x.double()) * (1 + t[:, None].double() / 1000)

    def run(objective):
        return objective(model, 0, torch.Generator().manual_seed(3))

    tabled = WindowObjective(pool, b, sched, 32, parameterization, loss_space=loss_space, alpha=0.5,
                             weighting="reciprocal")
    tabled._table_on(torch.device("cpu"))  # made once, before the step
    real = W.window_coefficients
    calls: list[int] = []
    monkeypatch.setattr(W, "window_coefficients", lambda *a: calls.append(1) or real(*a))
    out = run(tabled)
    assert calls == []  # every coefficient came from the table
    monkeypatch.setattr(W, "window_coefficients", real)
    plain = WindowObjective(pool, b, sched, 32, parameterization, loss_space=loss_space, alpha=0.5,
                            weighting="reciprocal")
    table = plain._table_on(torch.device("cpu"))
    table.pop("lambda", None), table.pop("eta", None)  # every row's coefficients read from the schedule instead
    ref = run(plain)
    assert torch.equal(out.loss, ref.loss)
    assert all(torch.equal(out.logs[key], ref.logs[key]) for key in ref.logs)


def test_a_window_point_computes_its_flow_times_once():
    t = torch.tensor([300.0, 10.0], dtype=torch.float64)
    where = WindowPoint(t, torch.tensor([499.0, 249.0]), torch.tensor([249.0, -1.0]), 1000)
    assert where.tau is where.tau and where.tau_end is where.tau_end
    torch.testing.assert_close(where.tau, (t + 1) / 1000)
    known = (torch.tensor([0.5, 0.25]), torch.tensor([0.1, 0.2]))
    sched = VPSchedule.linear(1000)
    with_known = WindowPoint(t, where.t_start, where.t_end, 1000, known_coefficients=("window_epsilon", *known))
    assert with_known.coefficients(sched, "diff_eps") == known  # PeRFlow's old name for the same parameterisation
    for name in ("epsilon", "window_epsilon"):  # another parameterisation (or none known): read from the schedule
        expect = window_coefficients(sched, where.t_start, where.t_end, name)
        got = (with_known if name == "epsilon" else where).coefficients(sched, name)
        assert all(torch.equal(g, e) for g, e in zip(got, expect))
