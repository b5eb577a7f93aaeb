from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from rayflow.errors import RayflowError
from rayflow.schedules import (
    PREDICTION_TYPES,
    VPSchedule,
    convert_prediction,
    flow_time_to_timestep,
    from_x0_eps,
    timestep_to_flow_time,
    to_x0_eps,
)


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (lambda: VPSchedule.linear(1000), dict(beta_schedule="linear")),
        (lambda: VPSchedule.scaled_linear(1000),
         dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
        (lambda: VPSchedule.cosine(1000), dict(beta_schedule="squaredcos_cap_v2")),
    ],
)
def test_alphas_cumprod_match_diffusers(ours, theirs):
    ref = DDPMScheduler(num_train_timesteps=1000, **theirs).alphas_cumprod.double()
    torch.testing.assert_close(ours().alphas_cumprod, ref, rtol=2e-6, atol=1e-7)


def test_linear_closed_form():
    sched = VPSchedule.linear(10, 0.1, 0.5)
    betas = [0.1 + (0.5 - 0.1) * i / 9 for i in range(10)]
    expected = math.prod(1 - b for b in betas)
    assert float(sched.alpha_bar(9)) == pytest.approx(expected, rel=1e-12)


def test_known_terminal_signal_levels():
    # the numbers quoted in the RayFlow reconstruction (§A7): a_T for SD's schedule and DDPM's linear one
    assert float(VPSchedule.scaled_linear().a(999)) == pytest.approx(0.0683, abs=2e-4)
    assert float(VPSchedule.linear().a(999)) == pytest.approx(0.0064, abs=2e-4)


def test_from_diffusers_config_and_round_trip():
    cfg = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
           "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False}
    sched = VPSchedule.from_diffusers_config(cfg)
    torch.testing.assert_close(sched.alphas_cumprod, VPSchedule.scaled_linear().alphas_cumprod, rtol=2e-6, atol=0)
    again = VPSchedule.from_config(sched.config)
    assert torch.equal(again.alphas_cumprod, sched.alphas_cumprod)
    for name in ("linear", "scaled_linear", "cosine"):
        s = VPSchedule.from_name(name)
        assert torch.equal(VPSchedule.from_config(s.config).alphas_cumprod, s.alphas_cumprod)


def test_zero_terminal_snr_refused():
    with pytest.raises(RayflowError, match="zero-terminal-SNR"):
        VPSchedule.from_diffusers_config({"beta_schedule": "scaled_linear", "rescale_betas_zero_snr": True})


def test_alpha_bar_interpolation_and_data_end(linear_schedule):
    s = linear_schedule
    ints = torch.arange(1000)
    assert torch.equal(s.alpha_bar(ints), s.alphas_cumprod)
    assert float(s.alpha_bar(-1)) == 1.0
    mid = float(s.alpha_bar(10.5))
    assert mid == pytest.approx(math.sqrt(float(s.alphas_cumprod[10] * s.alphas_cumprod[11])), rel=1e-12)
    with pytest.raises(RayflowError):
        s.alpha_bar(1000.5)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_integer_timesteps_read_the_table_bit_for_bit(name):
    """Integer timesteps (a training step's draws) read precomputed ``alpha_bar``, ``a``, ``s`` tables; every value
    must equal the interpolating path's at the same whole number, bit for bit, ``t = -1`` (clean) included."""
    sched = VPSchedule.from_name(name)
    T = sched.num_train_timesteps
    t = torch.cat([torch.tensor([-3, -1]), torch.arange(T), torch.tensor([T - 1, 0])])
    for dtype in (torch.int64, torch.int32):
        ti, tf = t.to(dtype), t.double()
        for fn in (sched.alpha_bar, sched.a, sched.s):
            got = fn(ti)
            assert got.dtype == torch.float64
            assert torch.equal(got, fn(tf)), fn.__name__
    assert float(sched.a(-1)) == 1.0 and float(sched.s(-1)) == 0.0
    assert torch.equal(sched.a(T - 1), sched.a(float(T - 1)))  # a Python int reads the table too
    with pytest.raises(RayflowError, match="past the schedule's last timestep"):
        sched.a(torch.tensor([0, T]))


def test_snr_identities(linear_schedule):
    t = torch.tensor([0.0, 10.0, 500.0, 999.0])
    s = linear_schedule
    torch.testing.assert_close(s.a(t) ** 2 + s.s(t) ** 2, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(s.log_snr(t), torch.log(s.snr(t)))
    torch.testing.assert_close(s.snr(t), (s.a(t) / s.s(t)) ** 2)


def test_timestep_from_alpha_bar_inverts(linear_schedule):
    t = torch.tensor([0.0, 3.25, 100.0, 640.7, 999.0], dtype=torch.float64)
    back = linear_schedule.timestep_from_alpha_bar(linear_schedule.alpha_bar(t))
    torch.testing.assert_close(back, t, atol=1e-6, rtol=0)


@pytest.mark.parametrize("ptype", PREDICTION_TYPES)
@pytest.mark.parametrize("vp", [True, False])
def test_prediction_round_trip(ptype, vp):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    a = torch.rand(5, 1, generator=g, dtype=torch.float64) * 0.9 + 0.05
    s = (1 - a**2).sqrt() if vp else torch.rand(5, 1, generator=g, dtype=torch.float64) + 0.1
    x = a * x0 + s * eps
    pred = from_x0_eps(x0, eps, ptype, a, s)
    x0b, epsb = to_x0_eps(pred, ptype, x, a, s)
    torch.testing.assert_close(x0b, x0)
    torch.testing.assert_close(epsb, eps)
    for other in PREDICTION_TYPES:
        there = convert_prediction(pred, ptype, other, x, a, s)
        torch.testing.assert_close(convert_prediction(there, other, ptype, x, a, s), pred)


def test_closed_forms_of_v_and_flow():
    sched = DDPMScheduler(num_train_timesteps=1000)
    x0, eps = torch.randn(4, 3), torch.randn(4, 3)
    t = torch.tensor([0, 100, 500, 999])
    ours = VPSchedule.linear()
    a, s = ours.a(t).float()[:, None], ours.s(t).float()[:, None]
    torch.testing.assert_close(from_x0_eps(x0, eps, "v_prediction", a, s), sched.get_velocity(x0, eps, t))
    tau = torch.rand(4, 1)
    x = (1 - tau) * x0 + tau * eps  # rectified-flow interpolation, diffusers' FlowMatch convention
    u = from_x0_eps(x0, eps, "flow", 1 - tau, tau)
    torch.testing.assert_close(u, eps - x0)
    torch.testing.assert_close(to_x0_eps(u, "flow", x, 1 - tau, tau)[0], x0)


def test_flow_time_mapping():
    tau = torch.tensor([0.0, 0.5, 1.0])
    t = flow_time_to_timestep(tau, 1000)
    assert t.tolist() == [-1.0, 499.0, 999.0]
    torch.testing.assert_close(timestep_to_flow_time(t, 1000), tau.double())


def test_bad_prediction_type():
    with pytest.raises(RayflowError, match="unknown prediction type"):
        to_x0_eps(torch.zeros(1), "score", torch.zeros(1), torch.ones(1), torch.ones(1))
