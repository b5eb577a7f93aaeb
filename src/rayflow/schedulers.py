r"""Every few-step sampling rule of a distilled student as a diffusers scheduler (``SchedulerMixin + ConfigMixin``).

A scheduler is configured by the VP training schedule (diffusers' ``num_train_timesteps``, ``beta_start``,
``beta_end``, ``beta_schedule``, ``trained_betas``) and the method's sampling parameters, and drives the *raw*
student network as saved on disk (whatever its ``prediction_type``), so diffusers' own loop works unchanged::

    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(net(scheduler.scale_model_input(x, t), t), t, x).prev_sample

``timesteps`` are what the network is called with, in our convention (integer or fractional ``0 .. T-1``, large =
noise; ``-1`` = clean data is only ever a grid end). ``step`` also returns ``pred_original_sample`` (the ``x0``
estimate). :func:`run_scheduler` is that loop with classifier-free guidance; every method's ``sample`` is it.

=========================  =================================  =============================================
scheduler                  rule                               methods
=========================  =================================  =============================================
:class:`RayFlowScheduler`  ray inversion and re-projection    RayFlow
:class:`PiecewiseFlowSch.` Euler with the window velocity     PeRFlow, ProReflow
:class:`FlowEulerScheduler` Euler on ``dx/dtau = u``          2-Rectified Flow / InstaFlow
:class:`GridDDIMScheduler` DDIM on an explicit grid           Rectified Diffusion (trailing, or phased)
=========================  =================================  =============================================

Rectified Diffusion does not use diffusers' stock ``DDIMScheduler``: its trailing grid steps to ``t - T // N``
(not to the next grid point when ``N`` does not divide ``T``) and it has no phased grid, so it would not
reproduce the trained sampler exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput as SchedulerOutput

from rayflow.errors import RayflowError, require
from rayflow.models.base import Condition, Denoiser, with_guidance
from rayflow.samplers import make_timesteps
from rayflow.schedules import INTEGER_TIMESTEP_DTYPES, VPSchedule, expand_like, timestep_to_flow_time, to_x0_eps
from rayflow.windows import (
    WindowPoint,
    piecewise_timesteps,
    window_boundaries,
    window_index,
    window_parameterization,
    window_velocity,
)

_COSINE_DEFAULTS = {"max_beta": 0.999, "s": 0.008}


# ---------------------------------------------------------------------- the VP schedule as diffusers fields
def schedule_fields(schedule: VPSchedule) -> dict[str, Any]:
    """The diffusers scheduler fields that rebuild ``schedule`` (:func:`schedule_from_fields` inverts this)."""
    cfg = dict(schedule.config)
    kind = cfg.get("kind")
    T = schedule.num_train_timesteps
    if kind in ("linear", "scaled_linear"):
        return {"num_train_timesteps": T, "beta_start": float(cfg["beta_start"]), "beta_end": float(cfg["beta_end"]),
                "beta_schedule": kind, "trained_betas": None}
    if kind == "cosine" and all(cfg.get(k, v) == v for k, v in _COSINE_DEFAULTS.items()):
        return {"num_train_timesteps": T, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "squaredcos_cap_v2",
                "trained_betas": None}
    if kind == "diffusers":
        dc = cfg["diffusers_config"]
        if dc.get("trained_betas") is None and dc.get("beta_schedule", "linear") in ("linear", "scaled_linear"):
            return {"num_train_timesteps": T, "beta_start": float(dc.get("beta_start", 0.0001)),
                    "beta_end": float(dc.get("beta_end", 0.02)), "beta_schedule": dc.get("beta_schedule", "linear"),
                    "trained_betas": None}
    # anything else: the betas themselves (exact up to the float64 round trip through alpha_bar)
    ac = schedule.alphas_cumprod
    betas = torch.cat([1 - ac[:1], 1 - ac[1:] / ac[:-1]])
    return {"num_train_timesteps": T, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
            "trained_betas": [float(b) for b in betas]}


def schedule_from_fields(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                         trained_betas: list[float] | None) -> VPSchedule:
    """The :class:`VPSchedule` of diffusers scheduler fields, built as rayflow builds it (tables match bit for bit)."""
    T = int(num_train_timesteps)
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=torch.float64)
        require(betas.numel() == T, f"trained_betas has {betas.numel()} entries, num_train_timesteps is {T}")
        return VPSchedule(torch.cumprod(1.0 - betas, 0))
    if beta_schedule == "linear":
        return VPSchedule.linear(T, beta_start, beta_end)
    if beta_schedule == "scaled_linear":
        return VPSchedule.scaled_linear(T, beta_start, beta_end)
    if beta_schedule == "squaredcos_cap_v2":
        return VPSchedule.cosine(T)
    raise RayflowError(f"unknown beta_schedule {beta_schedule!r}; expected linear, scaled_linear, squaredcos_cap_v2")


class _StudentScheduler(SchedulerMixin, ConfigMixin):
    """Shared plumbing: the VP schedule from the config, the step counter, and diffusers' attributes."""

    order = 1
    config_name = "scheduler_config.json"

    def _init_schedule(self) -> None:
        c = self.config
        self.schedule = schedule_from_fields(c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule,
                                             c.trained_betas)
        self.init_noise_sigma = 1.0
        self.timesteps = torch.zeros(0)
        self.num_inference_steps: int | None = None
        self._grid = torch.zeros(0, dtype=torch.float64)
        self._step_index = 0

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)

    def _set_grid(self, grid: torch.Tensor, network_timesteps: torch.Tensor, device: Any) -> None:
        self._grid = grid
        self.num_inference_steps = grid.numel() - 1
        self.timesteps = network_timesteps.to(device=device, dtype=torch.float32)
        self._step_index = 0

    def _index(self, timestep: Any) -> int:
        """The step being taken: counted like diffusers' schedulers (the loop calls ``step`` in order)."""
        require(self._grid.numel() >= 2, f"{type(self).__name__}: call set_timesteps first")
        require(self._step_index < self._grid.numel() - 1, f"{type(self).__name__}: all steps were taken")
        return self._step_index

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample


def _coef(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return expand_like(value.reshape(1).expand(like.shape[0]), like)


# ---------------------------------------------------------------------- RayFlow
def vp_matched(schedule: VPSchedule, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The VP point with the ray point's SNR: ``(c, a', s', t')`` (float64, ``[B]``) for ray timesteps ``t``.

    ``c = 1/sqrt(a^2 + (1-a)^2)``, ``a' = c a``, ``s' = c (1 - a)`` (so ``a'^2 + s'^2 = 1`` and
    ``a'/s' = a/(1-a)``), ``t' = alpha_bar^{-1}(a'^2)``. The ray's SNR is higher than VP's at the same ``t``
    (``(1+a)/(1-a)`` times), so ``t' <= t``; below the schedule's first step (``a'^2 > alpha_bar_0``, only for
    ``a_t`` within ~1% of 1) ``t'`` is clamped to 0 and the network sees slightly more signal than it expects.
    Integer ``t`` (a training step's draws) reads a table of all four, computed once per schedule and device by
    the fractional path on the host (the same values there, bit for bit; tested).
    """
    t = torch.as_tensor(t)
    if t.dtype in INTEGER_TIMESTEP_DTYPES:  # a training step's draws: four table reads (the host's values)
        schedule.check_timesteps(t)
        table = schedule.per_device("_vp_matched", t.device, lambda d: torch.stack(vp_matched(
            schedule, torch.arange(-1, schedule.num_train_timesteps, dtype=torch.float64))).to(d))
        return tuple(table[:, t.clamp(min=-1).long() + 1])
    a = schedule.a(t.double())  # on t's device
    c = 1.0 / torch.sqrt(a * a + (1 - a) ** 2)
    a2, s2 = c * a, c * (1 - a)
    return c, a2, s2, schedule.timestep_from_alpha_bar(a2 * a2)


class RayFlowScheduler(_StudentScheduler):
    r"""RayFlow's sampler (Algorithms 2/3): along a grid ``t_0 > ... > t_N = -1`` of ray timesteps,

    ``x0_hat, eps_hat`` from the network called at the VP-matched point ``(c x, t')`` (:func:`vp_matched`), then
    ``x_{t_{i+1}} = a_{t_{i+1}} x0_hat + (1 - a_{t_{i+1}}) eps_hat`` (the last step lands on ``x0_hat``).
    The sample is the ray point ``x``; ``scale_model_input`` multiplies it by ``c`` (as diffusers' Euler schedulers
    rescale their sigma-space sample) and ``timesteps`` are the ``t'``. ``init_noise_sigma = start_std`` (1 for
    standard start noise). Either RayFlow form gives the same step: it is written in ``(x0, eps_mu)``.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas: list[float] | None = None,
                 prediction_type: str = "flow", timestep_spacing: str = "trailing", start_std: float = 1.0) -> None:
        self._init_schedule()
        self.init_noise_sigma = float(start_std)
        self._c = torch.zeros(0, dtype=torch.float64)

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None,
                      grid: torch.Tensor | None = None) -> None:
        """``num_inference_steps`` on ``timestep_spacing``, or an explicit decreasing ray ``grid`` ``[N+1]``."""
        T = self.config.num_train_timesteps
        if grid is None:
            require(num_inference_steps is not None and int(num_inference_steps) >= 1,
                    f"rayflow: steps must be >= 1, got {num_inference_steps}")
            grid = make_timesteps(int(num_inference_steps), T, self.config.timestep_spacing, schedule=self.schedule)
        grid = check_grid(grid, T)
        c, _, _, t2 = vp_matched(self.schedule, grid[:-1])
        self._c = c
        self._set_grid(grid, t2, device)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return _coef(self._c[self._index(timestep)], sample) * sample

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
             return_dict: bool = True) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        i = self._index(timestep)
        c, a2, s2, _ = (_coef(v, sample) for v in vp_matched(self.schedule, self._grid[i:i + 1]))
        x0, eps = to_x0_eps(model_output.to(sample.dtype), self.config.prediction_type, c * sample, a2, s2)
        an = self.schedule.a(self._grid[i + 1]).to(dtype=sample.dtype, device=sample.device)
        prev = an * x0 + (1 - an) * eps
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)


def check_grid(timesteps: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """A sampling grid ``[N+1]``: strictly decreasing, from at most ``T-1`` down to ``-1`` (data) or above."""
    ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten().cpu()
    require(ts.numel() >= 2, f"rayflow: a timestep grid needs at least 2 entries (1 step), got {ts.numel()}")
    require(bool(torch.all(ts[1:] < ts[:-1])), f"rayflow: timesteps must decrease strictly, got {ts.tolist()}")
    require(float(ts[0]) <= num_train_timesteps - 1 and float(ts[-1]) >= -1,
            f"rayflow: timesteps must lie in [-1, {num_train_timesteps - 1}], got {ts.tolist()}")
    return ts


# ---------------------------------------------------------------------- straight flows (2-RF, InstaFlow)
def flow_timesteps(num_steps: int, num_train_timesteps: int) -> torch.Tensor:
    """Uniform flow times ``1 = tau_0 > ... > tau_N = 0`` as timesteps ``tau T - 1`` (InstaFlow's Euler grid)."""
    require(num_steps >= 1, f"steps must be >= 1, got {num_steps}")
    tau = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return tau * num_train_timesteps - 1.0


def vp_point(tau: torch.Tensor, schedule: VPSchedule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                               torch.Tensor]:
    """For flow times ``tau`` (float64 ``[B]``): ``(r, t_vp, a, s)`` - the rescaling ``r``, the VP timestep whose
    ``alpha_bar`` is ``((1-tau)/r)^2`` (clamped to the table) and that timestep's coefficients."""
    r = ((1 - tau) ** 2 + tau**2).sqrt()
    t_vp = schedule.timestep_from_alpha_bar(((1 - tau) / r) ** 2)
    return r, t_vp, schedule.a(t_vp), schedule.s(t_vp)


def velocity_from_vp(pred: torch.Tensor, prediction_type: str, x: torch.Tensor, tau: torch.Tensor,
                     schedule: VPSchedule) -> torch.Tensor:
    """``u = dx/dtau`` at the flow point ``x`` from a VP network's output at ``(x / r, t_vp)`` (:func:`vp_point`):
    ``(x - x0_hat) / tau`` for ``tau >= 1/2`` (defined at ``tau = 1``), else ``eps_hat - x0_hat``."""
    r, _, a, s = vp_point(tau, schedule)
    x_vp = x / expand_like(r, x)
    x0, eps = to_x0_eps(pred.to(x.dtype), prediction_type, x_vp, expand_like(a, x), expand_like(s, x))
    high = expand_like(tau >= 0.5, x).bool()
    return torch.where(high, (x - x0) / expand_like(tau.clamp(min=0.5), x), eps - x0)


class FlowEulerScheduler(_StudentScheduler):
    r"""Euler on the straight flow ``x_tau = (1 - tau) x0 + tau eps``: ``x <- x + (tau' - tau) u`` with ``u = dx/dtau``
    on InstaFlow's uniform grid (:func:`flow_timesteps`, timesteps ``tau T - 1``).

    A ``flow`` network outputs ``u`` at ``(x, tau T - 1)``; any other ``prediction_type`` is a VP network, called at
    ``(x / r, t_vp)`` (``scale_model_input`` divides by ``r``; ``timesteps`` are the ``t_vp``) and converted exactly
    (:func:`velocity_from_vp`). ``pred_original_sample`` is ``x - tau u``.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas: list[float] | None = None,
                 prediction_type: str = "flow") -> None:
        self._init_schedule()

    def _tau(self, i: int) -> torch.Tensor:
        return (self._grid[i:i + 1] + 1.0) / self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps: int, device: Any = None) -> None:
        grid = flow_timesteps(int(num_inference_steps), self.config.num_train_timesteps)
        net_t = grid[:-1] if self.config.prediction_type == "flow" else vp_point((grid[:-1] + 1.0) / len(self),
                                                                                 self.schedule)[1]
        self._set_grid(grid, net_t, device)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        if self.config.prediction_type == "flow":
            return sample
        r = vp_point(self._tau(self._index(timestep)), self.schedule)[0]
        return sample / _coef(r, sample)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
             return_dict: bool = True) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        i = self._index(timestep)
        tau = self._tau(i).expand(sample.shape[0])
        if self.config.prediction_type == "flow":
            u = model_output.to(sample.dtype)
        else:
            u = velocity_from_vp(model_output, self.config.prediction_type, sample, tau, self.schedule)
        t, tn = self._grid[i], self._grid[i + 1]
        prev = sample + ((tn - t) / self.config.num_train_timesteps).item() * u
        x0 = sample - expand_like(tau, sample) * u
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)


# ---------------------------------------------------------------------- piecewise flows (PeRFlow, ProReflow)
class PiecewiseFlowScheduler(_StudentScheduler):
    r"""PeRFlow's sampler: ``N`` steps spread over ``K`` equal windows (:func:`rayflow.windows.piecewise_timesteps`),
    each an Euler step ``z <- z + (tau' - tau) v`` with the window velocity ``v`` that the network output gives under
    ``parameterization`` (``flow``, ``window_epsilon`` or ``epsilon``; :func:`rayflow.windows.window_velocity`).
    The network is called at ``(z, t)`` on the grid; ``pred_original_sample`` is ``z - tau v``.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas: list[float] | None = None,
                 windows: int = 4, parameterization: str = "window_epsilon") -> None:
        try:  # PeRFlow's own names (diff_eps, ddim_eps, velocity) in older saved configs still read
            window_parameterization(parameterization)
        except ValueError as exc:
            raise RayflowError(str(exc)) from None
        self._init_schedule()
        self.boundaries = window_boundaries(int(windows), int(num_train_timesteps))

    def set_timesteps(self, num_inference_steps: int, device: Any = None) -> None:
        grid = piecewise_timesteps(int(num_inference_steps), self.boundaries)
        self._set_grid(grid, grid[:-1], device)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
             return_dict: bool = True) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        i = self._index(timestep)
        T = self.config.num_train_timesteps
        t, t_next = self._grid[i:i + 1].expand(sample.shape[0]), self._grid[i + 1:i + 2].expand(sample.shape[0])
        k = window_index(t, self.boundaries)
        where = WindowPoint(t, self.boundaries[k], self.boundaries[k + 1], T)
        v = window_velocity(model_output.to(sample.dtype), sample, where, self.schedule, self.config.parameterization)
        prev = sample + expand_like(timestep_to_flow_time(t_next, T) - where.tau, sample) * v
        x0 = sample - expand_like(where.tau, sample) * v
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)


# ---------------------------------------------------------------------- DDIM on a grid (Rectified Diffusion)
class GridDDIMScheduler(_StudentScheduler):
    r"""Deterministic DDIM ``x' = a' x0_hat + s' eps_hat`` on the trailing grid, or spread over ``windows`` phases
    like PeRFlow's (``timestep_spacing="windows"``: Rectified Diffusion-Phased). The network is called at ``(x, t)``.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas: list[float] | None = None,
                 prediction_type: str = "epsilon", timestep_spacing: str = "trailing", windows: int = 4) -> None:
        self._init_schedule()

    def set_timesteps(self, num_inference_steps: int, device: Any = None) -> None:
        T, n = self.config.num_train_timesteps, int(num_inference_steps)
        if self.config.timestep_spacing == "windows":
            grid = piecewise_timesteps(n, window_boundaries(int(self.config.windows), T))
        else:
            grid = make_timesteps(n, T, self.config.timestep_spacing, schedule=self.schedule)
        self._set_grid(grid, grid[:-1], device)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
             return_dict: bool = True) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        i = self._index(timestep)
        t, tn = self._grid[i:i + 1], self._grid[i + 1:i + 2]
        x0, eps = to_x0_eps(model_output.to(sample.dtype), self.config.prediction_type, sample,
                            _coef(self.schedule.a(t), sample), _coef(self.schedule.s(t), sample))
        prev = _coef(self.schedule.a(tn), sample) * x0 + _coef(self.schedule.s(tn), sample) * eps
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)


# ---------------------------------------------------------------------- the one sampling loop
@torch.no_grad()
def run_scheduler(model: Denoiser, scheduler: SchedulerMixin, noise: torch.Tensor, steps: int,
                  cond: Condition = None, guidance: float = 1.0, grid: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' loop over ``scheduler`` with the raw student network ``model`` (classifier-free guidance
    ``guidance`` on its output: exact for every rule here, each being affine in the network output). ``grid``:
    an explicit timestep grid instead of ``steps`` (:class:`RayFlowScheduler` only)."""
    if grid is None:
        scheduler.set_timesteps(int(steps), device=noise.device)
    else:
        scheduler.set_timesteps(device=noise.device, grid=grid)
    net = with_guidance(model, guidance)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        out = net(inp, t.reshape(1).expand(x.shape[0]).to(device=x.device, dtype=torch.float32), cond)
        x = scheduler.step(out, t, x).prev_sample
    return x


SCHEDULERS: dict[str, type[_StudentScheduler]] = {
    cls.__name__: cls for cls in (RayFlowScheduler, FlowEulerScheduler, PiecewiseFlowScheduler, GridDDIMScheduler)
}


def load_scheduler(directory: Any) -> SchedulerMixin:
    """The scheduler saved in ``directory`` (``scheduler_config.json``, its ``_class_name`` picks the class)."""
    import json
    from pathlib import Path

    path = Path(directory) / "scheduler_config.json"
    require(path.is_file(), f"{path}: no scheduler config")
    name = json.loads(path.read_text()).get("_class_name")
    require(name in SCHEDULERS, f"{path}: unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_pretrained(str(directory))


__all__ = ["FlowEulerScheduler", "GridDDIMScheduler", "PiecewiseFlowScheduler", "RayFlowScheduler", "SCHEDULERS",
           "SchedulerOutput", "check_grid", "flow_timesteps", "load_scheduler", "run_scheduler", "schedule_fields",
           "schedule_from_fields", "velocity_from_vp", "vp_matched", "vp_point"]
