"""Samplers against diffusers' schedulers (same model, same grid) and against the exact PF-ODE solution."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from rayflow.errors import RayflowError
from rayflow.gmm import ExactTeacher, GaussianMixture
from rayflow.models import ModelConfig, build_model
from rayflow.samplers import (
    ddim,
    dpm_solver_pp_2m,
    euler,
    heun,
    make_timesteps,
    sample,
    sampler_nfe,
    steps_for_nfe,
    window_timesteps,
)
from rayflow.schedules import VPSchedule


def _random_mlp(prediction_type: str = "epsilon", dim: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="mlp", sample_shape=(dim,), hidden=64, depth=2,
                                    prediction_type=prediction_type))
    torch.nn.init.normal_(model.out[-1].weight, std=0.3)  # zero-initialised for training; make it non-trivial
    return model.double().eval()


def _diffusers_loop(scheduler, model, x):
    for t in scheduler.timesteps:
        out = model(x, torch.full((x.shape[0],), float(t), dtype=torch.float64))
        x = scheduler.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [1, 2, 4, 10, 50])
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_ddim_matches_diffusers(steps, spacing, ptype):
    model = _random_mlp(ptype)
    x = torch.randn(16, 6, dtype=torch.float64)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                          set_alpha_to_one=True, timestep_spacing=spacing, prediction_type=ptype)
    sched.set_timesteps(steps)
    ref = _diffusers_loop(sched, model, x.clone())
    # the same (float32) alphas_cumprod table diffusers uses, so only the algorithms are compared
    ours = ddim(model, x.clone(), make_timesteps(steps, 1000, spacing), VPSchedule(sched.alphas_cumprod))
    assert make_timesteps(steps, 1000, spacing)[:-1].long().tolist() == sched.timesteps.tolist()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 20])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_dpm_solver_matches_diffusers(steps, schedule, mog8):
    # diffusers' DPM-Solver casts the sample to float32 inside `step`; a one-step solve on the linear schedule
    # divides by a_T = 0.0064, which alone puts ~1.6e-5 of float32 rounding into its answer.
    tol = 3e-5 if (schedule, steps) == ("linear", 1) else 1e-5
    ours_sched = VPSchedule.from_name(schedule)
    teacher = ExactTeacher(mog8, ours_sched)
    x = torch.randn(32, 8, dtype=torch.float64)
    kw = dict(beta_start=0.00085, beta_end=0.012) if schedule == "scaled_linear" else {}
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule=schedule, algorithm_type="dpmsolver++",
                                        solver_order=2, final_sigmas_type="zero", **kw)
    sched.set_timesteps(steps)
    ref = _diffusers_loop(sched, teacher, x.clone())
    grid = make_timesteps(steps, 1000, "linspace")
    assert grid[:-1].long().tolist() == sched.timesteps.tolist()
    ours = dpm_solver_pp_2m(teacher, x.clone(), grid, VPSchedule(sched.alphas_cumprod))
    torch.testing.assert_close(ours, ref, atol=tol, rtol=1e-5)


def test_dpm_solver_v_prediction_matches_diffusers():
    model = _random_mlp("v_prediction")
    x = torch.randn(8, 6, dtype=torch.float64)
    sched = DPMSolverMultistepScheduler(beta_schedule="linear", prediction_type="v_prediction")
    sched.set_timesteps(6)
    ref = _diffusers_loop(sched, model, x.clone())
    ours = dpm_solver_pp_2m(model, x.clone(), make_timesteps(6, 1000, "linspace"), VPSchedule(sched.alphas_cumprod))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_euler_is_ddim(exact_teacher, linear_schedule):
    x = torch.randn(16, 8, dtype=torch.float64)
    grid = make_timesteps(7, 1000, "trailing")
    torch.testing.assert_close(euler(exact_teacher, x, grid, linear_schedule),
                               ddim(exact_teacher, x, grid, linear_schedule), atol=1e-10, rtol=1e-10)


def test_per_sample_grids_equal_separate_runs(exact_teacher, linear_schedule):
    x = torch.randn(4, 8, dtype=torch.float64)
    starts, ends = torch.tensor([999.0, 700.0, 400.0, 120.0]), torch.tensor([700.0, 400.0, 120.0, -1.0])
    grids = window_timesteps(starts, ends, 3)
    for fn in (ddim, dpm_solver_pp_2m, heun):
        batched = fn(exact_teacher, x, grids, linear_schedule)
        for i in range(4):
            alone = fn(exact_teacher, x[i:i + 1], grids[i], linear_schedule)
            torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_samplers_converge_to_exact_ode_solution(schedule):
    """For Gaussian data the PF-ODE has a closed form. Solving from t=999 to t=0 on uniform grids, every
    sampler's error shrinks with the number of steps, at first order for DDIM and second order for Heun."""
    sched = VPSchedule.from_name(schedule)
    gauss = GaussianMixture(torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([0.3]), torch.tensor([1.0]))
    teacher = ExactTeacher(gauss, sched)
    x_T = torch.randn(256, 3, dtype=torch.float64)
    exact = gauss.ode_solution(x_T, float(sched.a(999)), float(sched.s(999)), float(sched.a(0)), float(sched.s(0)))
    errors = {}
    for name, fn in {"ddim": ddim, "dpm++2m": dpm_solver_pp_2m, "heun": heun}.items():
        errs = []
        for steps in (8, 32, 128):
            out = fn(teacher, x_T.clone(), torch.linspace(999, 0, steps + 1, dtype=torch.float64), sched)
            errs.append(float((out - exact).abs().max()))
        assert errs[0] > errs[1] > errs[2], (name, errs)
        errors[name] = errs
    assert errors["ddim"][2] < 0.06 and errors["dpm++2m"][2] < 0.05 and errors["heun"][2] < 3e-3
    assert errors["ddim"][1] / errors["ddim"][2] > 2.5  # first order: about 4x per 4x steps
    assert errors["heun"][1] / errors["heun"][2] > 8  # second order: about 16x


def test_partial_solve_matches_closed_form(linear_schedule):
    gauss = GaussianMixture(torch.zeros(1, 2), torch.tensor([0.5]), torch.tensor([1.0]))
    teacher = ExactTeacher(gauss, linear_schedule)
    x = torch.randn(64, 2, dtype=torch.float64)
    out = dpm_solver_pp_2m(teacher, x, window_timesteps(torch.full((64,), 800.0), torch.full((64,), 300.0), 64),
                           linear_schedule)
    sch = linear_schedule
    exact = gauss.ode_solution(x, float(sch.a(800)), float(sch.s(800)), float(sch.a(300)), float(sch.s(300)))
    torch.testing.assert_close(out, exact, atol=1e-4, rtol=1e-4)


def test_sample_front_door_with_guidance_and_chunks(linear_schedule):
    mog = GaussianMixture.from_options(dim=2, modes=4, std=0.05)
    teacher = ExactTeacher(mog, linear_schedule, conditional=True)
    noise = torch.randn(40, 2, dtype=torch.float64)
    labels = torch.arange(40) % 4
    whole = sample(teacher, noise, linear_schedule, "dpm++2m", 20, cond=labels)
    chunked = sample(teacher, noise, linear_schedule, "dpm++2m", 20, cond=labels, batch_size=7)
    torch.testing.assert_close(whole, chunked)
    # conditional samples land on their own mode; guidance keeps them there
    guided = sample(teacher, noise, linear_schedule, "dpm++2m", 20, cond=labels, guidance=3.0)
    for out in (whole, guided):
        nearest = torch.cdist(out, mog.means.to(out.dtype)).argmin(1)
        assert (nearest == labels).float().mean() > 0.95


def test_karras_grid_matches_diffusers_sigmas():
    sched = DPMSolverMultistepScheduler(beta_schedule="linear", use_karras_sigmas=True)
    sched.set_timesteps(10)
    ours = VPSchedule.linear()
    grid = make_timesteps(10, 1000, "karras", schedule=ours)
    sigmas = (ours.s(grid[:-1]) / ours.a(grid[:-1])).float()
    torch.testing.assert_close(sigmas, sched.sigmas[:-1], rtol=2e-3, atol=1e-4)
    assert float(grid[0]) == pytest.approx(999) and grid[-1] == -1 and bool(torch.all(grid[1:] < grid[:-1]))


def test_nfe_bookkeeping():
    assert sampler_nfe("heun", 4) == 7 and sampler_nfe("ddim", 4) == 4
    assert steps_for_nfe("heun", 8) == 4 and steps_for_nfe("dpm++2m", 8) == 8 and steps_for_nfe("heun", 1) == 1


def test_bad_arguments(exact_teacher, linear_schedule):
    with pytest.raises(RayflowError, match="steps must be >= 1"):
        make_timesteps(0)
    with pytest.raises(RayflowError, match="spacing"):
        make_timesteps(4, spacing="karras")
    with pytest.raises(RayflowError, match="unknown sampler"):
        sample(exact_teacher, torch.randn(2, 8), linear_schedule, "rk45")
    with pytest.raises(RayflowError, match="timesteps must have shape"):
        ddim(exact_teacher, torch.randn(2, 8), torch.zeros(3, 4), linear_schedule)
