"""PeRFlow: Piecewise Rectified Flow (Yan et al., NeurIPS 2024; ``magic-research/piecewise-rectified-flow``).

Time. PeRFlow's ``t in [0, 1]`` (1 = noise, UNet input ``t * 1000``) is our flow time ``tau = (t + 1) / T``
(:func:`rayflow.schedules.timestep_to_flow_time`); the student is fed the integer timestep ``t = tau T - 1``.
``K`` equal windows have boundaries ``b_0 = T-1 > b_1 > ... > b_K = -1`` (:func:`rayflow.pairs.window_boundaries`).

Objective [SECONDARY Eq. 3, matches CODE]. For a window ``[t_s, t_e)`` (flow times ``tau_s > tau_e``)::

    z_s = a_{t_s} x0 + s_{t_s} eps            real data noised to the window start (VP forward marginal)
    z_e = Phi_teacher(z_s; t_s -> t_e)        the teacher ODE over the window (DDIM, 8 steps in the paper)
    z_t = z_s + (z_e - z_s) (tau - tau_s) / (tau_e - tau_s),        tau uniform in (tau_e, tau_s]
    min_theta E || v_theta(z_t, t) - (z_e - z_s) / (tau_e - tau_s) ||^2

Parameterisations [CODE ``scheduler_perflow.py``], all exact on a straight window; the names are the package's
(PeRFlow's own in brackets, still accepted). With ``ab = alpha_bar``:

* ``flow`` (``velocity``): the network outputs ``v = dz/dtau`` directly (flow time, 1 = noise).
* ``window_epsilon`` (``diff_eps``, SD1.5): ``z_e = lambda_s z_s + eta_s eps`` with ``gamma = sqrt(ab_s / ab_e)``,
  ``lambda_s = 1/gamma``, ``eta_s = -sqrt(1 - gamma^2) / gamma`` - the noise of the forward process ``e -> s``.
* ``epsilon`` (``ddim_eps``, SDXL): ``lambda_s = sqrt(ab_e / ab_s)``,
  ``eta_s = sqrt(1 - ab_e) - sqrt(ab_e (1 - ab_s) / ab_s)`` - diffusers' epsilon, one DDIM step ``s -> e``, so a
  student initialised from an epsilon teacher starts as the teacher's DDIM.

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

import torch

from rayflow import pairs as P
from rayflow.errors import require
from rayflow.methods import register
from rayflow.methods.base import DistillContext, DistillResult, Method
from rayflow.methods.kit import PairSpec, make_pairs
from rayflow.methods.windowed import (  # re-exported: PeRFlow's names before they were shared
    AUTO_EPS_PARAMETERIZATION,
    PARAMETERIZATIONS,
    VALUE_ALIASES,
    WEIGHTINGS,
    WindowObjective,
    canonical_parameterization,
    check_parameterization,
    loss_weight,
    piecewise_solve,
    resolve_parameterization,
    train_windows,
)
from rayflow.models.base import Denoiser
from rayflow.schedulers import PiecewiseFlowScheduler, schedule_fields
from rayflow.schedules import VPSchedule
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


# ---------------------------------------------------------------------- the method
@dataclass
class PeRFlowConfig:
    windows: int = 4  # K [CODE: num_windows = 4]
    parameterization: str = "auto"  # auto | window_epsilon (diff_eps, SD1.5) | epsilon (ddim_eps, SDXL) | flow
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
    value_aliases = VALUE_ALIASES

    def validate(self) -> None:
        c = self.config
        check_parameterization(c.parameterization, "perflow")
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

    def resolve(self, ctx: DistillContext) -> PeRFlowConfig:
        return dataclasses.replace(self.config,
                                   parameterization=resolve_parameterization(self.config.parameterization, ctx))

    def distill(self, ctx: DistillContext) -> DistillResult:
        c = self.config
        b = self.boundaries(ctx.schedule)
        pool = make_pairs(ctx, PairSpec(f"perflow-w{c.windows}", c.pool_size, seed=7, desc="perflow: teacher pairs",
                                        solver=c.solver, steps=c.solver_steps, spacing=None, windows=b,
                                        label_dropout=c.label_dropout))
        objective = WindowObjective(pool, b, ctx.schedule, ctx.train.batch_size, c.parameterization,
                                    loss=c.loss, huber_c=c.huber_c, weighting=c.weighting)
        net = ctx.train_stage(self, ctx.build_student(), objective, ctx.train.max_steps, ctx.out_dir)
        return DistillResult(self.wrap_student(net, ctx.schedule), ctx.teacher_nfe,
                             {"pair_nfe": pool.nfe, "teacher_nfe_this_run": ctx.teacher.evaluations,
                              "num_pairs": len(pool)}, method=self)

    def make_scheduler(self, schedule: VPSchedule, network: Denoiser | None = None) -> PiecewiseFlowScheduler:
        return PiecewiseFlowScheduler(**schedule_fields(schedule), windows=self.config.windows,
                                      parameterization=self.config.parameterization)



__all__ = [
    "AUTO_EPS_PARAMETERIZATION", "PARAMETERIZATIONS", "VALUE_ALIASES", "WEIGHTINGS", "PeRFlow", "PeRFlowConfig",
    "WindowObjective", "WindowPoint", "canonical_parameterization", "check_parameterization", "epsilon_target",
    "loss_weight", "native_target", "piecewise_solve", "piecewise_timesteps", "point_coefficients",
    "resolve_parameterization", "train_windows", "window_coefficients", "window_end_prediction", "window_velocity",
]
