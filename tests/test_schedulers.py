"""Every few-step sampler as a diffusers scheduler: old student directories load and sample exactly as the code
that wrote them did (tests/fixtures/old_students, written by tests/fixtures/make_old_students.py before the
schedulers existed), diffusers' own loop reproduces ``Method.sample``, and configs round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rayflow.distillation import load_generator
from rayflow.errors import RayflowError
from rayflow.schedulers import (
    SCHEDULERS,
    FlowEulerScheduler,
    GridDDIMScheduler,
    PiecewiseFlowScheduler,
    RayFlowScheduler,
    load_scheduler,
    schedule_fields,
    schedule_from_fields,
    vp_matched,
)
from rayflow.schedules import VPSchedule

FIXTURES = Path(__file__).parent / "fixtures" / "old_students"
OLD = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").exists())


def test_every_method_has_an_old_fixture():
    methods = {json.loads((FIXTURES / n / "config.json").read_text())["method"]["name"] for n in OLD}
    assert methods == {"rayflow", "reflow", "perflow", "proreflow", "rectified-diffusion"}


@pytest.mark.parametrize("name", OLD)
def test_old_student_directory_samples_as_before(name):
    gen = load_generator(str(FIXTURES / name))
    ref = load_file(str(FIXTURES / name / "reference.safetensors"))
    noise, labels = ref["noise"], ref["labels"]
    for steps in (1, 2, 4, 8):
        got = gen.method.sample(gen.model, noise, gen.schedule, steps, cond=labels)
        torch.testing.assert_close(got, ref[f"steps{steps}"], rtol=1e-5, atol=1e-5)
    got = gen.method.sample(gen.model, noise, gen.schedule, 2, cond=labels, guidance=2.0)
    torch.testing.assert_close(got, ref["steps2_guided"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", OLD)
def test_diffusers_loop_over_a_saved_scheduler_matches(name, tmp_path):
    """The scheduler saved to disk and reloaded, driven by diffusers' plain pipeline loop on the raw network."""
    gen = load_generator(str(FIXTURES / name))
    ref = load_file(str(FIXTURES / name / "reference.safetensors"))
    net = gen.method.raw_network(gen.model)
    scheduler = gen.method.make_scheduler(gen.schedule, net)
    scheduler.save_config(str(tmp_path / "scheduler"))
    reloaded = load_scheduler(tmp_path / "scheduler")
    assert type(reloaded) is type(scheduler) and dict(reloaded.config) == dict(scheduler.config)
    again = type(scheduler).from_config(scheduler.config)
    assert dict(again.config) == dict(scheduler.config)
    for steps in (1, 4):
        reloaded.set_timesteps(steps)
        latents = ref["noise"] * reloaded.init_noise_sigma
        for t in reloaded.timesteps:
            out = net(reloaded.scale_model_input(latents, t), t.expand(latents.shape[0]), ref["labels"])
            step = reloaded.step(out, t, latents)
            latents = step.prev_sample
        torch.testing.assert_close(latents, ref[f"steps{steps}"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step.pred_original_sample, latents, rtol=1e-5, atol=1e-5)  # last step: x0


@pytest.mark.parametrize("schedule", [VPSchedule.linear(), VPSchedule.scaled_linear(), VPSchedule.cosine(),
                                      VPSchedule.linear(100, 1e-3, 0.05)])
def test_schedule_fields_rebuild_the_schedule_bit_for_bit(schedule):
    rebuilt = schedule_from_fields(**schedule_fields(schedule))
    assert torch.equal(rebuilt.alphas_cumprod, schedule.alphas_cumprod)


def test_custom_schedule_goes_through_trained_betas():
    ac = VPSchedule.scaled_linear(50).alphas_cumprod
    custom = VPSchedule(ac)
    fields = schedule_fields(custom)
    assert fields["trained_betas"] is not None
    torch.testing.assert_close(schedule_from_fields(**fields).alphas_cumprod, ac, rtol=1e-12, atol=1e-12)


def test_ray_scheduler_steps_along_the_ray_exactly():
    """An oracle network that outputs the true flow ``eps_mu - x0`` at the VP-matched point lands on x0 from any
    grid, and every intermediate sample is the ray point ``a_t x0 + (1 - a_t) eps_mu``."""
    sched = VPSchedule.scaled_linear()
    s = RayFlowScheduler(**schedule_fields(sched), prediction_type="flow")
    x0, eps_mu = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)).chunk(1)[0], torch.randn(5, 3)
    s.set_timesteps(3)
    x = sched.a(999).float() * x0 + (1 - sched.a(999).float()) * eps_mu
    for i, t in enumerate(s.timesteps):
        x = s.step(eps_mu - x0, t, x).prev_sample
        tn = s._grid[i + 1]
        an = sched.a(tn).float()
        torch.testing.assert_close(x, an * x0 + (1 - an) * eps_mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x, x0, rtol=1e-5, atol=1e-5)


def test_schedulers_refuse_misuse():
    s = GridDDIMScheduler()
    with pytest.raises(RayflowError):
        s.step(torch.zeros(1, 2), 0, torch.zeros(1, 2))  # no set_timesteps yet
    s.set_timesteps(1)
    s.step(torch.zeros(1, 2), s.timesteps[0], torch.zeros(1, 2))
    with pytest.raises(RayflowError):
        s.step(torch.zeros(1, 2), s.timesteps[0], torch.zeros(1, 2))  # past the last step
    with pytest.raises(RayflowError):
        PiecewiseFlowScheduler(parameterization="eps")
    assert set(SCHEDULERS) == {"RayFlowScheduler", "FlowEulerScheduler", "PiecewiseFlowScheduler",
                               "GridDDIMScheduler"}
    assert FlowEulerScheduler().init_noise_sigma == 1.0


def test_vp_matched_reads_integer_timesteps_from_the_table_bit_for_bit():
    """A training step's integer ray timesteps take the schedule's table; the VP-matched point must be the one the
    fractional path gives at the same whole numbers."""
    draws = torch.randint(0, 1000, (256,), generator=torch.Generator().manual_seed(1))
    for name in ("linear", "scaled_linear", "cosine"):
        sched = VPSchedule.from_name(name)
        t = torch.cat([torch.arange(-1, 1000), draws])
        for dtype in (torch.int64, torch.int32):
            for got, ref in zip(vp_matched(sched, t.to(dtype)), vp_matched(sched, t.double()), strict=True):
                assert got.dtype == torch.float64 and torch.equal(got, ref), name
    with pytest.raises(RayflowError, match="past the schedule's last timestep"):
        vp_matched(sched, torch.tensor([3, 1000]))
