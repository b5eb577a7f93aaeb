r"""The ray algebra (reconstruction §2.4, §2.9): ray points, their inversion, the VP-matched change of variables
that lets the teacher's network predict along the ray, the student wrapper, and the few-step ray sampler.

Notation: ``a_t = sqrt(alpha_bar_t)``, ``s_t = sqrt(1 - alpha_bar_t)``; integer timesteps ``0 .. T-1``
(large = noise), ``t = -1`` is clean data.
"""

from __future__ import annotations

import torch

from rayflow.errors import RayflowError, require
from rayflow.methods.rayflow.config import PARAMETERIZATIONS, _choice
from rayflow.models import Condition, Denoiser, with_guidance
from rayflow.samplers import make_timesteps

# the sampling maths lives with the scheduler (a floor below the methods), re-exported here
from rayflow.schedulers import check_grid, vp_matched
from rayflow.schedules import VPSchedule, expand_like, to_x0_eps

#: the forms the ray algebra reads: the config's, and ``velocity`` (``x0 - eps_mu = -flow``), the velocity form's
#: sign before it took the package's flow convention (kept for code that still passes it)
RAY_FORMS = (*PARAMETERIZATIONS, "velocity")


def ray_point(x0: torch.Tensor, eps_mu: torch.Tensor, a: torch.Tensor, s: torch.Tensor, sigma: float = 0.0,
              z: torch.Tensor | None = None) -> torch.Tensor:
    """``x_t = a_t x0 + (1 - a_t) eps_mu + sigma s_t z`` (reconstruction §2.4; ``a``, ``s`` broadcast on x0).

    [RECOVERED] kernel ``p(x_t | x_{t-1}, eps_mu) = N(alpha_t x_{t-1} + (1 - alpha_t) eps_mu, beta_t^2 sigma^2 I)``;
    [INFERRED] its composition, with the bar on ``a_t`` and ``sigma`` on the noise (§6 A1, A2). ``eps_mu = 0``,
    ``sigma = 1`` is the VP marginal ``a_t x0 + s_t z``.
    """
    x = a * x0 + (1 - a) * eps_mu
    if sigma > 0:
        require(z is not None, "ray_point: sigma > 0 needs the noise z")
        x = x + sigma * s * z
    return x


def ray_x0_eps(pred: torch.Tensor, parameterization: str, x: torch.Tensor, a: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0_hat, eps_hat)`` from a ray prediction at ``x``: the ray inversion.

    epsilon: ``x0 = (x - (1 - a) eps) / a`` [RECOVERED one-step formula]; flow ``f = eps_mu - x0``:
    ``x0 = x - (1 - a) f``, ``eps = x + a f`` [OURS] (velocity ``v = -f``: ``x0 = x + (1 - a) v``, ``eps = x - a v``).
    All are exact on the ``sigma = 0`` ray.
    """
    if parameterization == "epsilon":
        return (x - (1 - a) * pred) / a, pred
    if parameterization == "flow":
        return x - (1 - a) * pred, x + a * pred
    if parameterization == "velocity":
        return x + (1 - a) * pred, x - a * pred
    raise RayflowError(f"rayflow: unknown parameterization {parameterization!r}")


def ray_target(x0: torch.Tensor, eps_mu: torch.Tensor, parameterization: str) -> torch.Tensor:
    """What a perfect student outputs: ``eps_mu`` (epsilon form) or ``eps_mu - x0`` (flow form; ``x0 - eps_mu`` for
    the old velocity form)."""
    if parameterization == "epsilon":
        return eps_mu
    if parameterization == "flow":
        return eps_mu - x0
    if parameterization == "velocity":
        return x0 - eps_mu
    raise RayflowError(f"rayflow: unknown parameterization {parameterization!r}")


class RayParameterization:
    """Calls a network at the VP-matched point and returns the ray prediction (an exact change of variables).

    ``network(c x, t', cond)`` is a prediction of type ``network.prediction_type`` on the VP path
    ``(a', s')``; :func:`rayflow.schedules.to_x0_eps` turns it into ``(x0, eps)``, which are exactly the ray's
    ``(x0, eps_mu)`` because ``c x = a' x0 + s' eps_mu``. Output: ``eps`` (epsilon form), ``eps - x0`` (flow form)
    or ``x0 - eps`` (the old velocity form). [OURS] (the paper fine-tunes SD's epsilon UNet with LoRA; how it feeds
    ray points to it was not recovered.)
    """

    def __init__(self, schedule: VPSchedule, parameterization: str) -> None:
        _choice(parameterization, RAY_FORMS, "parameterization")
        self.schedule, self.parameterization = schedule, parameterization

    def __call__(self, network: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Condition = None,
                 prediction_type: str | None = None) -> torch.Tensor:
        # the schedule is read where t lives (host timesteps from a Time Sampler, or device ones): no copy back;
        # integer timesteps (a training draw) stay integers, so the schedule reads its table
        t = torch.as_tensor(t).flatten().expand(x.shape[0])
        c, a2, s2, t2 = vp_matched(self.schedule, t)
        c, a2, s2 = (expand_like(v, x) for v in (c, a2, s2))
        xv = c * x
        pred = network(xv, t2.to(device=x.device, dtype=torch.float32, non_blocking=True), cond)
        ptype = prediction_type or _unwrap(network).prediction_type
        x0, eps = to_x0_eps(pred.to(x.dtype), ptype, xv, a2, s2)
        if self.parameterization == "epsilon":
            return eps
        return eps - x0 if self.parameterization == "flow" else x0 - eps


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    from rayflow.checkpoint import unwrap_denoiser

    return unwrap_denoiser(model)


class RayStudent(Denoiser):
    """The distilled generator: ``student(x, t, cond)`` is the ray prediction (``prediction_type`` is
    ``"ray-epsilon"`` or ``"ray-flow"``, which VP samplers refuse instead of misreading); sample it with
    :func:`ray_sample`. Holds the raw network as ``.network`` (its weights are what a model directory stores).
    """

    def __init__(self, network: Denoiser, schedule: VPSchedule, parameterization: str) -> None:
        super().__init__()
        self.network = network
        self.schedule = schedule
        self.parameterization = parameterization
        self.ray = RayParameterization(schedule, parameterization)
        self.prediction_type = f"ray-{parameterization}"
        self.num_classes = network.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition = None) -> torch.Tensor:
        return self.ray(self.network, x, t, cond)

    def null_condition(self, batch_size: int, device: torch.device) -> Condition:
        return self.network.null_condition(batch_size, device)


# ---------------------------------------------------------------------- sampling (Algorithms 2 and 3)
@torch.no_grad()
def ray_sample(student: RayStudent, noise: torch.Tensor, schedule: VPSchedule, steps: int | None = None,
               cond: Condition = None, guidance: float = 1.0, timesteps: torch.Tensor | None = None,
               spacing: str = "trailing", start_std: float = 1.0) -> torch.Tensor:
    """Multi-step sampling along the ray (Algorithm 2; one step is Algorithm 3).

    ``x_T = start_std * noise``; at each grid point ``x0_hat, eps_hat`` from the student, then
    ``x_{t'} = a_{t'} x0_hat + (1 - a_{t'}) eps_hat`` (on the last step ``t' = -1``: ``x = x0_hat``). Any grid
    works (``timesteps``, decreasing, ending at -1 for samples); otherwise ``steps`` with ``spacing``.
    ``guidance`` applies classifier-free guidance to the student's prediction (linear, so exact for either
    form).
    """
    if timesteps is None:
        require(steps is not None and int(steps) >= 1, f"rayflow: steps must be >= 1, got {steps}")
        timesteps = make_timesteps(int(steps), schedule.num_train_timesteps, spacing, schedule=schedule)
    grid = check_grid(timesteps, schedule.num_train_timesteps)
    model = with_guidance(student, guidance)
    x = noise * start_std
    for i in range(grid.numel() - 1):
        t, tn = grid[i], grid[i + 1]
        pred = model(x, t.expand(x.shape[0]).to(device=x.device, dtype=torch.float32), cond)
        a = expand_like(schedule.a(t).to(x.dtype), x)
        x0, eps = ray_x0_eps(pred.to(x.dtype), student.parameterization, x, a)
        an = schedule.a(tn).to(dtype=x.dtype, device=x.device)
        x = an * x0 + (1 - an) * eps
    return x




__all__ = ["RAY_FORMS", "RayParameterization", "RayStudent", "check_grid", "ray_point", "ray_sample", "ray_target",
           "ray_x0_eps", "vp_matched"]
