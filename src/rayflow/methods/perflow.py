"""PeRFlow: Piecewise Rectified Flow (Yan et al., NeurIPS 2024; ``magic-research/piecewise-rectified-flow``).

Time. PeRFlow's ``t in [0, 1]`` (1 = noise, UNet input ``t * 1000``) is our flow time ``tau = (t + 1) / T``
(:func:`rayflow.schedules.timestep_to_flow_time`); the student is fed the integer timestep ``t = tau T - 1``.
``K`` equal windows have boundaries ``b_0 = T-1 > b_1 > ... > b_K = -1`` (:func:`rayflow.pairs.window_boundaries`).

Objective [SECONDARY Eq. 3, matches CODE]. For a window ``[t_s, t_e)`` (flow times ``tau_s > tau_e``)::

    z_s = a_{t_s} x0 + s_{t_s} eps            real data noised to the window start (VP forward marginal)
    z_e = Phi_teacher(z_s; t_s -> t_e)        the teacher ODE over the window (DDIM, 8 steps in the paper)
    z_t = z_s + (z_e - z_s) (tau - tau_s) / (tau_e - tau_s),        tau uniform in (tau_e, tau_s]
    min_theta E || v_theta(z_t, t) - (z_e - z_s) / (tau_e - tau_s) ||^2

Parameterisations [CODE ``scheduler_perflow.py``], all exact on a straight window. With ``ab = alpha_bar``:

* ``velocity``: the network outputs ``v`` directly.
* ``diff_eps`` (SD1.5): ``z_e = lambda_s z_s + eta_s eps`` with ``gamma = sqrt(ab_s / ab_e)``,
  ``lambda_s = 1/gamma``, ``eta_s = -sqrt(1 - gamma^2) / gamma`` - the noise of the forward process ``e -> s``.
* ``ddim_eps`` (SDXL): ``lambda_s = sqrt(ab_e / ab_s)``, ``eta_s = sqrt(1 - ab_e) - sqrt(ab_e (1 - ab_s) / ab_s)``
  - one DDIM step ``s -> e``, so a student initialised from an epsilon teacher starts as the teacher's DDIM.

The epsilon target is ``eps* = (z_e - lambda_s z_s) / eta_s``. Inside the window, eliminating ``z_s`` from the
straight path gives the window-end prediction at the current point (derivation in reflow-peers.md §B.2.3)::

    D = lambda_s (tau - tau_s) + (tau_e - tau)
    lambda_t = lambda_s (tau_e - tau_s) / D,   eta_t = eta_s (tau_e - tau) / D
    z_e_hat = lambda_t z_t + eta_t eps_hat,    v = (z_e_hat - z_t) / (tau_e - tau)

Sampler [CODE ``PeRFlowScheduler``]: ``N`` steps spread over the ``K`` windows, the noisiest windows taking the
remainder, each window's steps linear from its start (``N = 4``, ``K = 4``: ``t = 999, 749, 499, 249``); every
step is Euler with the window velocity ``v``. With fewer steps than windows a step spans several windows and
extrapolates the velocity of the window it starts in [INFERRED; PeRFlow needs ``N >= K``].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from rayflow import pairs as P
from rayflow.errors import require
from rayflow.losses import aligned_velocity_loss, regression_loss
from rayflow.methods import register
from rayflow.methods.base import DistillContext, DistillResult, Method
from rayflow.models.base import Condition, Denoiser
from rayflow.schedulers import PiecewiseFlowScheduler, schedule_fields
from rayflow.schedules import VPSchedule, expand_like, timestep_to_flow_time
from rayflow.training import LossOutput
from rayflow.windows import (  # re-exported: PeRFlow's names before the window maths moved to rayflow.windows
    WindowPoint,
    epsilon_target,
    native_target,
    piecewise_timesteps,
    point_coefficients,
    window_coefficients,
    window_end_prediction,
    window_velocity,
)

PARAMETERIZATIONS = ("diff_eps", "ddim_eps", "velocity")
_ALIASES = {"eps": "diff_eps", "v": "velocity"}
#: what ``parameterization="auto"`` becomes for a student initialised from an epsilon teacher (measured, see
#: docs/proreflow.md); a freshly initialised student (exact mixture teacher) always uses ``velocity``
AUTO_EPS_PARAMETERIZATION = "diff_eps"


def canonical_parameterization(name: str) -> str:
    name = _ALIASES.get(name, name)
    require(name in PARAMETERIZATIONS + ("auto",),
            f"unknown parameterization {name!r}; expected auto, {', '.join(PARAMETERIZATIONS)} (or eps, v)")
    return name


def resolve_parameterization(name: str, ctx: DistillContext) -> str:
    """``auto``: PeRFlow's SD1.5 ``diff_eps`` when the student starts from an epsilon teacher's weights,
    ``velocity`` for a fresh network, which learns a bounded velocity far more easily than an epsilon that the
    high-noise windows amplify (``|eta_s| >> 1``). Both choices are measured in docs/proreflow.md."""
    if name != "auto":
        return name
    eps_init = ctx.student_init is not None and ctx.student_config.prediction_type == "epsilon"
    return AUTO_EPS_PARAMETERIZATION if eps_init else "velocity"


def _resolved(name: str) -> str:
    require(name != "auto", "parameterization=auto is resolved by distill(); a saved student names its own")
    return name


# ---------------------------------------------------------------------- conversions
# ---------------------------------------------------------------------- sampler
@torch.no_grad()
def piecewise_solve(model: Denoiser, z: torch.Tensor, timesteps: torch.Tensor, boundaries: torch.Tensor,
                    schedule: VPSchedule, parameterization: str, cond: Condition = None) -> torch.Tensor:
    """Euler with the window velocity along a grid ``[N+1]`` or per-sample ``[B, N+1]`` (PeRFlow's scheduler)."""
    ts = torch.as_tensor(timesteps, dtype=torch.float64)
    if ts.ndim == 1:
        ts = ts[None].expand(z.shape[0], -1)
    T = schedule.num_train_timesteps
    for i in range(ts.shape[1] - 1):
        t, t_next = ts[:, i], ts[:, i + 1]
        k = P.window_index(t, boundaries)
        where = WindowPoint(t, boundaries[k], boundaries[k + 1], T)
        pred = model(z, t.to(device=z.device, dtype=torch.float32), cond)
        v = window_velocity(pred.to(z.dtype), z, where, schedule, parameterization)
        z = z + expand_like(timestep_to_flow_time(t_next, T) - where.tau, z) * v
    return z


# ---------------------------------------------------------------------- training objective
WEIGHTINGS = ("none", "reciprocal")


def loss_weight(tau: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-sample loss weight: ``none`` (1) or PeRFlow's ``reciprocal`` ``1 / max(1 - tau, 0.1) / 2.3`` [CODE],
    which up-weights the noisy windows whose velocities (and so squared errors) are small."""
    if weighting == "reciprocal":
        return 1.0 / (1.0 - tau).clamp(min=0.1) / 2.3
    return torch.ones_like(tau)


class WindowObjective:
    """PeRFlow's window regression (and ProReflow's, with ``loss_space="velocity"`` and ``alpha > 0``).

    Draws pairs from the pool, ``t`` uniform on the integers of ``(t_e, t_s]`` (PeRFlow discretises ``t`` on the
    1/1000 grid [CODE]), builds ``z_t`` on the chord and regresses:

    * ``loss_space="native"``: the network output onto its own target (epsilon* or the chord velocity) with
      ``loss`` (PeRFlow's MSE);
    * ``loss_space="velocity"``: the output converted to the window velocity, against the chord velocity, with
      ProReflow's aligned loss ``MSE + alpha (1 - cos)``.

    Logs the batch means of the velocity cosine and norm ratio either way.
    """

    def __init__(self, pool: P.Pairs, boundaries: torch.Tensor, schedule: VPSchedule, batch_size: int,
                 parameterization: str, loss_space: str = "native", alpha: float = 0.0, loss: str = "mse",
                 huber_c: float = 1e-3, weighting: str = "none") -> None:
        require(loss_space in ("native", "velocity"), f"loss_space must be native or velocity, got {loss_space!r}")
        require(weighting in WEIGHTINGS, f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        self.pool, self.boundaries, self.schedule = pool, boundaries, schedule
        self.batch_size, self.parameterization = batch_size, parameterization
        self.loss_space, self.alpha, self.loss, self.huber_c = loss_space, alpha, loss, huber_c
        self.weighting = weighting

    def __call__(self, model: Denoiser, step: int, generator: torch.Generator) -> LossOutput:
        dev = generator.device
        data = self.pool.batch(self.batch_size, generator)
        # the window maths stays on the device (float64): a host copy of the windows would stall every step
        bounds = self._boundaries_on(dev)
        k = data["window"].to(dev)
        t_s, t_e = bounds[k], bounds[k + 1]
        u = torch.rand(self.batch_size, generator=generator, device=dev).double()
        t = t_e + 1 + torch.floor(u * (t_s - t_e))  # integers in (t_e, t_s]
        where = WindowPoint(t, t_s, t_e, self.schedule.num_train_timesteps)
        z_s, z_e = data["z_start"], data["z_end"]
        w = expand_like((where.tau - where.tau_start) / (where.tau_end - where.tau_start), z_s)
        z_t = z_s + (z_e - z_s) * w
        cond = data.get("labels")
        pred = model(z_t, t.to(dev, torch.float32), cond).float()
        v_hat = window_velocity(pred, z_t, where, self.schedule, self.parameterization)
        v_star = (z_e - z_s) / expand_like(where.tau_end - where.tau_start, z_e)
        if self.loss_space == "velocity":
            per_sample, diag = aligned_velocity_loss(v_hat, v_star, self.alpha)
        else:
            target = native_target(z_s, z_e, where, self.schedule, self.parameterization)
            per_sample = regression_loss(pred, target, self.loss, self.huber_c)
            _, diag = aligned_velocity_loss(v_hat.detach(), v_star, 0.0)
        per_sample = per_sample * loss_weight(where.tau, self.weighting).to(per_sample)
        # logs stay device tensors: the trainer reads them once per log interval, not every step
        return LossOutput(per_sample.mean(), {"cos": diag["cos"].detach().mean(),
                                              "norm_ratio": diag["norm_ratio"].detach().mean()})

    def _boundaries_on(self, device: torch.device) -> torch.Tensor:
        """The window boundaries on ``device``, copied there once."""
        cached = getattr(self, "_bounds", None)
        if cached is None or cached.device != device:
            cached = self._bounds = self.boundaries.to(device)
        return cached


def train_windows(ctx: DistillContext, method: Method, objective: Any, steps: int, out_dir, init: Denoiser | None,
                  run_extra: dict[str, Any] | None = None) -> Denoiser:
    """Train a student (fresh from the teacher, or ``init``) on ``objective`` for ``steps`` updates into ``out_dir``;
    ``run_extra`` is added to (and may override keys of) the run config."""
    return ctx.train_stage(method, ctx.build_student(init=init), objective, steps, out_dir, run_extra)


# ---------------------------------------------------------------------- the method
@dataclass
class PeRFlowConfig:
    windows: int = 4  # K [CODE: num_windows = 4]
    parameterization: str = "auto"  # auto | diff_eps (SD1.5 script) | ddim_eps (SDXL script) | velocity
    solver: str = "ddim"  # the teacher's window solver [CODE: PFODESolver = DDIM]
    solver_steps: int = 8  # teacher steps per window [CODE: solving_steps 8 for SD1.5]
    pool_size: int = 16384  # pool size (teacher evaluations = pool_size * solver_steps * CFG factor)
    loss: str = "mse"  # mse | huber
    huber_c: float = 1e-3
    weighting: str = "none"  # none | reciprocal: 1/max(1-tau, 0.1)/2.3 [CODE: --loss_type]
    label_dropout: float = 0.1  # CFG-sync: the teacher solves the same dropped label the student sees [CODE]


@register
class PeRFlow(Method):
    """PeRFlow: K windows, a straight chord in each, epsilon-parameterised student, piecewise Euler sampler."""

    name = "perflow"
    display_name = "PeRFlow"
    config_class = PeRFlowConfig
    nfes = (4, 8)

    def validate(self) -> None:
        c = self.config
        c.parameterization = canonical_parameterization(c.parameterization)
        require(c.windows >= 1, f"perflow: windows must be >= 1, got {c.windows}")
        require(c.solver in P.PAIR_SOLVERS, f"perflow: unknown solver {c.solver!r}")
        require(c.solver_steps >= 1, f"perflow: solver_steps must be >= 1, got {c.solver_steps}")
        require(c.pool_size >= 1, f"perflow: pool_size must be >= 1, got {c.pool_size}")
        require(c.loss in ("mse", "huber"), f"perflow: loss must be mse or huber, got {c.loss!r}")
        require(c.weighting in WEIGHTINGS, f"perflow: weighting must be one of {', '.join(WEIGHTINGS)}")
        require(0 <= c.label_dropout < 1, f"perflow: label_dropout must be in [0, 1), got {c.label_dropout}")
        self.nfes = tuple(n for n in (c.windows, 2 * c.windows) if n <= 8) or (c.windows,)

    def boundaries(self, schedule: VPSchedule) -> torch.Tensor:
        return P.window_boundaries(self.config.windows, schedule.num_train_timesteps)

    def distill(self, ctx: DistillContext) -> DistillResult:
        self.config = dataclasses.replace(self.config,
                                          parameterization=resolve_parameterization(self.config.parameterization, ctx))
        c = self.config
        b = self.boundaries(ctx.schedule)
        pool = P.window_pairs(
            P.teacher_window_solver(ctx.teacher, ctx.schedule, c.solver, c.solver_steps, ctx.guidance), ctx.teacher,
            ctx.dataset, ctx.schedule, b, c.pool_size, num_classes=ctx.teacher.num_classes,
            label_dropout=c.label_dropout, seed=ctx.train.seed + 7, cache=ctx.cache_path(f"perflow-w{c.windows}"),
            meta=P.teacher_meta(ctx.teacher, solver=c.solver, steps=c.solver_steps, guidance=ctx.guidance),
            device=ctx.device, accelerator=ctx.accelerator, progress=ctx.progress, desc="perflow pairs")
        objective = WindowObjective(pool, b, ctx.schedule, ctx.train.batch_size, c.parameterization,
                                    loss=c.loss, huber_c=c.huber_c, weighting=c.weighting)
        net = train_windows(ctx, self, objective, ctx.train.max_steps, ctx.out_dir, None)
        return DistillResult(self.wrap_student(net, ctx.schedule), pool.nfe,
                             {"pair_nfe": pool.nfe, "teacher_nfe_this_run": ctx.teacher.evaluations,
                              "num_pairs": len(pool)})

    def make_scheduler(self, schedule: VPSchedule, network: Denoiser | None = None) -> PiecewiseFlowScheduler:
        return PiecewiseFlowScheduler(**schedule_fields(schedule), windows=self.config.windows,
                                      parameterization=_resolved(self.config.parameterization))

    def nfe_for_steps(self, steps: int) -> int:
        return steps


__all__ = [
    "AUTO_EPS_PARAMETERIZATION", "PARAMETERIZATIONS", "WEIGHTINGS", "PeRFlow", "PeRFlowConfig", "WindowObjective",
    "WindowPoint", "canonical_parameterization", "epsilon_target", "loss_weight", "native_target", "piecewise_solve",
    "piecewise_timesteps", "point_coefficients", "resolve_parameterization", "train_windows", "window_coefficients",
    "window_end_prediction", "window_velocity",
]
