"""Variance-preserving noise schedules and the conversions between prediction types.

Time convention (the public boundary follows diffusers): integer timesteps ``t = 0 .. T-1`` index
``alphas_cumprod``; large ``t`` means noise. ``t = -1`` is the clean-data end (``alpha_bar = 1``), which is
what diffusers' DDIM (``set_alpha_to_one=True``) and DPM-Solver++ (``final_sigmas_type="zero"``) step to last.
Fractional timesteps interpolate ``log alpha_bar`` linearly between the neighbouring integers.

Notation (DDPM, and the RayFlow reconstruction in ``../shared/research/rayflow-paper.md`` §1)::

    alpha_bar_t = prod_{s<=t} (1 - beta_s)
    a_t = sqrt(alpha_bar_t)              signal coefficient
    s_t = sqrt(1 - alpha_bar_t)          noise coefficient
    x_t = a_t x0 + s_t eps               VP forward marginal
    SNR_t = a_t^2 / s_t^2,  log-SNR lambda_t = log(a_t / s_t) * 2

Prediction types, for any affine path ``x = a x0 + s eps`` (VP or not):

    "epsilon"       eps
    "sample"        x0
    "v_prediction"  v = a eps - s x0             (Salimans & Ho; diffusers' v)
    "flow"          u = eps - x0                 (rectified-flow velocity, noise minus data as in diffusers'
                                                  FlowMatchEulerDiscreteScheduler: x_tau = (1-tau) x0 + tau eps)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch

from rayflow.errors import RayflowError, require

PredictionType = Literal["epsilon", "sample", "v_prediction", "flow"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "sample", "v_prediction", "flow")


def expand_like(coef: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample coefficient ``[B]`` (or a scalar) so it broadcasts against ``x`` ``[B, ...]``."""
    if not torch.is_tensor(coef):
        return torch.as_tensor(coef, dtype=x.dtype, device=x.device)
    # non_blocking: a host-to-device copy that does not wait for the device's queued work (a blocking one does,
    # and coefficients are copied every training step); the source is staged at once, so it may be freed
    coef = coef.to(device=x.device, dtype=x.dtype, non_blocking=True)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (x.ndim - 1)))


#: dtypes read as whole timesteps (table lookups, no interpolation)
INTEGER_TIMESTEP_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class VPSchedule:
    """A discrete variance-preserving schedule, ``alpha_bar_t`` for ``t = 0 .. T-1``.

    Build one with :meth:`linear` (DDPM), :meth:`scaled_linear` (Stable Diffusion), :meth:`cosine`
    (Nichol & Dhariwal, diffusers' ``squaredcos_cap_v2``) or :meth:`from_diffusers_config`. The schedule is
    described by :attr:`config`, a JSON-serialisable dict that :meth:`from_config` rebuilds exactly.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, config: dict[str, Any] | None = None) -> None:
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        require(ac.numel() >= 2, "a schedule needs at least 2 timesteps")
        require(bool(torch.all((ac > 0) & (ac <= 1))), "alphas_cumprod must lie in (0, 1]")
        require(bool(torch.all(ac[1:] <= ac[:-1])), "alphas_cumprod must be non-increasing in t")
        self.alphas_cumprod = ac
        self.config: dict[str, Any] = dict(config or {"kind": "custom"})
        self._log_ac = torch.log(ac)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> VPSchedule:
        """DDPM's linear betas: ``beta_t = linspace(beta_start, beta_end, T)``."""
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        cfg = {"kind": "linear", "num_train_timesteps": num_train_timesteps, "beta_start": beta_start,
               "beta_end": beta_end}
        return cls(torch.cumprod(1.0 - betas, 0), cfg)

    @classmethod
    def scaled_linear(
        cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> VPSchedule:
        """Stable Diffusion's betas: ``beta_t = linspace(sqrt(beta_start), sqrt(beta_end), T)^2``."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        cfg = {"kind": "scaled_linear", "num_train_timesteps": num_train_timesteps, "beta_start": beta_start,
               "beta_end": beta_end}
        return cls(torch.cumprod(1.0 - betas, 0), cfg)

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, max_beta: float = 0.999, s: float = 0.008) -> VPSchedule:
        """The cosine schedule, ``alpha_bar(u) = cos((u + s)/(1 + s) * pi/2)^2`` with clipped betas."""

        def f(u: float) -> float:
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        T = num_train_timesteps
        betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=torch.float64)
        cfg = {"kind": "cosine", "num_train_timesteps": T, "max_beta": max_beta, "s": s}
        return cls(torch.cumprod(1.0 - betas, 0), cfg)

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any]) -> VPSchedule:
        """Build from a diffusers scheduler config (``scheduler_config.json``), using diffusers' own betas.

        Every option diffusers supports (``trained_betas``, ``rescale_betas_zero_snr`` ...) is honoured because
        diffusers computes the table. A zero-terminal-SNR schedule is refused: ``a_T = 0`` makes the one-step
        ray inversion and DDIM's first step undefined.
        """
        from diffusers import DDPMScheduler

        known = set(DDPMScheduler.config_names) if hasattr(DDPMScheduler, "config_names") else None
        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        try:
            sched = DDPMScheduler.from_config(kwargs)
        except Exception as exc:  # diffusers raises several types for bad configs
            raise RayflowError(f"cannot build a schedule from the diffusers config: {exc}") from exc
        ac = sched.alphas_cumprod.to(torch.float64)
        require(float(ac[-1]) > 0, "zero-terminal-SNR schedules (alpha_bar_T = 0) are not supported")
        keep = {k: v for k, v in kwargs.items() if known is None or k in known}
        return cls(ac, {"kind": "diffusers", "diffusers_config": keep})

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VPSchedule:
        """Rebuild a schedule from :attr:`config`."""
        cfg = dict(config)
        kind = cfg.pop("kind", None)
        if kind == "linear":
            return cls.linear(**cfg)
        if kind == "scaled_linear":
            return cls.scaled_linear(**cfg)
        if kind == "cosine":
            return cls.cosine(**cfg)
        if kind == "diffusers":
            return cls.from_diffusers_config(cfg["diffusers_config"])
        if kind == "custom" and "alphas_cumprod" in cfg:
            return cls(torch.tensor(cfg["alphas_cumprod"], dtype=torch.float64), config)
        raise RayflowError(f"unknown schedule kind {kind!r}; expected linear, scaled_linear, cosine or diffusers")

    @classmethod
    def from_name(cls, name: str, num_train_timesteps: int = 1000) -> VPSchedule:
        """``linear`` | ``scaled_linear`` | ``cosine`` with their standard constants."""
        builders = {"linear": cls.linear, "scaled_linear": cls.scaled_linear, "cosine": cls.cosine}
        if name not in builders:
            raise RayflowError(f"unknown schedule {name!r}; expected one of {', '.join(builders)}")
        return builders[name](num_train_timesteps=num_train_timesteps)

    # ------------------------------------------------------------------ tables
    def _tables_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log alpha_bar, alpha_bar)`` on ``device``, copied there once (not once per call and step)."""
        if device.type == "cpu":
            return self._log_ac, self.alphas_cumprod
        return self.per_device("_device_tables", device,
                                lambda d: (self._log_ac.to(d), self.alphas_cumprod.to(d)))

    def per_device(self, name: str, device: torch.device, make: Callable[[torch.device], Any]) -> Any:
        """``make(device)``, made once per device and kept on the schedule under ``name`` (every device asked for
        is kept: a training step reads the same schedule with host and device timesteps)."""
        cache = self.__dict__.setdefault(name, {})
        key = str(device)
        if key not in cache:
            cache[key] = make(device)
        return cache[key]

    def _integer_tables_on(self, device: torch.device) -> torch.Tensor:
        """``[alpha_bar, a, s]`` (float64 rows) at the integer timesteps ``-1, 0, ..., T-1`` (column ``t + 1``)
        on ``device``: a training step's timesteps are integers, and one lookup replaces the ~20 small kernels of
        the fractional path per coefficient (host time that shows once the network replays from CUDA graphs)."""
        def make(d: torch.device) -> torch.Tensor:
            ac = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])  # t = -1: clean
            return torch.stack([ac, ac.sqrt(), (1.0 - ac).clamp(min=0).sqrt()]).to(d)

        return self.per_device("_integer_tables", device, make)

    def check_timesteps(self, t: torch.Tensor) -> None:
        """Refuse timesteps past ``T - 1``: at once for host tensors (a one-line :class:`RayflowError`), with an
        asynchronous device-side assert for device tensors."""
        T = self.num_train_timesteps
        if t.device.type == "cpu":
            if bool(torch.any(t > T - 1 + 1e-6)):
                raise RayflowError(f"timestep {float(t.max()):g} is past the schedule's last timestep {T - 1}")
        else:
            # a host read here would stall every training step on the GPU; timesteps on a device come from the
            # objectives' own draws, so the range check runs asynchronously there (a device-side assert)
            torch._assert_async(torch.all(t <= T - 1 + 1e-6), "timestep past the schedule's last timestep")

    def _lookup(self, row: int, t: torch.Tensor | float | int) -> torch.Tensor | None:
        """Row ``row`` of :meth:`_integer_tables_on` at integer ``t`` (``t < 0`` reads ``t = -1``); None when ``t``
        is fractional (a float), which takes the interpolating path."""
        t = torch.as_tensor(t)
        if t.dtype not in INTEGER_TIMESTEP_DTYPES:
            return None
        self.check_timesteps(t)
        return self._integer_tables_on(t.device)[row][t.clamp(min=-1).long() + 1]

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    @property
    def T(self) -> int:  # noqa: N802 - the paper's symbol
        return self.num_train_timesteps

    def alpha_bar(self, t: torch.Tensor | float | int) -> torch.Tensor:
        """``alpha_bar_t`` (float64) for integer or fractional ``t`` in ``[-1, T-1]``; ``t < 0`` gives 1.

        Integer ``t`` (an integer dtype) reads the table; a fractional one interpolates ``log alpha_bar``
        linearly between its neighbours (the table's own values at whole numbers).
        """
        table = self._lookup(0, t)
        if table is not None:
            return table
        t = torch.as_tensor(t, dtype=torch.float64)
        T = self.num_train_timesteps
        self.check_timesteps(t)
        tc = t.clamp(0, T - 1)
        lo = tc.floor().long().clamp(max=T - 2)
        frac = tc - lo.to(torch.float64)
        log_ac, ac = self._tables_on(t.device)
        val = torch.exp(log_ac[lo] * (1 - frac) + log_ac[lo + 1] * frac)
        # exact table values at integer timesteps, so integer grids reproduce diffusers bit for bit
        val = torch.where(frac == 0, ac[lo], torch.where(frac == 1, ac[lo + 1], val))
        return torch.where(t < 0, torch.ones_like(val), val)

    def a(self, t: torch.Tensor | float | int) -> torch.Tensor:
        """Signal coefficient ``a_t = sqrt(alpha_bar_t)``."""
        table = self._lookup(1, t)
        return self.alpha_bar(t).sqrt() if table is None else table

    def s(self, t: torch.Tensor | float | int) -> torch.Tensor:
        """Noise coefficient ``s_t = sqrt(1 - alpha_bar_t)``."""
        table = self._lookup(2, t)
        return (1.0 - self.alpha_bar(t)).clamp(min=0).sqrt() if table is None else table

    def snr(self, t: torch.Tensor | float | int) -> torch.Tensor:
        """``SNR_t = alpha_bar_t / (1 - alpha_bar_t)`` (infinite at ``t = -1``)."""
        ab = self.alpha_bar(t)
        return ab / (1.0 - ab)

    def log_snr(self, t: torch.Tensor | float | int) -> torch.Tensor:
        """``log SNR_t``."""
        ab = self.alpha_bar(t)
        return torch.log(ab) - torch.log1p(-ab)

    def timestep_from_alpha_bar(self, alpha_bar: torch.Tensor) -> torch.Tensor:
        """The (fractional) timestep whose ``alpha_bar`` equals the given value: the inverse of :meth:`alpha_bar`.

        Values above ``alpha_bar_0`` map to 0 and below ``alpha_bar_{T-1}`` to ``T-1`` (clamped).
        """
        target = torch.log(torch.as_tensor(alpha_bar, dtype=torch.float64))
        log_ac = self._tables_on(target.device)[0]
        target = target.clamp(min=log_ac[-1], max=log_ac[0])  # tensor bounds: no host read of a device value
        neg = -log_ac  # increasing in t
        idx = torch.searchsorted(neg, -target.contiguous()).clamp(1, self.num_train_timesteps - 1)
        lo, hi = neg[idx - 1], neg[idx]
        frac = ((-target) - lo) / (hi - lo).clamp(min=1e-30)
        return (idx - 1).to(torch.float64) + frac.clamp(0, 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The VP forward marginal ``x_t = a_t x0 + s_t eps`` (diffusers' ``add_noise``)."""
        return expand_like(self.a(t), x0) * x0 + expand_like(self.s(t), x0) * noise

    def __repr__(self) -> str:
        return f"VPSchedule({self.config})"


# ---------------------------------------------------------------------- prediction-type conversions
def to_x0_eps(
    pred: torch.Tensor, prediction_type: str, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recover ``(x0, eps)`` from a prediction at ``x = a x0 + s eps``.

    ``a`` and ``s`` broadcast against ``x`` (use :func:`expand_like`). The formulas are exact for any affine
    path; for ``v_prediction`` they divide by ``a^2 + s^2`` (1 on a VP path).
    """
    if prediction_type == "epsilon":
        return (x - s * pred) / a, pred
    if prediction_type == "sample":
        return pred, (x - a * pred) / s
    if prediction_type == "v_prediction":
        n = a * a + s * s
        return (a * x - s * pred) / n, (s * x + a * pred) / n
    if prediction_type == "flow":
        x0 = (x - s * pred) / (a + s)
        return x0, pred + x0
    raise RayflowError(f"unknown prediction type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")


def from_x0_eps(
    x0: torch.Tensor, eps: torch.Tensor, prediction_type: str, a: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """The prediction of type ``prediction_type`` that corresponds to ``(x0, eps)`` on the path ``(a, s)``."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    if prediction_type == "flow":
        return eps - x0
    raise RayflowError(f"unknown prediction type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")


def convert_prediction(
    pred: torch.Tensor, from_type: str, to_type: str, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """Convert a prediction between types at the point ``x = a x0 + s eps``."""
    if from_type == to_type:
        return pred
    x0, eps = to_x0_eps(pred, from_type, x, a, s)
    return from_x0_eps(x0, eps, to_type, a, s)


def flow_time_to_timestep(tau: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Map rectified-flow time ``tau`` in [0, 1] (1 = noise) to our timestep scale: ``t = tau * T - 1``.

    ``tau = 1`` is ``t = T-1`` and ``tau = 0`` is ``t = -1`` (clean data), so flow students take the same
    timestep input as the VP teacher they are initialised from.
    """
    return torch.as_tensor(tau, dtype=torch.float64) * num_train_timesteps - 1.0


def timestep_to_flow_time(t: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Inverse of :func:`flow_time_to_timestep`: ``tau = (t + 1) / T``."""
    return (torch.as_tensor(t, dtype=torch.float64) + 1.0) / num_train_timesteps
