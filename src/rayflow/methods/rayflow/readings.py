r"""Readings of RayFlow's ``eps_mu`` and its "expected noise consistency" (issue #14), beside the K-point average.

The paper states ``eps_mu* = E_t[E[eps_bar_t]]`` ("the unified noise expectation of the pretrained model",
[RECOVERED statement]); how it is computed was not recovered (reconstruction §2.3). Two first-party
descriptions of RayFlow in production are the only further evidence:

* Seedance 1.0 (arXiv 2506.09113, §5.1): RayFlow "aligns the student model's predicted noise (i.e., score
  function) with that of the teacher using expected noise consistency. This approach supports trajectory-level
  optimization for each sample, enabling more stable and adaptive sampling even at low NFEs."
* Seedream 3.0 (arXiv 2504.11346, §2.4): "a unified noise expectation vector, estimated from a pretrained
  model. This expectation serves as a global reference for all timesteps, aligning the denoising process
  across time."

Readings (option ``eps_mu_reading``; ``consistency_weight`` for the third), all [INFERRED] from those quotes:

``average``     ``eps_mu = 1/K sum_k eps_phi(a_k x0 + s_k eps, t_k)`` (reconstruction §2.3; the default).
``trajectory``  ``eps_mu = 1/S sum_j eps_phi(x_j, t_j)`` over the teacher's own ODE trajectory ``x_j`` from
                ``eps`` (the calls its solver makes anyway when x0 comes from the teacher: no extra teacher
                NFEs). The literal ``E_t[E[eps_bar_t]]`` of the teacher's path; rests on Seedance's
                "trajectory-level optimization for each sample".
``start``       ``eps_mu = (eps - a_T x0) / (1 - a_T)`` with ``T`` the last training timestep: the ray passes
                exactly through the sampler's starting point ``x_T = eps`` (so the start distribution matches
                ``N(0, I)`` by construction) and the one-step formula ``x0 = (x_T - (1 - a_T) eps_mu) / a_T``
                is exact for a perfect student. Rests on Seedream's "global reference for all timesteps".
consistency     (any reading, ``consistency_weight > 0``): at a point ``x_j`` of the teacher's trajectory (VP
                timestep ``t_j``) the student's noise prediction regresses the instance's ``eps_mu``, so the
                student's noise is constant along each sample's trajectory ("expected noise consistency",
                Seedance). The trajectory point is read on the ray of the same SNR: ray time ``t`` with
                ``a_t / (1 - a_t) = a_j / s_j`` and ray point ``x = x_j / c_t``, ``c_t = 1/sqrt(a_t^2 + (1-a_t)^2)``,
                which is exactly the VP point ``x_j`` at ``t_j`` the student's network sees (``ray.vp_matched``).
                If the trajectory is straight (``x_j = a_j x0 + s_j eps_mu``) the ray point lies on the
                instance's ray and the term adds nothing a perfect student does not already satisfy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rayflow.errors import require
from rayflow.methods.rayflow.config import EPS_MU_READINGS
from rayflow.models import Condition, Denoiser, with_guidance
from rayflow.samplers import get_sampler, make_timesteps
from rayflow.schedules import VPSchedule, expand_like, to_x0_eps


class TrajectoryRecorder(Denoiser):
    """Forwards every call to ``model`` and records its inputs ``(x_j, t_j)`` and its epsilon prediction.

    It adds no evaluation: what it records is what the solver asked for anyway (a
    :class:`~rayflow.methods.base.CountingDenoiser` below it counts exactly the solver's calls).
    """

    def __init__(self, model: Denoiser, schedule: VPSchedule, keep_states: bool = True) -> None:
        super().__init__()
        self.model, self.schedule = model, schedule
        self.prediction_type = model.prediction_type
        self.num_classes = model.num_classes
        self.keep_states = keep_states  # the states cost S copies of the batch; only the consistency loss needs them
        self.xs: list[torch.Tensor] = []
        self.ts: list[torch.Tensor] = []
        self.eps_sum: torch.Tensor | None = None  # running sum: the mean needs no S copies
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition = None) -> torch.Tensor:
        pred = self.model(x, t, cond)
        tt = torch.as_tensor(t, dtype=torch.float64).flatten().expand(x.shape[0]).cpu()
        eps = pred
        if self.prediction_type != "epsilon":  # exact conversion on the VP path
            a, s = expand_like(self.schedule.a(tt), x), expand_like(self.schedule.s(tt), x)
            eps = to_x0_eps(pred.to(x.dtype), self.prediction_type, x, a, s)[1]
        if self.keep_states:
            self.xs.append(x.detach().clone())
        self.ts.append(tt.clone())
        eps = eps.detach().to(torch.float64)
        self.eps_sum = eps.clone() if self.eps_sum is None else self.eps_sum + eps
        self.calls += 1
        return pred

    def null_condition(self, batch_size: int, device: torch.device) -> Condition:
        return self.model.null_condition(batch_size, device)


@dataclass
class Trajectory:
    """The teacher's ODE solution from ``eps`` and what its solver saw on the way: ``states`` ``[S, B, ...]`` (or
    None when not kept) at VP timesteps ``timesteps`` ``[S, B]``; ``eps_mu`` the mean of its S epsilon
    predictions there (the trajectory reading)."""

    x0: torch.Tensor
    states: torch.Tensor | None
    timesteps: torch.Tensor
    eps_mu: torch.Tensor

    def pick(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One recorded state per row, uniformly over the solver's calls after the first: ``(x_j [B, ...], t_j
        [B])``. The first call is at ``x = eps``, ``t = T - 1``: the ray's own start, and a VP point at ``T - 1``
        has no ray time of equal SNR inside the schedule (``a_j/(a_j + s_j) < a_{T-1}``)."""
        require(self.states is not None, "rayflow: this trajectory was recorded without its states")
        s, b = self.timesteps.shape
        j = torch.randint(1, s, (b,), generator=generator) if s > 1 else torch.zeros(b, dtype=torch.long)
        rows = torch.arange(b)
        return self.states[j.to(self.states.device), rows.to(self.states.device)], self.timesteps[j, rows]


@torch.no_grad()
def teacher_trajectory(teacher: Denoiser, eps: torch.Tensor, schedule: VPSchedule, cond: Condition = None,
                       guidance: float = 1.0, solver: str = "dpm++2m", steps: int = 25,
                       keep_states: bool = False) -> Trajectory:
    """The teacher's sample from ``eps`` (as :func:`.targets.teacher_x0`: same solver, grid and guidance, so the
    same ``x0`` to rounding) with its recorded trajectory. The teacher's guided prediction is what is recorded.
    """
    grid = make_timesteps(steps, schedule.num_train_timesteps, "trailing")
    rec = TrajectoryRecorder(with_guidance(teacher, guidance), schedule, keep_states)
    x0 = get_sampler(solver)(rec, eps, grid, schedule, cond)
    require(rec.eps_sum is not None, "rayflow: the teacher's solver made no call")
    return Trajectory(x0, torch.stack(rec.xs) if keep_states else None, torch.stack(rec.ts),
                      (rec.eps_sum / rec.calls).to(x0.dtype))


def start_consistent_eps_mu(x0: torch.Tensor, eps: torch.Tensor, schedule: VPSchedule) -> torch.Tensor:
    """``eps_mu = (eps - a_T x0) / (1 - a_T)``: the ray ``a_t x0 + (1 - a_t) eps_mu`` then passes through ``eps``
    at ``t = T - 1``, the ray sampler's first grid point. Costs no teacher evaluation beyond ``x0`` itself."""
    a_T = float(schedule.a(schedule.num_train_timesteps - 1))
    return (eps - a_T * x0) / (1.0 - a_T)


def ray_time_of_vp(schedule: VPSchedule, t_vp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t_ray, c)`` for VP timesteps ``t_vp``: the (fractional) ray timestep of the same SNR
    (``a_t/(1 - a_t) = a_j/s_j``, i.e. ``a_t = a_j/(a_j + s_j)``) and its scale ``c = 1/sqrt(a_t^2 + (1-a_t)^2)``,
    so the VP point ``x_j`` is the ray point ``x_j / c`` (float64, ``[B]``)."""
    tv = torch.as_tensor(t_vp, dtype=torch.float64).flatten().cpu()
    aj, sj = schedule.a(tv), schedule.s(tv)
    a = aj / (aj + sj)
    t_ray = schedule.timestep_from_alpha_bar(a * a)
    a_r = schedule.a(t_ray)  # the clamped timestep's own a (identical unless a is outside the schedule)
    c = 1.0 / torch.sqrt(a_r * a_r + (1 - a_r) ** 2)
    return t_ray, c


def consistency_residual(ray, network: torch.nn.Module, states: torch.Tensor, t_vp: torch.Tensor,
                         eps_mu: torch.Tensor, cond: Condition, schedule: VPSchedule) -> torch.Tensor:
    """Per-row ``|| eps_hat_theta(x_j / c, t_ray) - eps_mu ||^2`` (mean over dimensions): reading 3, the student's
    noise prediction at the teacher's trajectory points regressed onto the instance's ``eps_mu``.

    ``ray`` is the objective's :class:`~.ray.RayParameterization`; its prediction is inverted on the ray
    (:func:`~.ray.ray_x0_eps`) to the student's noise estimate. Zero exactly when the student's noise is
    ``eps_mu`` at every trajectory point (tested with a straight-trajectory teacher).
    """
    from rayflow.methods.rayflow.ray import ray_x0_eps

    t_ray, c = ray_time_of_vp(schedule, t_vp)
    x = states / expand_like(c.to(states.dtype), states).to(states.device)
    pred = ray(network, x, t_ray, cond).float()
    a = expand_like(schedule.a(t_ray).to(x.dtype), x).to(x.device)
    _, eps_hat = ray_x0_eps(pred, ray.parameterization, x.float(), a.float())
    return (eps_hat - eps_mu.float()).square().flatten(1).mean(1)


__all__ = ["EPS_MU_READINGS", "Trajectory", "TrajectoryRecorder", "consistency_residual", "ray_time_of_vp",
           "start_consistent_eps_mu", "teacher_trajectory"]
