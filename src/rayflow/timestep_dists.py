"""Timestep distributions: the training-time distributions over ``t``, RayFlow's learned Time Sampler among them.

("Sampler" and "scheduler" name generation; this module was ``rayflow.time_samplers``, still importable for one
release. The learned Time Sampler is in :mod:`rayflow.stein_time_sampler`.)

Every sampler draws integer timesteps ``t in 0 .. T-1`` (diffusers scale, large = noise) together with the
importance weights ``w = p(t) / q(t)`` that make the reweighted loss an unbiased estimate of the loss under the
nominal distribution ``p(t) = 1/T`` (uniform, as in DDPM training). Continuous samplers work on the relaxed
time ``u in [0, 1]`` and map ``t = floor(u T)``, as diffusers' training scripts do
(``compute_density_for_timestep_sampling``); ``q(t)`` is then the exact mass of the bin
``[t/T, (t+1)/T)``, so the weights are exact, not a density approximation.

Distributions (one small class each, one interface: :class:`TimestepDistribution`):

* :class:`UniformSampler` - ``q = p``: the baseline, weights 1.
* :class:`LogitNormalSampler` - ``u = sigmoid(m + s n)`` (Esser et al. 2024, SD3).
* :class:`UShapedSampler` - ``q(u) ∝ cosh(a (u - 1/2))``, ``a = 4``: the U-shaped density of "Improving the
  Training of Rectified Flows" (Lee, Lin, Fanti 2024; ``sangyun884/rfpp`` ``t_dist.py``).
* :class:`LossHistorySampler` - Nichol & Dhariwal (2021)'s importance sampler: ``q(t) ∝ sqrt(E[l_t^2])`` from a
  history of recent per-timestep losses, mixed with the uniform density.
* :class:`SteinSampler` - RayFlow's Time Sampler ``T_theta``, our reading of the paper (see below).

RayFlow's Time Sampler, what is the paper's and what is ours (../shared/research/rayflow-paper.md §2.8):

* [RECOVERED] the optimal sampling distribution is ``q*(t | x0, eps_mu) ∝ xi_t(x0, eps_mu) p(t)``, ``xi_t``
  measuring the model's prediction error at ``t``; a neural network ``T_theta`` is trained with (kernelized)
  Stochastic Stein Discrepancies to approximate ``q*``, to lower the variance of the loss estimator; Fig. 2
  shows "five coordinates" (key timesteps).
* [INFERRED] everything concrete: ``xi_t`` is the geometric-mean per-sample loss at ``t``, modelled as
  ``log xi(u, f) = sum_j beta_j(f) phi_j(u)`` (Gaussian bumps ``phi_j`` on ``u``, coefficients linear in the
  instance features ``f``), fitted by exponentially-forgetting ridge regression on the student's per-sample
  losses; its derivative gives the score of ``q*`` - the "stochastic" part, estimated from minibatch losses.
  ``T_theta`` is a mixture of logit-normal components on a fixed grid of centres whose weights come from a
  small MLP on the instance features (or are one global vector). It is fitted by minimising the kernelized
  Stein discrepancy ``KSD^2(T_theta || q*)`` with an RBF kernel, computed in logit coordinates ``y = logit(u)``
  (the Stein identity needs densities that vanish at the boundary, which ``[0, 1]`` does not give). A
  fraction ``uniform_mix`` of the draws stays uniform (defensive importance sampling: every ``t`` keeps being
  measured and ``w <= 1 / uniform_mix``).
* [OURS, measured] fixed centres rather than the five free components Fig. 2 might suggest: with free means
  and widths KSD descent stalled at stationary points that left the mass off a planted error peak (KSD is
  blind to mixing proportions along such paths); with the centres fixed, ``KSD^2`` is a convex quadratic in the
  weights and the fit is reliable (see :class:`SteinSampler` and tests/test_time_samplers.py).

The samplers draw from a CPU ``torch.Generator`` (derived from the step's generator when that lives on a GPU),
except :class:`UniformSampler`, which draws on the step's generator's own device (``draws_on_device``): a GPU step
then needs no host draw or copy, and the trainer can capture it in a CUDA graph. Either way the randomness is a
function of the per-step generator only, so a training run is reproducible and resumes exactly (``state_dict``
holds everything else).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch

from rayflow.errors import RayflowError, require

TIMESTEP_DISTRIBUTIONS: tuple[str, ...] = ("uniform", "logit-normal", "u-shaped", "loss-history", "learned")


def _cpu_generator(generator: torch.Generator | None) -> torch.Generator:
    """A CPU generator derived from ``generator`` (which may live on a GPU)."""
    if generator is None:
        return torch.Generator().manual_seed(0)
    if generator.device.type == "cpu":
        return generator
    if generator.device.type == "cuda":
        # no host read of a device draw (it would wait for all queued GPU work, every training step): the seed
        # is a hash of the generator's seed and Philox offset, both known on the host; an asynchronous draw then
        # advances the offset, so the next call derives another seed
        seed = _hash_seed(generator.initial_seed(), generator.get_offset())
        torch.empty(4, device=generator.device).uniform_(generator=generator)
        return torch.Generator().manual_seed(seed)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return torch.Generator().manual_seed(seed)


def _hash_seed(*values: int) -> int:
    digest = hashlib.blake2b(":".join(str(int(v)) for v in values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _logit(u: torch.Tensor) -> torch.Tensor:
    return torch.log(u) - torch.log1p(-u)


class TimestepDistribution:
    """Common interface.

    * ``sample(n, generator, features=None) -> (t, w)``: ``t`` int64 ``[n]`` in ``0..T-1``, ``w`` float32 ``[n]``
      = ``p(t)/q(t)`` (clipped to ``weight_clip``).
    * ``update(t, losses, features=None, generator=None) -> logs``: feed back the per-sample losses at ``t``.
    * ``probs(features=None) -> [T]``: ``q(t)`` (averaged over the rows of ``features`` for conditioned samplers).
    * ``state_dict()`` / ``load_state_dict(d)``: tensors and JSON scalars only (no pickle).
    """

    name = ""
    #: ``sample`` draws on the generator's own device (no host work), so a caller on a GPU may capture it
    draws_on_device = False

    def __init__(self, num_timesteps: int, weight_clip: float = 10.0) -> None:
        require(num_timesteps >= 2, f"time sampler: needs at least 2 timesteps, got {num_timesteps}")
        require(weight_clip >= 1.0, f"time sampler: weight_clip must be >= 1, got {weight_clip}")
        self.T = int(num_timesteps)
        self.weight_clip = float(weight_clip)

    # -- to override
    def probs(self, features: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None,
               features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.probs()
        t = torch.multinomial(q, n, replacement=True, generator=_cpu_generator(generator))
        return t, self._weights(q[t])

    def update(self, t: torch.Tensor, losses: torch.Tensor, features: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # -- shared
    @property
    def adaptive(self) -> bool:
        """Whether :meth:`update` learns from the losses fed back (a fixed density needs none: its callers can skip
        copying them to the host)."""
        return type(self).update is not TimestepDistribution.update

    def _weights(self, q_t: torch.Tensor) -> torch.Tensor:
        """``p(t)/q(t)`` with ``p = 1/T``, clipped (a tiny ``q`` must not blow up one step's gradient)."""
        return (1.0 / (self.T * q_t.double().clamp(min=1e-300))).clamp(max=self.weight_clip).float()

    def _bin_masses_from_cdf(self, cdf) -> torch.Tensor:
        """``q(t) = F((t+1)/T) - F(t/T)`` for a CDF ``F`` on ``[0, 1]``."""
        edges = torch.linspace(0, 1, self.T + 1, dtype=torch.float64)
        mass = (cdf(edges[1:]) - cdf(edges[:-1])).clamp(min=0)
        return mass / mass.sum(-1, keepdim=True)

    def _to_timesteps(self, u: torch.Tensor) -> torch.Tensor:
        return (u * self.T).floor().long().clamp(0, self.T - 1)


class UniformSampler(TimestepDistribution):
    """``t ~ U{0..T-1}``; weights are all 1."""

    name = "uniform"
    draws_on_device = True

    def probs(self, features: torch.Tensor | None = None) -> torch.Tensor:
        return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)

    def sample(self, n, generator=None, features=None):
        # on the generator's device (a CPU generator: the same draw as a CPU sampler's; a GPU one: no host work)
        generator = _cpu_generator(None) if generator is None else generator
        t = torch.randint(0, self.T, (n,), generator=generator, device=generator.device)
        return t, torch.ones(n, device=generator.device)


class LogitNormalSampler(TimestepDistribution):
    """``u = sigmoid(mean + std * n)``, ``n ~ N(0, 1)``; SD3's default is ``mean=0, std=1``."""

    name = "logit-normal"

    def __init__(self, num_timesteps: int, mean: float = 0.0, std: float = 1.0, weight_clip: float = 10.0) -> None:
        super().__init__(num_timesteps, weight_clip)
        require(std > 0, f"logit-normal sampler: std must be > 0, got {std}")
        self.mean, self.std = float(mean), float(std)
        self._q = self._bin_masses_from_cdf(lambda u: _normal_cdf((_logit(u) - self.mean) / self.std))

    def probs(self, features=None):
        return self._q

    def sample(self, n, generator=None, features=None):
        y = self.mean + self.std * torch.randn(n, generator=_cpu_generator(generator), dtype=torch.float64)
        t = self._to_timesteps(torch.sigmoid(y))
        return t, self._weights(self._q[t])


class UShapedSampler(TimestepDistribution):
    """``q(u) = a cosh(a (u - 1/2)) / (2 sinh(a/2))`` on ``[0, 1]``: more weight at both ends (Lee et al. 2024).

    Drawn by inverting the CDF ``F(u) = (sinh(a (u - 1/2)) + sinh(a/2)) / (2 sinh(a/2))``.
    """

    name = "u-shaped"

    def __init__(self, num_timesteps: int, a: float = 4.0, weight_clip: float = 10.0) -> None:
        super().__init__(num_timesteps, weight_clip)
        require(a > 0, f"u-shaped sampler: a must be > 0, got {a}")
        self.a = float(a)
        sh = math.sinh(self.a / 2)
        self._q = self._bin_masses_from_cdf(lambda u: (torch.sinh(self.a * (u - 0.5)) + sh) / (2 * sh))

    def probs(self, features=None):
        return self._q

    def sample(self, n, generator=None, features=None):
        r = torch.rand(n, generator=_cpu_generator(generator), dtype=torch.float64)
        u = 0.5 + torch.asinh((2 * r - 1) * math.sinh(self.a / 2)) / self.a
        t = self._to_timesteps(u)
        return t, self._weights(self._q[t])


class LossHistorySampler(TimestepDistribution):
    """Nichol & Dhariwal (2021): ``q(bin) ∝ sqrt(mean of the last H squared losses in the bin)``.

    Timesteps are grouped into ``num_bins`` equal bins (uniform inside a bin) so a 1000-step schedule fills its
    history quickly. Uniform until every bin has ``history`` losses; then mixed with the uniform density
    (``uniform_mix``), as the original mixes in a small uniform probability.
    """

    name = "loss-history"

    def __init__(self, num_timesteps: int, num_bins: int = 50, history: int = 10, uniform_mix: float = 0.1,
                 weight_clip: float = 10.0) -> None:
        super().__init__(num_timesteps, weight_clip)
        require(1 <= num_bins <= num_timesteps, f"loss-history sampler: num_bins must be in 1..{num_timesteps}")
        require(history >= 1, f"loss-history sampler: history must be >= 1, got {history}")
        require(0 <= uniform_mix <= 1, f"loss-history sampler: uniform_mix must be in [0, 1], got {uniform_mix}")
        self.num_bins, self.history, self.uniform_mix = int(num_bins), int(history), float(uniform_mix)
        self.bin_of = (torch.arange(self.T) * self.num_bins) // self.T  # [T]
        self.bin_size = torch.bincount(self.bin_of, minlength=self.num_bins).double()
        self.losses = torch.zeros(self.num_bins, self.history, dtype=torch.float64)
        self.count = torch.zeros(self.num_bins, dtype=torch.long)

    def warmed_up(self) -> bool:
        return bool((self.count >= self.history).all())

    def probs(self, features=None):
        if not self.warmed_up():
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        per_bin = self.losses.square().mean(1).sqrt().clamp(min=1e-12)
        per_bin = per_bin / per_bin.sum()
        per_bin = (1 - self.uniform_mix) * per_bin + self.uniform_mix * self.bin_size / self.T
        return per_bin[self.bin_of] / self.bin_size[self.bin_of]

    def update(self, t, losses, features=None, generator=None):
        bins = self.bin_of[t.cpu().long()]
        for b, loss in zip(bins.tolist(), losses.detach().double().cpu().tolist()):
            self.losses[b] = torch.roll(self.losses[b], 1)
            self.losses[b, 0] = loss
            self.count[b] += 1
        return {"ts_warm": float(self.warmed_up())}

    def state_dict(self):
        return {"losses": self.losses.clone(), "count": self.count.clone()}

    def load_state_dict(self, state):
        self.losses = state["losses"].double().clone()
        self.count = state["count"].long().clone()


# ---------------------------------------------------------------------- construction, logging, plots
def build_timestep_distribution(name: str, num_timesteps: int, num_features: int = 0, weight_clip: float = 10.0,
                                **options: Any) -> TimestepDistribution:
    """A sampler by name (see :data:`TIMESTEP_DISTRIBUTIONS`); ``options`` go to its constructor."""
    if name == "uniform":
        return UniformSampler(num_timesteps, weight_clip)
    if name == "logit-normal":
        return LogitNormalSampler(num_timesteps, weight_clip=weight_clip, **options)
    if name == "u-shaped":
        return UShapedSampler(num_timesteps, weight_clip=weight_clip, **options)
    if name == "loss-history":
        return LossHistorySampler(num_timesteps, weight_clip=weight_clip, **options)
    if name == "learned":
        from rayflow.stein_time_sampler import SteinSampler  # the learned one builds on this module

        return SteinSampler(num_timesteps, num_features=num_features, weight_clip=weight_clip, **options)
    raise RayflowError(f"unknown time sampler {name!r}; expected one of {', '.join(TIMESTEP_DISTRIBUTIONS)}")


def downsample(probs: torch.Tensor, bins: int = 100) -> list[float]:
    """``q(t)`` summed into ``bins`` equal groups of timesteps (for compact JSON logs)."""
    T = probs.numel()
    idx = (torch.arange(T) * bins) // T
    return torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, probs.double().cpu()).tolist()


def plot_time_distribution(snapshots: list[dict[str, Any]], path: str | Path, num_timesteps: int,
                           title: str = "Time Sampler") -> Path:
    """PNG of logged distributions over ``t``: each snapshot ``{"step", "probs", ["target"]}`` (``probs`` as
    :func:`downsample` writes them), later steps darker; the last snapshot's ``target`` (``q*`` estimate)
    dashed, the uniform density dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    cmap = plt.get_cmap("viridis")
    for i, snap in enumerate(snapshots):
        probs = snap["probs"]
        bins = len(probs)
        x = [(j + 0.5) * num_timesteps / bins for j in range(bins)]
        ax.plot(x, [p * bins for p in probs], color=cmap(i / max(1, len(snapshots) - 1)), lw=1.2,
                label=f"step {snap['step']}" if i in (0, len(snapshots) - 1) else None)
    if snapshots and snapshots[-1].get("target") is not None:
        target = snapshots[-1]["target"]
        bins = len(target)
        x = [(j + 0.5) * num_timesteps / bins for j in range(bins)]
        ax.plot(x, [p * bins for p in target], "k--", lw=1.2, label="q* estimate (xi_t p(t))")
    ax.axhline(1.0, color="grey", ls=":", lw=1, label="uniform")
    ax.set_xlabel("timestep t (large = noise)")
    ax.set_ylabel("density relative to uniform")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


#: the names before the rename (``TimeSampler`` is also the paper's name of the learned one), for one release
TimeSampler = TimestepDistribution
TIME_SAMPLERS = TIMESTEP_DISTRIBUTIONS
build_time_sampler = build_timestep_distribution

__all__ = ["TIMESTEP_DISTRIBUTIONS", "TIME_SAMPLERS", "LogitNormalSampler", "LossHistorySampler",
           "TimeSampler", "TimestepDistribution", "UShapedSampler", "UniformSampler", "build_time_sampler",
           "build_timestep_distribution", "downsample", "plot_time_distribution"]
