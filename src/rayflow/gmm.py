"""Gaussian mixtures with an exact teacher: ground truth for every sampler and distillation method.

Data ``x0 ~ sum_k pi_k N(mu_k, sigma_k^2 I)`` in ``d`` dimensions. Under the VP forward process
``x_t = a_t x0 + s_t eps`` each component stays Gaussian::

    x_t | k ~ N(a_t mu_k, v_k I),   v_k = a_t^2 sigma_k^2 + s_t^2

so the posterior-mean noise prediction (the ideal epsilon-model) is exact::

    E[eps | x_t] = sum_k r_k(x_t) * s_t (x_t - a_t mu_k) / v_k,   r_k  ∝ pi_k N(x_t; a_t mu_k, v_k I)

Class ``k`` of a conditional model is component ``k``; the null label (``num_classes``) or ``None`` is the
whole mixture, so classifier-free guidance is exact too.

For a single Gaussian the probability-flow ODE has the closed-form solution
``x_t = a_t mu + sqrt(v_t) * (x_T - a_T mu) / sqrt(v_T)`` (:meth:`GaussianMixture.ode_solution`), which the
sampler tests converge to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rayflow.errors import require
from rayflow.models.base import Condition, Denoiser, broadcast_timesteps
from rayflow.schedules import VPSchedule


@dataclass
class GaussianMixture:
    """An isotropic Gaussian mixture: ``means [K, d]``, ``stds [K]``, ``weights [K]`` (summing to 1)."""

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self) -> None:
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        k = self.means.shape[0]
        self.stds = torch.as_tensor(self.stds, dtype=torch.float64).expand(k).clone()
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64).expand(k).clone()
        self.weights = self.weights / self.weights.sum()
        require(bool(torch.all(self.stds > 0)), "mixture standard deviations must be positive")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_modes(self) -> int:
        return self.means.shape[0]

    @classmethod
    def from_options(
        cls, dim: int = 2, modes: int = 8, std: float = 0.1, seed: int = 0, layout: str | None = None,
        scale: float = 1.0,
    ) -> GaussianMixture:
        """The mixtures behind ``--data mog:dim=..,modes=..,std=..,seed=..``.

        ``layout="ring"`` (default in 2-D) spaces the means on a circle of radius ``scale``; ``"random"``
        (default otherwise) draws them from ``N(0, scale^2 I)`` with ``seed``. Weights are equal.
        """
        require(dim >= 1, f"mog: dim must be >= 1, got {dim}")
        require(modes >= 1, f"mog: modes must be >= 1, got {modes}")
        require(std > 0, f"mog: std must be > 0, got {std}")
        layout = layout or ("ring" if dim == 2 else "random")
        if layout == "ring":
            require(dim == 2, "mog: layout=ring needs dim=2")
            ang = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
            means = scale * torch.stack([ang.cos(), ang.sin()], 1)
        elif layout == "random":
            g = torch.Generator().manual_seed(seed)
            means = scale * torch.randn(modes, dim, generator=g, dtype=torch.float64)
        else:
            raise ValueError(f"mog: unknown layout {layout!r}; expected ring or random")
        return cls(means, torch.full((modes,), float(std)), torch.full((modes,), 1.0 / modes))

    def sample(
        self, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` points (float32) and their component labels; ``labels`` fixes the components."""
        if labels is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        labels = labels.long().cpu()
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[labels] + self.stds[labels, None] * z
        return x.float(), labels

    def _log_resp(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None):
        """Per-component log-responsibilities and variances at ``x_t`` (float64), shapes ``[B, K]``."""
        v = a[:, None] ** 2 * self.stds[None, :] ** 2 + s[:, None] ** 2  # [B, K]
        diff = x[:, None, :] - a[:, None, None] * self.means[None]  # [B, K, d]
        log_p = (
            torch.log(self.weights)[None]
            - 0.5 * (diff**2).sum(-1) / v
            - 0.5 * self.dim * torch.log(2 * math.pi * v)
        )
        if labels is not None:
            mask = torch.nn.functional.one_hot(labels.clamp(max=self.num_modes - 1), self.num_modes).bool()
            mask = mask | (labels >= self.num_modes)[:, None]  # null label: the whole mixture
            log_p = log_p.masked_fill(~mask, float("-inf"))
        return log_p - torch.logsumexp(log_p, 1, keepdim=True), v, diff

    def posterior_eps(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None = None):
        """``E[eps | x_t]`` for ``x_t = a x0 + s eps`` (``a``, ``s`` of shape ``[B]``), computed in float64."""
        xd = x.reshape(x.shape[0], -1).double()
        log_r, v, diff = self._log_resp(xd, a.double(), s.double(), labels)
        eps = (log_r.exp()[..., None] * s.double()[:, None, None] * diff / v[..., None]).sum(1)
        return eps.to(x.dtype).reshape(x.shape)

    def ode_solution(self, x_T: torch.Tensor, a_T: float, s_T: float, a_t: float, s_t: float) -> torch.Tensor:
        """Exact probability-flow ODE map from ``(a_T, s_T)`` to ``(a_t, s_t)`` for a *single* Gaussian."""
        require(self.num_modes == 1, "the closed-form ODE solution holds for a single Gaussian only")
        mu, sd = self.means[0], self.stds[0]
        v_T = math.sqrt(a_T**2 * sd**2 + s_T**2)
        v_t = math.sqrt(a_t**2 * sd**2 + s_t**2)
        return (a_t * mu + v_t * (x_T.double() - a_T * mu) / v_T).to(x_T.dtype)


class ExactTeacher(Denoiser):
    """The ideal epsilon-prediction model of a :class:`GaussianMixture` under a :class:`VPSchedule`.

    Class-conditional with ``num_classes = K`` when ``conditional`` is set (label ``K`` = unconditional).
    """

    prediction_type = "epsilon"

    def __init__(self, mixture: GaussianMixture, schedule: VPSchedule, conditional: bool = False) -> None:
        super().__init__()
        self.mixture = mixture
        self.schedule = schedule
        self.num_classes = mixture.num_modes if conditional else 0

    def fingerprint(self) -> str:
        """Identity of the exact teacher (it has no weights): the mixture and the schedule."""
        m = self.mixture
        return repr((m.means.tolist(), m.stds.tolist(), m.weights.tolist(), self.schedule.config, self.num_classes))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition = None) -> torch.Tensor:
        t = broadcast_timesteps(t, x.shape[0], x.device).double()
        a, s = self.schedule.a(t.cpu()), self.schedule.s(t.cpu())
        labels = cond.cpu() if (cond is not None and self.num_classes > 0) else None
        return self.mixture.posterior_eps(x.cpu(), a, s, labels).to(x.device)
