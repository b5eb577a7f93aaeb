"""The window family's shared pieces - the window objective, the piecewise sampler as a function, the window
parameterisation names and their ``auto`` choice - used by PeRFlow, ProReflow (and by Rectified Diffusion's phased
variant through :mod:`rayflow.windows`). No method owns them, so no method file imports another.

Equations (our time convention: integer timesteps, large = noise, ``t = -1`` clean data; flow time
``tau = (t + 1) / T``) are in :mod:`rayflow.methods.perflow`'s module doc and :mod:`rayflow.windows`.
"""

from __future__ import annotations

from typing import Any

import torch

from rayflow import pairs as P
from rayflow.devices import DeviceCache
from rayflow.errors import require
from rayflow.losses import aligned_velocity_loss, regression_loss
from rayflow.methods.base import DistillContext, Method
from rayflow.models.base import Condition, Denoiser
from rayflow.schedules import VPSchedule, expand_like, timestep_to_flow_time
from rayflow.training import LossOutput
from rayflow.windows import (
    LEGACY_WINDOW_PARAMETERIZATIONS,
    WINDOW_PARAMETERIZATIONS,
    WindowPoint,
    native_target,
    window_coefficients,
    window_index,
    window_parameterization,
    window_velocity,
)

PARAMETERIZATIONS = WINDOW_PARAMETERIZATIONS
#: old option values -> the package's names (``eps`` and ``v`` were PeRFlow's short forms of diff_eps / velocity)
VALUE_ALIASES = {"parameterization": {**LEGACY_WINDOW_PARAMETERIZATIONS, "eps": "window_epsilon", "v": "flow"}}
#: what ``parameterization="auto"`` becomes for a student initialised from an epsilon teacher (measured, see
#: docs/proreflow.md); a freshly initialised student (exact mixture teacher) always uses ``flow``
AUTO_EPS_PARAMETERIZATION = "window_epsilon"


def canonical_parameterization(name: str) -> str:
    """The package's name for a window parameterisation (old names and PeRFlow's short forms accepted)."""
    name = VALUE_ALIASES["parameterization"].get(name, name)
    require(name in PARAMETERIZATIONS + ("auto",),
            f"unknown parameterization {name!r}; expected auto, {', '.join(PARAMETERIZATIONS)}")
    return name


def check_parameterization(name: str, method: str) -> None:
    require(name in PARAMETERIZATIONS + ("auto",),
            f"{method}: unknown parameterization {name!r}; expected auto, {', '.join(PARAMETERIZATIONS)} (old names "
            f"{', '.join(VALUE_ALIASES['parameterization'])} are read by --option and old config.json files)")


def resolve_parameterization(name: str, ctx: DistillContext) -> str:
    """``auto``: PeRFlow's SD1.5 ``window_epsilon`` when the student starts from an epsilon teacher's weights,
    ``flow`` for a fresh network, which learns a bounded velocity far more easily than an epsilon that the
    high-noise windows amplify (``|eta_s| >> 1``). Both choices are measured in docs/proreflow.md."""
    if name != "auto":
        return name
    eps_init = ctx.student_init is not None and ctx.student_config.prediction_type == "epsilon"
    return AUTO_EPS_PARAMETERIZATION if eps_init else "flow"


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
        k = window_index(t, boundaries)
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

    capturable = True  # device draws and maths only: the trainer may capture the whole step (TrainConfig.step_graph)

    def __init__(self, pool: P.Pairs, boundaries: torch.Tensor, schedule: VPSchedule, batch_size: int,
                 parameterization: str, loss_space: str = "native", alpha: float = 0.0, loss: str = "mse",
                 huber_c: float = 1e-3, weighting: str = "none") -> None:
        require(loss_space in ("native", "velocity"), f"loss_space must be native or velocity, got {loss_space!r}")
        require(weighting in WEIGHTINGS, f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        self.pool, self.boundaries, self.schedule = pool, boundaries, schedule
        self.batch_size, self.parameterization = batch_size, parameterization
        self.loss_space, self.alpha, self.loss, self.huber_c = loss_space, alpha, loss, huber_c
        self.weighting = weighting
        self._table: DeviceCache[dict[str, torch.Tensor]] = DeviceCache()

    def __call__(self, model: Denoiser, step: int, generator: torch.Generator) -> LossOutput:
        dev = generator.device
        data = self.pool.batch(self.batch_size, generator)
        # the window maths stays on the device (float64): a host copy of the windows would stall every step
        table = self._table_on(dev)
        k = data["window"].to(dev)
        t_s, t_e = table["start"][k], table["end"][k]
        u = torch.rand(self.batch_size, generator=generator, device=dev).double()
        t = t_e + 1 + torch.floor(u * (t_s - t_e))  # integers in (t_e, t_s]
        known = (None if "lambda" not in table
                 else (window_parameterization(self.parameterization), table["lambda"][k], table["eta"][k]))
        where = WindowPoint(t, t_s, t_e, self.schedule.num_train_timesteps, known_coefficients=known)
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

    def _table_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Per window ``k``: its start and end timesteps and, for the epsilon parameterisations, its coefficients
        ``(lambda_s, eta_s)``; on ``device``, made once. A step gathers its batch's rows instead of reading the
        schedule four times: 145 fewer kernel launches per PeRFlow step on an H200 (BENCHMARKS §6.7)."""

        def make(d: torch.device) -> dict[str, torch.Tensor]:
            start, end = self.boundaries[:-1].to(d), self.boundaries[1:].to(d)
            table = {"start": start, "end": end}
            if window_parameterization(self.parameterization) != "flow":
                table["lambda"], table["eta"] = window_coefficients(self.schedule, start, end, self.parameterization)
            return table

        return self._table.get(device, make)


def train_windows(ctx: DistillContext, method: Method, objective: Any, steps: int, out_dir, init: Denoiser | None,
                  run_extra: dict[str, Any] | None = None) -> Denoiser:
    """Deprecated (one release): ``ctx.train_stage(method, ctx.build_student(init=init), ...)`` is the kit's."""
    return ctx.train_stage(method, ctx.build_student(init=init), objective, steps, out_dir, run_extra)


__all__ = [
    "AUTO_EPS_PARAMETERIZATION", "PARAMETERIZATIONS", "VALUE_ALIASES", "WEIGHTINGS", "WindowObjective",
    "canonical_parameterization", "check_parameterization", "loss_weight", "piecewise_solve",
    "resolve_parameterization", "train_windows",
]
