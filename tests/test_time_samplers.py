"""Timestep samplers: exact bin masses and weights, concentration on a planted error profile, exact resume."""

from __future__ import annotations

import math

import pytest
import torch

from rayflow.errors import RayflowError
from rayflow.stein_time_sampler import _rbf_stein_kernel
from rayflow.time_samplers import (
    TIME_SAMPLERS,
    LogitNormalSampler,
    LossHistorySampler,
    SteinSampler,
    UniformSampler,
    UShapedSampler,
    build_time_sampler,
    downsample,
    plot_time_distribution,
)

T = 1000


def planted_profile(t: torch.Tensor, centre: float = 0.7, width: float = 0.06) -> torch.Tensor:
    """A per-timestep error that is small everywhere except a bump at ``u = centre``."""
    u = (t.double() + 0.5) / T
    return 0.05 + torch.exp(-0.5 * ((u - centre) / width) ** 2)


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p.double() - q.double()).abs().sum())


def train_on_profile(sampler, steps: int, centre: float, width: float, features: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        f = torch.randn(256, features, generator=g) if features else None
        t, _ = sampler.sample(256, g, f)
        noisy = planted_profile(t, centre, width) * torch.exp(0.3 * torch.randn(256, generator=g, dtype=torch.float64))
        sampler.update(t, noisy, f, generator=g)
    return g


@pytest.mark.parametrize("name", ["uniform", "logit-normal", "u-shaped"])
def test_fixed_samplers_draw_their_probs_and_weight_exactly(name):
    s = build_time_sampler(name, T, weight_clip=1e9)
    q = s.probs()
    assert q.shape == (T,) and abs(float(q.sum()) - 1) < 1e-9
    t, w = s.sample(200_000, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= T - 1
    # weights are exactly p(t)/q(t) with p uniform
    torch.testing.assert_close(w.double(), 1.0 / (T * q[t]), rtol=1e-5, atol=0)
    # the empirical distribution matches q (coarse bins, so the check is tight but not flaky)
    emp = torch.tensor(downsample(torch.bincount(t, minlength=T).double() / t.numel(), 20))
    assert tv(emp, torch.tensor(downsample(q, 20))) < 0.01
    # E_q[w] = 1: the reweighted loss is unbiased (within 4 standard errors; the tails make w heavy-tailed)
    wd = w.double()
    assert abs(float(wd.mean()) - 1) < 4 * float(wd.std()) / math.sqrt(wd.numel()) + 1e-9


def test_u_shaped_and_logit_normal_shapes():
    u = UShapedSampler(T, a=4.0).probs()
    assert abs(float(u[0] - u[-1])) < 1e-9  # symmetric, heavy ends
    ratio = float(u[0] / u[T // 2])
    assert abs(ratio - math.cosh(2.0)) / math.cosh(2.0) < 0.02  # cosh(a (u - 1/2)) at u = 0 vs 1/2
    ln = LogitNormalSampler(T, mean=0.0, std=1.0).probs()
    assert int(ln.argmax()) in (T // 2 - 1, T // 2)
    assert float(ln[:100].sum()) < 0.03


def test_weight_clip_bounds_weights():
    s = UShapedSampler(T, a=8.0, weight_clip=3.0)
    _, w = s.sample(10_000, torch.Generator().manual_seed(1))
    assert float(w.max()) <= 3.0 + 1e-6


def test_loss_history_sampler_concentrates_after_warmup():
    s = LossHistorySampler(T, num_bins=20, history=5, uniform_mix=0.1)
    torch.testing.assert_close(s.probs(), UniformSampler(T).probs())
    train_on_profile(s, 30, 0.7, 0.06)
    assert s.warmed_up()
    q = s.probs()
    q_star = planted_profile(torch.arange(T), 0.7, 0.06)
    q_star = q_star / q_star.sum()
    assert float(q[600:800].sum()) > 0.5  # most of the draws go where the error is
    assert tv(q, q_star) < 0.5 * tv(UniformSampler(T).probs(), q_star)


@pytest.mark.parametrize("centre,width", [(0.7, 0.06), (0.2, 0.1), (0.95, 0.03)])
def test_stein_sampler_concentrates_where_the_error_is(centre, width):
    s = SteinSampler(T, warmup=20)
    train_on_profile(s, 120, centre, width)
    q = s.probs()
    q_star = planted_profile(torch.arange(T), centre, width)
    q_star = q_star / q_star.sum()
    # the uniform part (10%) alone costs 0.1 * TV(uniform, q*); the fitted density is within a few times that
    assert tv(q, q_star) < 0.35 * tv(UniformSampler(T).probs(), q_star)
    lo, hi = int((centre - 2 * width) * T), int(min(1.0, centre + 2 * width) * T)
    assert float(q[lo:hi].sum()) > 0.6 * float(q_star[lo:hi].sum())
    # the error model itself recovers the planted profile
    assert tv(s.target_probs(), q_star) < 0.05


def test_global_stein_sampler_draws_the_mixture_law_with_its_weights():
    """The global sampler draws timesteps from their bin masses; that must be the law of the mixture it fits
    (a component, a normal draw in logit space, its bin; uniform draws mixed in), computed here independently
    from the mixture's CDF, and each draw carries ``p/q`` of its own bin under that CDF."""
    s = SteinSampler(T, warmup=20)
    g = train_on_profile(s, 60, 0.7, 0.06)
    with torch.no_grad():
        log_pi = s.net(None, 1)
        centres, width = s.centres, s.width
        edges = torch.logit(torch.linspace(0, 1, T + 1, dtype=torch.float64))
        z = (edges[None] - centres[:, None]) / (width * math.sqrt(2))
        cdf = (log_pi.exp()[0, :, None] * 0.5 * (1 + torch.erf(z))).sum(0)
    law = (1 - s.uniform_mix) * (cdf[1:] - cdf[:-1]) + s.uniform_mix / T
    assert abs(float(law.sum()) - 1) < 1e-9 and tv(s.probs(), law) < 1e-9
    t, w = s.sample(400_000, g)
    counts = torch.bincount(t, minlength=T).double()
    # coarse bins: the empirical law within a few binomial standard errors of the mixture's
    emp, ref = counts.reshape(20, 50).sum(1) / t.numel(), law.reshape(20, 50).sum(1)
    assert float(((emp - ref).abs() / (ref * (1 - ref) / t.numel()).sqrt()).max()) < 5
    torch.testing.assert_close(w, (1.0 / (T * law[t])).clamp(max=s.weight_clip).float())


def test_global_ksd_gradient_in_closed_form_is_autograds():
    """The global sampler's KSD step sets its gradient in closed form; it must be autograd's of :meth:`ksd2`."""
    s = SteinSampler(T, warmup=5)
    train_on_profile(s, 30, 0.2, 0.1)
    loss = s._ksd2_and_grad_global()
    grads = [p.grad.clone() for p in (s.net.head.weight, s.net.head.bias)]
    s.opt.zero_grad(set_to_none=True)
    reference = s.ksd2(None)
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-10, atol=0)
    for mine, auto in zip(grads, (s.net.head.weight.grad, s.net.head.bias.grad)):
        assert float(auto.abs().max()) > 0
        torch.testing.assert_close(mine, auto, rtol=1e-9, atol=1e-15)


def test_stein_sampler_with_features_concentrates_too():
    s = SteinSampler(T, num_features=2, warmup=10)
    g = train_on_profile(s, 40, 0.7, 0.06, features=2)
    f = torch.randn(32, 2, generator=g)
    q = s.probs(f)
    q_star = planted_profile(torch.arange(T), 0.7, 0.06)
    q_star = q_star / q_star.sum()
    assert tv(q, q_star) < 0.5 * tv(UniformSampler(T).probs(), q_star)
    with pytest.raises(RayflowError, match="features of shape"):
        s.sample(4, g, None)


def test_conditioned_draws_carry_their_own_instances_bin_weight():
    """Each conditioned draw's ``p/q`` is its instance's mixture mass of the drawn bin, computed here from the
    mixture's CDF (the sampler reads it from a precomputed table of component bin masses)."""
    s = SteinSampler(T, num_features=2, warmup=5)
    g = train_on_profile(s, 10, 0.4, 0.1, features=2)
    f = torch.randn(64, 2, generator=g)
    t, w = s.sample(64, g, f)
    with torch.no_grad():
        log_pi = s.net(f.double(), 64)  # [n, G]
        edges = torch.logit(torch.linspace(0, 1, T + 1, dtype=torch.float64))
        lo, hi = (((edges[idx][:, None] - s.centres[None]) / (s.width * math.sqrt(2))) for idx in (t, t + 1))
        mass = (log_pi.exp() * 0.5 * (torch.erf(hi) - torch.erf(lo))).sum(1)
    q_t = (1 - s.uniform_mix) * mass + s.uniform_mix / T
    torch.testing.assert_close(w, (1.0 / (T * q_t)).clamp(max=s.weight_clip).float())


def test_error_model_fit_from_the_basis_table_is_the_direct_fit():
    """``update`` feeds the error model ``phi(u)`` from a table over the timestep grid: the same fit."""
    a, b = SteinSampler(T, warmup=0), SteinSampler(T, warmup=0)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        t = torch.randint(0, T, (128,), generator=g)
        u, log_loss = (t.double() + 0.5) / T, torch.randn(128, generator=g, dtype=torch.float64)
        a.error.fit(u, log_loss, None)
        b.error.fit(u, log_loss, None, b._basis_t[t])
    torch.testing.assert_close(a.error.beta, b.error.beta, rtol=1e-12, atol=1e-12)
    assert float(a.error.beta.abs().max()) > 0


def test_ksd_quadratic_form_matches_the_stein_kernel():
    s = SteinSampler(T, warmup=0, components=12, quadrature=3)
    train_on_profile(s, 5, 0.3, 0.1)
    with torch.no_grad():
        w = (s.net(None, 1).exp()[..., None] * s._node_w).reshape(-1)
        kp = _rbf_stein_kernel(s._nodes, s.target_score(s._nodes, None), s.h)
        direct = w @ kp @ w
    torch.testing.assert_close(s.ksd2(None).detach(), direct, rtol=1e-9, atol=1e-12)


def test_target_score_is_the_derivative_of_log_q_star():
    s = SteinSampler(T, warmup=0)
    train_on_profile(s, 10, 0.6, 0.1)
    y = torch.linspace(-4, 4, 41, dtype=torch.float64, requires_grad=True)
    u = torch.sigmoid(y)
    log_q = s.error.log_xi_and_score(u, None)[0] + torch.log(u * (1 - u))
    (grad,) = torch.autograd.grad(log_q.sum(), y)
    torch.testing.assert_close(s.target_score(y.detach(), None), grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", TIME_SAMPLERS)
def test_state_dict_round_trip_continues_identically(name):
    a = build_time_sampler(name, T, **({"warmup": 3} if name == "learned" else {}))
    train_on_profile(a, 8, 0.5, 0.1)
    b = build_time_sampler(name, T, **({"warmup": 3} if name == "learned" else {}))
    b.load_state_dict(a.state_dict())
    for s in (a, b):
        train_on_profile(s, 3, 0.5, 0.1, seed=9)
    ta, wa = a.sample(64, torch.Generator().manual_seed(3))
    tb, wb = b.sample(64, torch.Generator().manual_seed(3))
    assert torch.equal(ta, tb) and torch.equal(wa, wb)


def test_bad_options_raise_one_line_errors():
    with pytest.raises(RayflowError, match="unknown time sampler"):
        build_time_sampler("beta", T)
    with pytest.raises(RayflowError, match="bandwidth"):
        SteinSampler(T, bandwidth=0)
    with pytest.raises(RayflowError, match="weight_clip"):
        UniformSampler(T, weight_clip=0.5)


def test_plot_writes_a_png(tmp_path):
    s = SteinSampler(T, warmup=2)
    train_on_profile(s, 5, 0.5, 0.1)
    snaps = [{"step": i, "probs": downsample(s.probs()), "target": downsample(s.target_probs())} for i in (1, 5)]
    path = plot_time_distribution(snaps, tmp_path / "ts.png", T)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_the_samplers_that_learn_are_adaptive():
    """``adaptive``: whether ``update`` learns from the losses (RayFlow skips copying them for the others)."""
    assert {name: build_time_sampler(name, T).adaptive for name in TIME_SAMPLERS} == {
        name: name in ("learned", "loss-history") for name in TIME_SAMPLERS}
