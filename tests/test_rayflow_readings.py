"""Issue #14's readings of RayFlow's eps_mu (trajectory, start-consistent) and the expected-noise consistency loss,
checked in closed form on exact teachers (the Gaussian mixture, and a point mass whose ODE paths are straight)."""

from __future__ import annotations

import pytest
import torch

from rayflow.data import load_dataset
from rayflow.distillation import distill
from rayflow.errors import RayflowError
from rayflow.gmm import ExactTeacher
from rayflow.methods import CountingDenoiser, DistillContext
from rayflow.methods.rayflow import (
    RayFlow,
    RayFlowConfig,
    RayParameterization,
    consistency_residual,
    ray_point,
    ray_sample,
    ray_target,
    start_consistent_eps_mu,
    teacher_trajectory,
    teacher_x0,
    validate_config,
)
from rayflow.models import Denoiser, ModelConfig, default_model_config
from rayflow.schedules import VPSchedule, expand_like
from rayflow.training import TrainConfig

MOG = "mog:dim=8,modes=6,std=0.2,seed=3,n=2000,conditional=0"
SCHEDULES = {"linear": VPSchedule.linear(), "scaled_linear": VPSchedule.scaled_linear()}


class PointMassTeacher(Denoiser):
    """The exact denoiser of data concentrated at ``m``: it predicts the sample ``m`` everywhere, so every
    probability-flow path ``a_t m + s_t eps`` is straight and its noise prediction is ``eps`` all along."""

    prediction_type = "sample"

    def __init__(self, m: torch.Tensor) -> None:
        super().__init__()
        self.m = m

    def forward(self, x, t, cond=None):
        return self.m.to(x.dtype).expand_as(x)


class OracleStudent(Denoiser):
    """A perfect ray student for known instances: it returns their eps_mu (or v) wherever it is asked."""

    def __init__(self, x0, eps_mu, parameterization):
        super().__init__()
        self.x0, self.eps_mu, self.parameterization = x0, eps_mu, parameterization
        self.prediction_type = f"ray-{parameterization}"

    def forward(self, x, t, cond=None):
        return ray_target(self.x0, self.eps_mu, self.parameterization)


def _mog_teacher(schedule):
    return ExactTeacher(load_dataset(MOG).mixture, schedule)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("parameterization", ["epsilon", "velocity"])
def test_start_consistent_ray_passes_through_the_starting_noise(schedule, parameterization):
    sched = SCHEDULES[schedule]
    eps = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = teacher_x0(_mog_teacher(sched), eps, sched, steps=10)
    eps_mu = start_consistent_eps_mu(x0, eps, sched)
    T = sched.num_train_timesteps - 1
    a, s = (torch.full_like(eps[:, :1], float(v)) for v in (sched.a(T), sched.s(T)))
    torch.testing.assert_close(ray_point(x0, eps_mu, a, s), eps, rtol=0, atol=1e-12)
    # a perfect student, started from the sampler's own noise, reproduces the teacher's ODE solution at 1 step
    # (the paper's one-step formula) and on any grid
    student = OracleStudent(x0, eps_mu, parameterization)
    for steps in (1, 2, 4):
        torch.testing.assert_close(ray_sample(student, eps, sched, steps), x0, rtol=0, atol=1e-9)
    # the standard normal start is the ray's start: the two readings that do not pass through eps do not
    assert float((eps_mu - eps).abs().max()) > 1e-3


def test_trajectory_reading_is_the_mean_noise_along_the_teachers_path_at_no_extra_cost():
    sched = SCHEDULES["scaled_linear"]
    exact = _mog_teacher(sched)
    counted = CountingDenoiser(exact)
    eps = torch.randn(32, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    traj = teacher_trajectory(counted, eps, sched, steps=10, keep_states=True)
    assert counted.evaluations == 32 * 10  # exactly the solver's calls: the trajectory eps_mu adds none
    torch.testing.assert_close(traj.x0, teacher_x0(exact, eps, sched, steps=10), rtol=0, atol=1e-12)
    # independently: the exact teacher's noise at each recorded state, averaged
    assert traj.states.shape == (10, 32, 8) and traj.timesteps.shape == (10, 32)
    assert traj.states[0].equal(eps) and float(traj.timesteps[0, 0]) == sched.num_train_timesteps - 1
    want = torch.stack([exact(traj.states[j], traj.timesteps[j]) for j in range(10)]).mean(0)
    torch.testing.assert_close(traj.eps_mu, want, rtol=0, atol=1e-12)
    # one state per row, never the start (the ray's own first point)
    x, t = traj.pick(torch.Generator().manual_seed(0))
    assert x.shape == (32, 8) and bool((t < sched.num_train_timesteps - 1).all())


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_on_straight_trajectories_the_readings_are_closed_form_and_the_consistency_loss_is_zero(schedule):
    sched = SCHEDULES[schedule]
    m = torch.linspace(-1, 1, 8, dtype=torch.float64)
    teacher = PointMassTeacher(m)
    eps = torch.randn(16, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    traj = teacher_trajectory(teacher, eps, sched, steps=12, keep_states=True)
    torch.testing.assert_close(traj.x0, m.expand_as(eps), rtol=0, atol=1e-10)
    # the sampler starts at x = eps (not a_T m + s_T eps), so the straight path's noise is (eps - a_T m) / s_T
    T = sched.num_train_timesteps - 1
    a_T, s_T = float(sched.a(T)), float(sched.s(T))
    path_noise = (eps - a_T * m) / s_T
    torch.testing.assert_close(traj.eps_mu, path_noise, rtol=0, atol=1e-10)
    torch.testing.assert_close(start_consistent_eps_mu(traj.x0, eps, sched), path_noise * s_T / (1 - a_T),
                               rtol=0, atol=1e-10)
    # the exact target: a student network that is the point-mass denoiser predicts the path's noise at every
    # trajectory point, read on the ray of the same SNR, in either form
    for j in range(1, 12):
        for form in ("epsilon", "velocity"):
            per = consistency_residual(RayParameterization(sched, form), teacher, traj.states[j],
                                       traj.timesteps[j], traj.eps_mu, None, sched)
            assert float(per.max()) < 1e-10, (j, form, float(per.max()))
    # a wrong student is penalised
    per = consistency_residual(RayParameterization(sched, "velocity"), PointMassTeacher(m + 0.5), traj.states[5],
                               traj.timesteps[5], traj.eps_mu, None, sched)
    assert float(per.min()) > 1e-3


def test_readings_are_validated():
    validate_config(RayFlowConfig.from_dict(eps_mu_reading="start", x0_source="data"))
    validate_config(RayFlowConfig.from_dict(eps_mu_reading="trajectory", consistency_weight=1.0))
    for bad, match in (({"eps_mu_reading": "mean"}, "eps_mu_reading must be one of"),
                       ({"eps_mu_reading": "trajectory", "x0_source": "data"}, "need x0_source=teacher"),
                       ({"consistency_weight": 1.0, "x0_source": "mixed"}, "need x0_source=teacher"),
                       ({"consistency_weight": -1.0}, "consistency_weight must be >= 0"),
                       ({"eps_mu_reading": "trajectory", "instance_target": False}, "needs instance_target=true")):
        with pytest.raises(RayflowError, match=match):
            validate_config(RayFlowConfig.from_dict(**bad))


def _context(tmp_path, ds, teacher, sched):
    return DistillContext(
        teacher=CountingDenoiser(teacher), schedule=sched, dataset=ds,
        train=TrainConfig(max_steps=3, batch_size=16, progress=False, log_every=0, checkpoint_every=0),
        out_dir=tmp_path / "out", student_config=default_model_config(ds.sample_shape, ds.num_classes),
        student_init=None, cache_dir=None, progress=False)


def test_pools_of_the_readings_cost_only_the_teachers_ode(tmp_path):
    ds = load_dataset(MOG)
    sched = SCHEDULES["linear"]
    exact = ExactTeacher(ds.mixture, sched)
    for reading, cons in (("trajectory", 1.0), ("start", 0.0)):
        method = RayFlow(RayFlowConfig.from_dict(eps_mu_reading=reading, consistency_weight=cons, cache_size=40,
                                                 cache_shard_size=16, teacher_steps=10))
        ctx = _context(tmp_path, ds, exact, sched)
        pool = method.build_pool(ctx, ctx.teacher, "teacher", tmp_path / reading)
        assert ctx.teacher.evaluations == 40 * 10 == 40 * method.teacher_nfe_per_instance("teacher", exact, 1.0)
        from rayflow.methods.rayflow import _noise_from_seeds

        eps = _noise_from_seeds(pool["noise_seed"], (8,))
        if reading == "start":
            torch.testing.assert_close(pool["eps_mu"], start_consistent_eps_mu(pool["x0"], eps, sched).float())
            assert "traj_x" not in pool
        else:
            want = teacher_trajectory(exact, eps.double(), sched, steps=10).eps_mu.float()
            torch.testing.assert_close(pool["eps_mu"], want, rtol=1e-4, atol=1e-4)
            assert pool["traj_x"].shape == (40, 8) and pool["traj_t"].shape == (40,)
        assert method.cache_meta(ctx, exact, "teacher")["eps_mu_reading"] == reading


@pytest.mark.parametrize("online", ["false", "true"])
def test_distillation_with_the_trajectory_reading_and_consistency(tmp_path, online):
    ds = load_dataset(MOG)
    method = RayFlow.from_options({"eps_mu_reading": "trajectory", "consistency_weight": "0.5",
                                   "cache_size": "64", "teacher_steps": "6", "online": online})
    small = ModelConfig(kind="mlp", sample_shape=(8,), hidden=16, depth=1)
    train = TrainConfig(max_steps=3, batch_size=16, progress=False, log_every=1, checkpoint_every=0)
    result = distill(method, "exact", ds, tmp_path / "s", train, student_model=small, progress=False)
    # the teacher's ODE only (6 calls per instance): pooled 64 instances, or 3 steps x 16 rows online
    assert result.teacher_nfe == (3 * 16 * 6 if online == "true" else 64 * 6)
    noise = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(method.sample(result.student, noise, SCHEDULES["linear"], 2)).all()
    assert "loss_consistency" in (tmp_path / "s" / "train_log.jsonl").read_text()


def test_ray_time_of_a_vp_point_has_its_snr():
    from rayflow.methods.rayflow import ray_time_of_vp, vp_matched

    for sched in SCHEDULES.values():
        t_vp = torch.tensor([40.0, 300.0, 700.0, 950.0], dtype=torch.float64)
        t_ray, c = ray_time_of_vp(sched, t_vp)
        c2, _, _, t_back = vp_matched(sched, t_ray)
        torch.testing.assert_close(t_back, t_vp, rtol=0, atol=1e-3)
        torch.testing.assert_close(c2, c)
        a = expand_like(sched.a(t_ray), c)
        torch.testing.assert_close(a / (1 - a), sched.a(t_vp) / sched.s(t_vp), rtol=1e-9, atol=0)
