"""Training-free samplers for VP diffusion models: DDIM, DPM-Solver++(2M), Euler and Heun.

Each sampler is one short function in the style of EDM's Algorithm 1: it walks a grid of timesteps
``t_0 > t_1 > ... > t_N`` and returns ``x`` at ``t_N``. The grid is a tensor ``[N+1]`` shared by the batch or
``[B, N+1]`` per sample (pair generation over time windows needs per-sample start and end times). ``t = -1``
is clean data (``alpha_bar = 1``); a grid may also stop earlier (``t_N >= 0``) to solve only part of the ODE.

Notation: ``a = sqrt(alpha_bar_t)``, ``s = sqrt(1 - alpha_bar_t)``, the model's prediction converted to
``(x0_hat, eps_hat)`` with :func:`rayflow.schedules.to_x0_eps`, so any prediction type works.

* DDIM (Song et al. 2021, eta = 0):   ``x' = a' x0_hat + s' eps_hat``.
* DPM-Solver++(2M) (Lu et al. 2022), data prediction, midpoint form, with ``lambda = log(a/s)``,
  ``h = lambda' - lambda``::

      x' = (s'/s) x - a' (e^{-h} - 1) D,   D = x0_hat                              (first order)
                                           D = x0_hat + (x0_hat - x0_prev) / (2 r), r = h_prev / h   (second)

  The first step is first order, and so is the last when ``N < 15`` or it lands on data, exactly as
  diffusers' ``DPMSolverMultistepScheduler`` (``lower_order_final=True``, ``final_sigmas_type="zero"``).
* Euler and Heun integrate the probability-flow ODE in EDM's variables ``x~ = x / a``, ``sigma = s / a``:
  ``dx~/dsigma = eps_hat(x, t)``. Euler in these variables *is* DDIM (a test checks it); Heun adds the
  trapezoidal corrector (2 NFE per step, 1 for a final step onto data).

The samplers run under ``torch.no_grad`` and evaluate the schedule in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from rayflow.errors import RayflowError, require
from rayflow.models.base import Condition, Denoiser, with_guidance
from rayflow.progress import tqdm
from rayflow.schedules import VPSchedule, expand_like, to_x0_eps

SPACINGS = ("trailing", "leading", "linspace", "karras")
#: the grid each sampler uses unless told otherwise: "trailing" (start at T-1). For Heun we also tried Karras
#: spacing: on a Gaussian exact teacher (linear schedule, sigma_max ~ 157) 3 Heun steps had a mean error of 2.18
#: against 0.19 on the trailing grid, because the first Karras step (sigma 157 -> ~6) makes the trapezoid overshoot.
DEFAULT_SPACING = {"ddim": "trailing", "dpm++2m": "trailing", "euler": "trailing", "heun": "trailing"}


# ---------------------------------------------------------------------- timestep grids
def make_timesteps(
    num_steps: int, num_train_timesteps: int = 1000, spacing: str = "trailing", steps_offset: int = 0,
    schedule: VPSchedule | None = None, rho: float = 7.0,
) -> torch.Tensor:
    """A grid ``[N+1]`` of timesteps from noise to data (last entry ``-1``), with diffusers' spacings.

    * ``trailing``: ``round(arange(T, 0, -T/N)) - 1`` - starts at ``T-1``; best at few steps (Lin et al. 2024).
    * ``leading``: ``arange(N) * (T // N) + steps_offset``, descending - diffusers' DDIM default.
    * ``linspace``: ``round(linspace(0, T-1, N+1))[::-1][:-1]`` - diffusers' DPM-Solver default.
    * ``karras``: EDM's ``sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
      between ``sigma(T-1)`` and ``sigma(0)`` (``sigma = s/a``), mapped back to fractional timesteps
      (diffusers' ``use_karras_sigmas``); needs ``schedule``.
    """
    require(num_steps >= 1, f"steps must be >= 1, got {num_steps}")
    T = num_train_timesteps
    require(num_steps <= T, f"steps must be <= {T} (the schedule's length), got {num_steps}")
    if spacing == "karras":
        require(schedule is not None, "karras spacing needs the schedule")
        smax, smin = float(schedule.s(T - 1) / schedule.a(T - 1)), float(schedule.s(0) / schedule.a(0))
        if num_steps == 1:
            return torch.tensor([float(T - 1), -1.0], dtype=torch.float64)
        ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
        sig = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        ts = schedule.timestep_from_alpha_bar(1.0 / (1.0 + sig**2))
        return torch.cat([ts, torch.tensor([-1.0], dtype=torch.float64)])
    if spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
    elif spacing == "leading":
        ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    else:
        raise RayflowError(f"unknown timestep spacing {spacing!r}; expected one of {', '.join(SPACINGS)}")
    return torch.tensor([*ts.tolist(), -1], dtype=torch.float64)


def window_timesteps(t_start: torch.Tensor, t_end: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Per-sample grids ``[B, N+1]`` that go linearly in ``t`` from ``t_start[b]`` to ``t_end[b]``."""
    require(num_steps >= 1, f"steps must be >= 1, got {num_steps}")
    t_start = torch.as_tensor(t_start, dtype=torch.float64).flatten()
    t_end = torch.as_tensor(t_end, dtype=torch.float64).flatten().expand_as(t_start)
    require(bool(torch.all(t_start > t_end)), "every window must start at a larger timestep than it ends")
    w = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)
    return t_start[:, None] + (t_end - t_start)[:, None] * w[None]


def _grid(timesteps: torch.Tensor, batch: int) -> torch.Tensor:
    ts = torch.as_tensor(timesteps, dtype=torch.float64).cpu()
    if ts.ndim == 1:
        ts = ts[None].expand(batch, -1)
    require(ts.ndim == 2 and ts.shape[0] == batch and ts.shape[1] >= 2,
            f"timesteps must have shape [N+1] or [{batch}, N+1] with N >= 1, got {tuple(ts.shape)}")
    return ts


def _predict(model: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: Condition, schedule: VPSchedule):
    a, s = expand_like(schedule.a(t), x), expand_like(schedule.s(t), x)
    pred = model(x, t.to(device=x.device, dtype=torch.float32), cond)
    return to_x0_eps(pred.to(x.dtype), model.prediction_type, x, a, s)


# ---------------------------------------------------------------------- samplers
@torch.no_grad()
def ddim(model: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, schedule: VPSchedule,
         cond: Condition = None, progress: bool = False) -> torch.Tensor:
    """Deterministic DDIM: ``x' = a' x0_hat + s' eps_hat`` along the grid."""
    ts = _grid(timesteps, x.shape[0])
    for i in tqdm(range(ts.shape[1] - 1), disable=not progress, desc="ddim", leave=False):
        x0, eps = _predict(model, x, ts[:, i], cond, schedule)
        tn = ts[:, i + 1]
        x = expand_like(schedule.a(tn), x) * x0 + expand_like(schedule.s(tn), x) * eps
    return x


@torch.no_grad()
def dpm_solver_pp_2m(model: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, schedule: VPSchedule,
                     cond: Condition = None, progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M), data prediction, midpoint update; lower-order first and final steps as diffusers."""
    ts = _grid(timesteps, x.shape[0])
    n = ts.shape[1] - 1
    x0_prev: torch.Tensor | None = None
    h_prev: torch.Tensor | None = None
    for i in tqdm(range(n), disable=not progress, desc="dpm++2m", leave=False):
        t, tn = ts[:, i], ts[:, i + 1]
        x0, _ = _predict(model, x, t, cond, schedule)
        a, s, an, sn = schedule.a(t), schedule.s(t), schedule.a(tn), schedule.s(tn)
        h = (torch.log(an) - torch.log(sn)) - (torch.log(a) - torch.log(s))  # inf when landing on data
        first = torch.full_like(h, x0_prev is None, dtype=torch.bool)
        if i == n - 1:
            first = first | (sn == 0) | (n < 15)
        d = x0
        if x0_prev is not None and not bool(first.all()):
            r = h_prev / h
            second = x0 + expand_like(0.5 / r, x0) * (x0 - x0_prev)
            d = torch.where(expand_like(first, x0).bool(), x0, second)
        x = expand_like(sn / s, x) * x - expand_like(an * torch.expm1(-h), x) * d
        x0_prev, h_prev = x0, h
    return x


@torch.no_grad()
def euler(model: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, schedule: VPSchedule,
          cond: Condition = None, progress: bool = False) -> torch.Tensor:
    """Euler on ``dx~/dsigma = eps_hat`` with ``x~ = x/a``, ``sigma = s/a`` (identical to DDIM)."""
    ts = _grid(timesteps, x.shape[0])
    for i in tqdm(range(ts.shape[1] - 1), disable=not progress, desc="euler", leave=False):
        t, tn = ts[:, i], ts[:, i + 1]
        _, eps = _predict(model, x, t, cond, schedule)
        a, an = schedule.a(t), schedule.a(tn)
        sigma, sigma_n = schedule.s(t) / a, schedule.s(tn) / an
        x = expand_like(an, x) * (x / expand_like(a, x) + expand_like(sigma_n - sigma, x) * eps)
    return x


@torch.no_grad()
def heun(model: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, schedule: VPSchedule,
         cond: Condition = None, progress: bool = False) -> torch.Tensor:
    """EDM's deterministic Heun sampler (Karras et al. 2022, Alg. 1) in ``(x~, sigma)``; Euler onto data."""
    ts = _grid(timesteps, x.shape[0])
    for i in tqdm(range(ts.shape[1] - 1), disable=not progress, desc="heun", leave=False):
        t, tn = ts[:, i], ts[:, i + 1]
        _, eps = _predict(model, x, t, cond, schedule)
        a, an = schedule.a(t), schedule.a(tn)
        sigma, sigma_n = schedule.s(t) / a, schedule.s(tn) / an
        dsig = expand_like(sigma_n - sigma, x)
        x_tilde = x / expand_like(a, x) + dsig * eps
        if bool(torch.any(sigma_n > 0)):
            _, eps2 = _predict(model, expand_like(an, x) * x_tilde, tn, cond, schedule)
            corrected = x / expand_like(a, x) + dsig * 0.5 * (eps + eps2)
            x_tilde = torch.where(expand_like(sigma_n > 0, x).bool(), corrected, x_tilde)
        x = expand_like(an, x) * x_tilde
    return x


SamplerFn = Callable[..., torch.Tensor]
SAMPLERS: dict[str, SamplerFn] = {"ddim": ddim, "dpm++2m": dpm_solver_pp_2m, "euler": euler, "heun": heun}


def sampler_nfe(name: str, steps: int) -> int:
    """Network evaluations of ``steps`` steps from noise to data (Heun: ``2N - 1``; the others ``N``)."""
    return 2 * steps - 1 if name == "heun" else steps


def steps_for_nfe(name: str, nfe: int) -> int:
    """The largest number of steps whose cost is at most ``nfe`` evaluations (at least 1)."""
    return max(1, (nfe + 1) // 2) if name == "heun" else max(1, nfe)


def get_sampler(name: str) -> SamplerFn:
    if name not in SAMPLERS:
        raise RayflowError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


@torch.no_grad()
def sample(
    model: Denoiser, noise: torch.Tensor, schedule: VPSchedule, sampler: str = "ddim", steps: int = 50,
    cond: Condition = None, guidance: float = 1.0, spacing: str | None = None, batch_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Solve the teacher's probability-flow ODE from ``noise`` (at ``t = T-1``) to data.

    ``spacing`` defaults to the sampler's (:data:`DEFAULT_SPACING`). ``guidance`` applies classifier-free
    guidance; ``batch_size`` splits large requests into chunks.
    """
    fn = get_sampler(sampler)
    grid = make_timesteps(steps, schedule.num_train_timesteps, spacing or DEFAULT_SPACING[sampler], schedule=schedule)
    guided = with_guidance(model, guidance)
    bs = batch_size or noise.shape[0]
    out = []
    chunks = range(0, noise.shape[0], bs)
    for start in tqdm(chunks, disable=not progress or len(chunks) == 1, desc=f"{sampler} x{steps}", leave=False):
        c = None if cond is None else cond[start:start + bs]
        out.append(fn(guided, noise[start:start + bs], grid, schedule, c))
    return torch.cat(out)
