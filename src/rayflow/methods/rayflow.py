r"""RayFlow (Shao et al., CVPR 2025, arXiv 2503.07699): instance-aware rays from data to a teacher-chosen noise.

The paper's method section could not be obtained; ``../shared/research/rayflow-paper.md`` reconstructs it and
tags every piece. Tags below: [RECOVERED] = the paper's wording or formula as recovered, [INFERRED] = the
reconstruction's derivation, [OURS] = a choice made here (by measurement where possible; see docs/rayflow.md).

Notation (paper's kernel notation = DDPM's square roots, reconstruction §1): ``a_t = sqrt(alpha_bar_t)``,
``s_t = sqrt(1 - alpha_bar_t)``; integer timesteps ``0 .. T-1`` (large = noise), ``t = -1`` is clean data.

Algorithm 1 - training (:class:`RayFlowObjective`)::

    instance (x0, c, eps):  eps ~ N(0, I); x0 from data [RECOVERED: real data] or the teacher's ODE from eps [OURS]
    eps_mu = 1/K sum_k eps_phi(a_k x0 + s_k eps, t_k, c)     unified noise expectation  [RECOVERED: E_t[E[eps_t]];
                                                                                            recipe INFERRED §2.3]
    t ~ T_theta (Time Sampler) or a fixed sampler;  w = p(t) / q(t)                        [RECOVERED q* ∝ xi_t p(t)]
    x_t = a_t x0 + (1 - a_t) eps_mu + sigma s_t z             the ray process   [RECOVERED kernel, closed form
                                                                                 INFERRED: barred a_t, sigma on z]
    L = w * lambda(t) * || pred_theta(x_t, t, c) - target ||^2
        epsilon form: pred = eps_mu estimate, target eps_mu                 [INFERRED §2.7, the paper's eps-form]
        velocity form: pred = v estimate, target v = x0 - eps_mu            [OURS: x0 = x_t + (1 - a_t) v]

Algorithm 2/3 - sampling (:func:`ray_sample`)::

    x = N(0, I) [* start_std]                                          [INFERRED A3; variance-matched: OURS]
    for t > t' on the grid:  x0_hat = (x - (1 - a_t) eps_hat) / a_t;  x = a_t' x0_hat + (1 - a_t') eps_hat
    (one step: x0 = (x_T - (1 - a_T) eps_hat) / a_T                                  [RECOVERED §2.9])

In velocity form the same step is ``x' = x + (a_t' - a_t) v_hat``: Euler in ``a`` along the ray, no division.

Student = teacher network behind an exact change of variables (:class:`RayParameterization`): a ray point
``x = a x0 + (1-a) eps_mu`` is the VP point ``c x = a' x0 + s' eps_mu`` with ``c = 1/sqrt(a^2 + (1-a)^2)``,
``a' = c a``, ``s' = c (1-a)`` (same SNR, unit variance), at the fractional timestep ``t'`` whose
``alpha_bar = a'^2``. The network is called there, on the diffusers timestep scale, and its prediction (of any
type) converts exactly to the ray's ``(x0, eps_mu)``; so an epsilon teacher initialises either form exactly
(``network_prediction=epsilon``). The default velocity student instead reads the teacher's weights as a flow
head (InstaFlow's move) [OURS, measured: docs/rayflow.md §3.3].
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rayflow.caches import build_or_load, model_fingerprint
from rayflow.errors import RayflowError, require
from rayflow.methods import register
from rayflow.methods.base import DistillContext, DistillResult, Method
from rayflow.models import Condition, Denoiser, ModelConfig, as_epsilon, build_model, with_guidance
from rayflow.samplers import SPACINGS, get_sampler, make_timesteps, sampler_nfe
from rayflow.schedules import PREDICTION_TYPES, VPSchedule, convert_prediction, expand_like, to_x0_eps
from rayflow.time_samplers import TIME_SAMPLERS, TimeSampler, build_time_sampler, downsample, plot_time_distribution

PARAMETERIZATIONS = ("epsilon", "velocity")
X0_SOURCES = ("data", "teacher", "mixed")
LOSS_WEIGHTINGS = ("uniform", "snr")
START_NOISES = ("standard", "variance-matched")
NUM_FEATURES = 4  # instance features of the conditioned Time Sampler (see instance_features)


# ---------------------------------------------------------------------- configuration
@dataclass
class RayFlowConfig:
    """Every option of RayFlow (``--option key=value``); [NOT FOUND] in the paper unless noted.

    Defaults were chosen by measurement on exact Gaussian-mixture teachers (docs/rayflow.md §3: the
    one-factor-at-a-time sweep ``benchmarks/rayflow_ablation.py --table defaults`` and the ablation): velocity
    form (4-15x better than epsilon), teacher-ODE x0 (best at every NFE with an exact teacher; with a learned
    teacher, data or mixed x0 wins at 4+ NFE), the learned Time Sampler (best of learned / uniform /
    logit-normal with teacher x0), K = 8, sigma = 0, standard start noise, uniform weighting, reweighting on.
    """

    # --- unified noise expectation eps_mu (reconstruction §2.3)
    k_timesteps: int = 8  # K teacher timesteps averaged into eps_mu
    timestep_set: str = "linspace"  # "linspace" (K evenly spaced in [timestep_min, T-1]) | "random" | "999,500,..."
    timestep_min: int = 0
    instance_target: bool = True  # False: eps_mu := eps (ablation: a plain straight-path flow / reflow)
    x0_source: str = "teacher"  # "data" (the paper) | "teacher" (its ODE from eps) | "mixed" (schedule below)
    mix_start: float = 1.0  # mixed: fraction of teacher-x0 instances at the first step ...
    mix_end: float = 0.0  # ... and at the last (linear in between)
    teacher_solver: str = "dpm++2m"  # teacher ODE for teacher-x0 instances
    teacher_steps: int = 25
    # --- eps_mu pools: cached in the run's cache directory (resumable), else computed in memory at the start;
    #     online=true computes eps_mu (and teacher x0) afresh for every batch instead (no cache directory then)
    online: bool = False
    cache_size: int = 0  # instances per pool; 0 = max(len(dataset), 16384)
    cache_shard_size: int = 4096
    cache_seed: int = 0
    # --- ray process and loss (§2.4, §2.7)
    sigma: float = 0.0  # target std; the paper's optimum is sigma* -> 0
    parameterization: str = "velocity"  # "epsilon" (eps_mu, the paper's) | "velocity" (v = x0 - eps_mu)
    # what the raw network outputs at the VP-matched point: auto = the form's own (flow for velocity, epsilon for
    # epsilon), the teacher's weights reinterpreted as InstaFlow does; the teacher's type (e.g. epsilon) keeps
    # the exact init, which the velocity form then divides by a_t (measured far worse at 1 NFE; see docs §1)
    network_prediction: str = "auto"
    loss_weighting: str = "uniform"  # "uniform" | "snr" (flow-matching weight 1/a_t^2 on the eps residual)
    snr_weight_max: float = 1000.0  # clip of the snr weight before normalising it to mean 1 over t
    label_dropout: float = 0.0  # student label dropout, for CFG at sampling time
    # --- Time Sampler (§2.8)
    time_sampler: str = "learned"  # learned (T_theta) | uniform | logit-normal | u-shaped | loss-history
    reweight: bool = True  # multiply the loss by p(t)/q(t) (unbiased) or not (emphasis only)
    weight_clip: float = 10.0
    time_sampler_features: bool = False  # condition T_theta on instance features (else one global density)
    ksd_bandwidth: float = 0.5
    time_sampler_warmup: int = 50  # student steps of uniform draws before T_theta is used
    time_sampler_uniform_mix: float = 0.1
    time_sampler_lr: float = 0.05
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    u_shape_a: float = 4.0
    # --- sampling (§2.9, §2.10)
    spacing: str = "trailing"  # timestep grid of the few-step sampler
    start_noise: str = "standard"  # "standard" N(0, I) | "variance-matched" (scaled by start_std)
    start_std: float = 0.0  # variance-matched scale; 0 = measured on the ray endpoints at distillation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(value: str, choices: tuple[str, ...], what: str) -> None:
    require(value in choices, f"rayflow: {what} must be one of {', '.join(choices)}, got {value!r}")


def validate_config(c: RayFlowConfig) -> None:
    """One-line :class:`RayflowError` for every out-of-range option."""
    require(c.k_timesteps >= 1, f"rayflow: k_timesteps (K) must be >= 1, got {c.k_timesteps}")
    require(c.sigma >= 0 and math.isfinite(c.sigma), f"rayflow: sigma must be >= 0, got {c.sigma}")
    require(c.timestep_min >= 0, f"rayflow: timestep_min must be >= 0, got {c.timestep_min}")
    if c.timestep_set not in ("linspace", "random"):
        parse_timestep_list(c.timestep_set)
    _choice(c.x0_source, X0_SOURCES, "x0_source")
    _choice(c.parameterization, PARAMETERIZATIONS, "parameterization")
    _choice(c.loss_weighting, LOSS_WEIGHTINGS, "loss_weighting")
    _choice(c.time_sampler, TIME_SAMPLERS, "time_sampler")
    _choice(c.start_noise, START_NOISES, "start_noise")
    _choice(c.spacing, SPACINGS, "spacing")
    _choice(c.network_prediction, ("auto", *PREDICTION_TYPES), "network_prediction")
    get_sampler(c.teacher_solver)
    require(c.teacher_steps >= 1, f"rayflow: teacher_steps must be >= 1, got {c.teacher_steps}")
    for name in ("mix_start", "mix_end"):
        v = getattr(c, name)
        require(0 <= v <= 1, f"rayflow: {name} must be in [0, 1], got {v}")
    require(0 <= c.label_dropout < 1, f"rayflow: label_dropout must be in [0, 1), got {c.label_dropout}")
    require(c.cache_size >= 0, f"rayflow: cache_size must be >= 0 (0 = automatic), got {c.cache_size}")
    require(c.cache_shard_size >= 1, f"rayflow: cache_shard_size must be >= 1, got {c.cache_shard_size}")
    require(c.weight_clip >= 1, f"rayflow: weight_clip must be >= 1, got {c.weight_clip}")
    require(c.snr_weight_max >= 1, f"rayflow: snr_weight_max must be >= 1, got {c.snr_weight_max}")
    require(c.ksd_bandwidth > 0, f"rayflow: ksd_bandwidth must be > 0, got {c.ksd_bandwidth}")
    require(c.time_sampler_warmup >= 0, f"rayflow: time_sampler_warmup must be >= 0, got {c.time_sampler_warmup}")
    require(0 <= c.time_sampler_uniform_mix < 1,
            f"rayflow: time_sampler_uniform_mix must be in [0, 1), got {c.time_sampler_uniform_mix}")
    require(c.start_std >= 0, f"rayflow: start_std must be >= 0 (0 = measure), got {c.start_std}")


def parse_timestep_list(text: str) -> list[int]:
    """``"999,500,100"`` -> ``[999, 500, 100]`` (an explicit eps_mu timestep set)."""
    try:
        values = [int(v) for v in str(text).replace("/", ",").split(",") if v.strip()]
    except ValueError:
        raise RayflowError(
            f"rayflow: timestep_set must be linspace, random or a comma-separated list of timesteps, got {text!r}"
        ) from None
    require(len(values) >= 1, f"rayflow: timestep_set {text!r} names no timesteps")
    return values


# ---------------------------------------------------------------------- the ray algebra
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

    epsilon: ``x0 = (x - (1 - a) eps) / a`` [RECOVERED one-step formula]; velocity: ``x0 = x + (1 - a) v``,
    ``eps = x - a v`` [OURS]. Both are exact on the ``sigma = 0`` ray.
    """
    if parameterization == "epsilon":
        return (x - (1 - a) * pred) / a, pred
    if parameterization == "velocity":
        return x + (1 - a) * pred, x - a * pred
    raise RayflowError(f"rayflow: unknown parameterization {parameterization!r}")


def ray_target(x0: torch.Tensor, eps_mu: torch.Tensor, parameterization: str) -> torch.Tensor:
    """What a perfect student outputs: ``eps_mu`` (epsilon form) or ``v = x0 - eps_mu`` (velocity form)."""
    if parameterization == "epsilon":
        return eps_mu
    if parameterization == "velocity":
        return x0 - eps_mu
    raise RayflowError(f"rayflow: unknown parameterization {parameterization!r}")


def vp_matched(schedule: VPSchedule, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The VP point with the ray point's SNR: ``(c, a', s', t')`` (float64, ``[B]``) for ray timesteps ``t``.

    ``c = 1/sqrt(a^2 + (1-a)^2)``, ``a' = c a``, ``s' = c (1 - a)`` (so ``a'^2 + s'^2 = 1`` and
    ``a'/s' = a/(1-a)``), ``t' = alpha_bar^{-1}(a'^2)``. The ray's SNR is higher than VP's at the same ``t``
    (``(1+a)/(1-a)`` times), so ``t' <= t``; below the schedule's first step (``a'^2 > alpha_bar_0``, only for
    ``a_t`` within ~1% of 1) ``t'`` is clamped to 0 and the network sees slightly more signal than it expects.
    """
    a = schedule.a(torch.as_tensor(t, dtype=torch.float64).cpu())
    c = 1.0 / torch.sqrt(a * a + (1 - a) ** 2)
    a2, s2 = c * a, c * (1 - a)
    return c, a2, s2, schedule.timestep_from_alpha_bar(a2 * a2)


class RayParameterization:
    """Calls a network at the VP-matched point and returns the ray prediction (an exact change of variables).

    ``network(c x, t', cond)`` is a prediction of type ``network.prediction_type`` on the VP path
    ``(a', s')``; :func:`rayflow.schedules.to_x0_eps` turns it into ``(x0, eps)``, which are exactly the ray's
    ``(x0, eps_mu)`` because ``c x = a' x0 + s' eps_mu``. Output: ``eps`` (epsilon form) or ``x0 - eps``
    (velocity form). [OURS] (the paper fine-tunes SD's epsilon UNet with LoRA; how it feeds ray points to it
    was not recovered.)
    """

    def __init__(self, schedule: VPSchedule, parameterization: str) -> None:
        _choice(parameterization, PARAMETERIZATIONS, "parameterization")
        self.schedule, self.parameterization = schedule, parameterization

    def __call__(self, network: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Condition = None,
                 prediction_type: str | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).flatten().expand(x.shape[0]).cpu()
        c, a2, s2, t2 = vp_matched(self.schedule, t)
        c, a2, s2 = (expand_like(v, x) for v in (c, a2, s2))
        xv = c * x
        pred = network(xv, t2.to(device=x.device, dtype=torch.float32), cond)
        ptype = prediction_type or _unwrap(network).prediction_type
        x0, eps = to_x0_eps(pred.to(x.dtype), ptype, xv, a2, s2)
        return eps if self.parameterization == "epsilon" else x0 - eps


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    from rayflow.checkpoint import unwrap_denoiser

    return unwrap_denoiser(model)


class RayStudent(Denoiser):
    """The distilled generator: ``student(x, t, cond)`` is the ray prediction (``prediction_type`` is
    ``"ray-epsilon"`` or ``"ray-velocity"``, which VP samplers refuse instead of misreading); sample it with
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
def check_grid(timesteps: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """A sampling grid ``[N+1]``: strictly decreasing, from at most ``T-1`` down to ``-1`` (data) or above."""
    ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten().cpu()
    require(ts.numel() >= 2, f"rayflow: a timestep grid needs at least 2 entries (1 step), got {ts.numel()}")
    require(bool(torch.all(ts[1:] < ts[:-1])), f"rayflow: timesteps must decrease strictly, got {ts.tolist()}")
    require(float(ts[0]) <= num_train_timesteps - 1 and float(ts[-1]) >= -1,
            f"rayflow: timesteps must lie in [-1, {num_train_timesteps - 1}], got {ts.tolist()}")
    return ts


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


# ---------------------------------------------------------------------- the unified noise expectation
def eps_mu_timesteps(config: RayFlowConfig, num_train_timesteps: int, n: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """The teacher timesteps ``[n, K]`` averaged into each instance's ``eps_mu``.

    ``linspace``: ``round(linspace(T-1, timestep_min, K))`` (K = 1 is ``T-1``); ``random``: K uniform draws
    in ``[timestep_min, T-1]`` per instance; a list: those timesteps. [INFERRED §2.3: "over all timesteps";
    the set and K are NOT FOUND.]
    """
    T, K, lo = num_train_timesteps, config.k_timesteps, config.timestep_min
    require(lo <= T - 1, f"rayflow: timestep_min must be <= {T - 1}, got {lo}")
    if config.timestep_set == "linspace":
        ts = torch.linspace(T - 1, lo, K, dtype=torch.float64).round() if K > 1 else torch.tensor([T - 1.0])
        return ts.double().expand(n, -1)
    if config.timestep_set == "random":
        return torch.randint(lo, T, (n, K), generator=generator).double()
    ts = torch.tensor(parse_timestep_list(config.timestep_set), dtype=torch.float64)
    require(bool(torch.all((ts >= 0) & (ts <= T - 1))), f"rayflow: timestep_set entries must lie in 0..{T - 1}")
    return ts.expand(n, -1)


@torch.no_grad()
def unified_noise_expectation(teacher: Denoiser, x0: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor,
                              schedule: VPSchedule, cond: Condition = None, guidance: float = 1.0,
                              max_rows: int = 16384) -> torch.Tensor:
    """``eps_mu = 1/K sum_k eps_phi(a_{t_k} x0 + s_{t_k} eps, t_k, c)`` for each row (``timesteps`` ``[B, K]``).

    One shared noise draw per instance (reconstruction §2.3, §6 A4): averaging over the noise too would shrink
    ``eps_mu`` to the teacher's bias. The teacher is called on all ``B*K`` points at once (in chunks of
    ``max_rows``), with classifier-free guidance ``guidance``; a non-epsilon teacher is converted exactly.
    """
    b, k = timesteps.shape
    model = with_guidance(teacher, guidance)
    rows = x0.shape[0]
    require(rows == b and eps.shape == x0.shape, "unified_noise_expectation: x0, eps and timesteps disagree")
    t = timesteps.t().reshape(-1)  # [K*B], timestep-major
    xs = x0.repeat(k, *([1] * (x0.ndim - 1)))
    es = eps.repeat(k, *([1] * (x0.ndim - 1)))
    a, s = expand_like(schedule.a(t).to(x0.dtype), xs), expand_like(schedule.s(t).to(x0.dtype), xs)
    x_t = a * xs + s * es
    cs = None if cond is None else cond.repeat(k, *([1] * (cond.ndim - 1)))
    out = []
    for start in range(0, x_t.shape[0], max_rows):
        sl = slice(start, start + max_rows)
        pred = model(x_t[sl], t[sl].to(device=x0.device, dtype=torch.float32), None if cs is None else cs[sl])
        if model.prediction_type != "epsilon":
            pred = convert_prediction(pred.to(x0.dtype), model.prediction_type, "epsilon", x_t[sl], a[sl], s[sl])
        out.append(pred.to(x0.dtype))
    return torch.cat(out).reshape(k, *x0.shape).mean(0)


@torch.no_grad()
def teacher_x0(teacher: Denoiser, eps: torch.Tensor, schedule: VPSchedule, cond: Condition = None,
               guidance: float = 1.0, solver: str = "dpm++2m", steps: int = 25) -> torch.Tensor:
    """The teacher's sample from noise ``eps`` (its probability-flow ODE, ``solver`` with ``steps``)."""
    grid = make_timesteps(steps, schedule.num_train_timesteps, "trailing")
    return get_sampler(solver)(with_guidance(teacher, guidance), eps, grid, schedule, cond)


def instance_features(x0: torch.Tensor, eps_mu: torch.Tensor) -> torch.Tensor:
    """Cheap per-instance features for the conditioned Time Sampler: ``[|x0|, |eps_mu|, |x0 - eps_mu|]/sqrt(d)``
    and ``cos(x0, eps_mu)`` ([OURS]; the paper conditions ``T_theta`` on ``(x0, eps_mu)``, how is NOT FOUND)."""
    a, b = x0.flatten(1).float(), eps_mu.flatten(1).float()
    d = math.sqrt(a.shape[1])
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-8)
    return torch.stack([a.norm(dim=1) / d, b.norm(dim=1) / d, (a - b).norm(dim=1) / d, cos], 1).cpu()


# ---------------------------------------------------------------------- training instances
def _noise_from_seeds(seeds: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """One ``N(0, I)`` draw per row from its own seed: a cached instance's noise can always be regenerated."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


class InstanceSource:
    """Supplies ``(x0, cond, eps_mu)`` batches: rows of the pre-computed pools (``pools`` maps ``"data"`` /
    ``"teacher"`` to :meth:`RayFlow.build_pool` output), or, with ``pools=None``, instances computed online."""

    def __init__(self, method: RayFlow, ctx: DistillContext, teacher: Denoiser, pools: dict[str, dict] | None):
        self.cfg = method.config
        self.ctx, self.teacher, self.schedule = ctx, teacher, ctx.schedule
        self.data = ctx.dataset.x.float()
        self.labels = ctx.dataset.labels if teacher.num_classes > 0 else None
        self.pools = pools
        self.max_steps = max(1, int(ctx.train.max_steps))

    def teacher_fraction(self, step: int) -> float:
        cfg = self.cfg
        if cfg.x0_source == "data":
            return 0.0
        if cfg.x0_source == "teacher":
            return 1.0
        frac = step / max(1, self.max_steps - 1)
        return cfg.mix_start + (cfg.mix_end - cfg.mix_start) * frac

    def _cond(self, idx: torch.Tensor) -> Condition:
        return None if self.labels is None else self.labels[idx.cpu()]

    def compute(self, x0: torch.Tensor, eps: torch.Tensor, cond: Condition, generator: torch.Generator | None
                ) -> torch.Tensor:
        """``eps_mu`` of these instances (``eps`` itself when the instance target is off)."""
        if not self.cfg.instance_target:
            return eps.clone()
        ts = eps_mu_timesteps(self.cfg, self.schedule.num_train_timesteps, x0.shape[0], generator)
        return unified_noise_expectation(self.teacher, x0, eps, ts, self.schedule, cond, self.ctx.guidance)

    def make_teacher_x0(self, eps: torch.Tensor, cond: Condition) -> torch.Tensor:
        return teacher_x0(self.teacher, eps, self.schedule, cond, self.ctx.guidance, self.cfg.teacher_solver,
                          self.cfg.teacher_steps)

    def draw(self, n: int, step: int, generator: torch.Generator) -> tuple[torch.Tensor, Condition, torch.Tensor]:
        dev = self.ctx.device
        use_teacher = torch.rand(n, generator=generator, device=generator.device).cpu() < self.teacher_fraction(step)
        if self.pools is not None:
            return self._draw_pools(n, use_teacher, generator)
        idx = torch.randint(0, self.data.shape[0], (n,), generator=generator, device=generator.device).cpu()
        cond = self._cond(idx)
        cond = None if cond is None else cond.to(dev)
        eps = torch.randn((n, *self.data.shape[1:]), generator=generator, device=generator.device).to(dev)
        x0 = self.data[idx].to(dev)
        if bool(use_teacher.any()):
            sel = use_teacher.to(dev)
            x0[sel] = self.make_teacher_x0(eps[sel], None if cond is None else cond[sel]).to(x0.dtype)
        g_ts = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator,
                                                               device=generator.device)))
        return x0, cond, self.compute(x0, eps, cond, g_ts)

    def _draw_pools(self, n, use_teacher, generator):
        dev = self.ctx.device
        parts_x0, parts_c, parts_e = [], [], []
        order = torch.cat([torch.nonzero(~use_teacher)[:, 0], torch.nonzero(use_teacher)[:, 0]])
        for name, count in (("data", int((~use_teacher).sum())), ("teacher", int(use_teacher.sum()))):
            if count == 0:
                continue
            pool = self.pools[name]
            rows = torch.randint(0, pool["eps_mu"].shape[0], (count,), generator=generator,
                                 device=generator.device).cpu()
            if name == "data":
                idx = pool["index"][rows]
                parts_x0.append(self.data[idx])
                parts_c.append(self._cond(idx))
            else:
                parts_x0.append(pool["x0"][rows])
                parts_c.append(None if self.labels is None else pool["label"][rows])
            parts_e.append(pool["eps_mu"][rows])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n)
        x0 = torch.cat(parts_x0)[inverse].to(dev)
        e = torch.cat(parts_e)[inverse].to(dev)
        cond = None if self.labels is None else torch.cat(parts_c)[inverse].to(dev)
        return x0, cond, e


# ---------------------------------------------------------------------- the objective (Algorithm 1)
def snr_weight_table(schedule: VPSchedule, clip: float) -> torch.Tensor:
    """``lambda(t) = min(1/a_t^2, clip)`` normalised to mean 1 over ``t``.

    ``1/a_t^2 = 1 + 1/SNR_t`` turns the eps_mu residual into the flow-matching (velocity) residual in the
    ray's own time ``tau = 1 - a_t`` (``dx/dtau = eps_mu - x0``): the reconstruction's
    ``w(t) = (d log a_t / dt)^2`` with ``t := tau`` (§2.7, [INFERRED]; whether the paper weights at all is
    NOT FOUND).
    """
    a = schedule.a(torch.arange(schedule.num_train_timesteps, dtype=torch.float64))
    w = (1.0 / (a * a)).clamp(max=clip)
    return (w / w.mean()).float()


class RayFlowObjective:
    """One student update of Algorithm 1; :meth:`after_step` trains the Time Sampler on the losses it measured.

    The student is the raw network (what the trainer saves); the ray change of variables is applied here.
    """

    def __init__(self, source: InstanceSource, schedule: VPSchedule, config: RayFlowConfig,
                 time_sampler: TimeSampler, batch_size: int, num_classes: int, snapshot_every: int) -> None:
        self.source, self.schedule, self.cfg = source, schedule, config
        self.time_sampler = time_sampler
        self.batch_size, self.num_classes = int(batch_size), int(num_classes)
        self.ray = RayParameterization(schedule, config.parameterization)
        self.loss_weight = (snr_weight_table(schedule, config.snr_weight_max) if config.loss_weighting == "snr"
                            else None)
        self.snapshot_every = max(1, int(snapshot_every))
        self.snapshots: list[dict[str, Any]] = []
        self._pending: tuple | None = None

    @property
    def conditioned(self) -> bool:
        return self.cfg.time_sampler == "learned" and self.cfg.time_sampler_features

    def __call__(self, model: torch.nn.Module, step: int, generator: torch.Generator):
        from rayflow.training import LossOutput

        cfg, dev = self.cfg, self.source.ctx.device
        b = self.batch_size
        x0, cond, eps_mu = self.source.draw(b, step, generator)
        feats = instance_features(x0, eps_mu) if self.conditioned else None
        t, w = self.time_sampler.sample(b, generator, feats)
        z = torch.randn(x0.shape, generator=generator, device=generator.device).to(dev, x0.dtype)
        a = expand_like(self.schedule.a(t.double()).to(x0.dtype), x0).to(dev)
        s = expand_like(self.schedule.s(t.double()).to(x0.dtype), x0).to(dev)
        x_t = ray_point(x0, eps_mu, a, s, cfg.sigma, z)
        if cond is not None and cfg.label_dropout > 0 and self.num_classes > 0:
            drop = (torch.rand(b, generator=generator, device=generator.device) < cfg.label_dropout).to(dev)
            cond = torch.where(drop, torch.full_like(cond, self.num_classes), cond)
        if self.num_classes == 0:
            cond = None
        pred = self.ray(model, x_t, t.to(dev), cond).float()
        if self.loss_weight is None:
            residual = pred - ray_target(x0, eps_mu, cfg.parameterization).float()
            per = residual.square().flatten(1).mean(1)
        else:
            _, eps_hat = ray_x0_eps(pred, cfg.parameterization, x_t.float(), a.float())
            per = (eps_hat - eps_mu.float()).square().flatten(1).mean(1) * self.loss_weight[t].to(dev)
        weights = w.to(dev) if cfg.reweight else torch.ones_like(per)
        loss = (per * weights).mean()
        self._pending = (t.cpu(), per.detach().cpu(), feats)
        return LossOutput(loss, {"loss_unweighted": float(per.detach().mean())})

    def after_step(self, model: torch.nn.Module, step: int, generator: torch.Generator) -> dict[str, float]:
        logs: dict[str, float] = {}
        if self._pending is not None:
            t, per, feats = self._pending
            logs = self.time_sampler.update(t, per, feats, generator)
            if (step + 1) % self.snapshot_every == 0 or step == 0:
                self.snapshots.append(self.snapshot(step + 1, feats))
        return logs

    def snapshot(self, step: int, feats: torch.Tensor | None) -> dict[str, Any]:
        probs = self.time_sampler.probs(feats)
        snap: dict[str, Any] = {"step": int(step), "probs": downsample(probs)}
        target = getattr(self.time_sampler, "target_probs", None)
        if target is not None:
            snap["target"] = downsample(target(feats))
        t_grid = torch.arange(probs.numel(), dtype=torch.float64)
        snap["mean_t"] = float((probs * t_grid).sum())
        return snap

    def state_dict(self) -> dict[str, Any]:
        return {"time_sampler": self.time_sampler.state_dict(), "snapshots": self.snapshots}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.time_sampler.load_state_dict(state["time_sampler"])
        self.snapshots = list(state.get("snapshots", []))


# ---------------------------------------------------------------------- the method
def epsilon_teacher(teacher: Denoiser, schedule: VPSchedule) -> Denoiser:
    """The teacher as an epsilon-predictor: converted when it predicts x0, v or flow; refused otherwise."""
    return as_epsilon(teacher, schedule)


def _teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """Fingerprint of the model inside the counting/conversion wrappers (they hold no weights of their own)."""
    while isinstance(getattr(teacher, "model", None), torch.nn.Module):
        teacher = teacher.model
    return model_fingerprint(teacher)


@register
class RayFlow(Method):
    """RayFlow (CVPR 2025): each instance gets its own straight ray from data to a teacher-averaged noise
    eps_mu; the student learns it in a few steps; a learned Time Sampler picks the training timesteps."""

    name = "rayflow"
    config_class = RayFlowConfig
    nfes = (1, 2, 4, 8)

    def validate(self) -> None:
        validate_config(self.config)

    def nfe_for_steps(self, steps: int) -> int:
        return int(steps)

    # -------------------------------------------------------------- student construction
    def student_config(self, ctx: DistillContext) -> ModelConfig:
        """The network the student uses: the teacher's architecture, whose raw output at the VP-matched point is
        ``network_prediction``; ``auto`` is the form's own output, ``epsilon`` for the epsilon form and ``flow``
        (``= eps_mu - x0 = -v``) for the velocity form.

        A teacher-initialised student whose output type differs from the teacher's keeps the teacher's weights
        and reinterprets its head, as InstaFlow turns SD's epsilon UNet into a velocity model [OURS, measured:
        docs/rayflow.md §1]. Asking for the teacher's own type instead keeps the exact init (the student starts
        as the teacher), at the price of dividing its epsilon error by ``a_t`` near the noise end.
        """
        cfg = dataclasses.replace(ctx.student_config)
        wanted = self.config.network_prediction
        if wanted == "auto":
            wanted = "epsilon" if self.config.parameterization == "epsilon" else "flow"
        cfg.prediction_type = wanted
        return cfg

    def build_network(self, ctx: DistillContext) -> Denoiser:
        # a from-scratch student is initialised from the run's seed, not from whatever the global RNG holds,
        # so two runs of one configuration are the same run (and a resumed one matches an uninterrupted one)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(getattr(ctx.train, "seed", 0)))
            net = build_model(self.student_config(ctx))
        if ctx.student_init is not None:
            net.load_state_dict({k: v.clone() for k, v in ctx.student_init.items()})
        return net.to(ctx.device)

    def wrap_student(self, network: Denoiser, schedule: VPSchedule) -> Denoiser:
        if str(getattr(network, "prediction_type", "")).startswith("ray-"):  # already predicts along the ray
            require(getattr(network, "parameterization", None) == self.config.parameterization,
                    f"rayflow: this student predicts {network.prediction_type}, but the method is configured for "
                    f"the {self.config.parameterization} form")
            return network
        return RayStudent(network, schedule, self.config.parameterization)

    # -------------------------------------------------------------- eps_mu pools (the cache)
    def teacher_nfe_per_instance(self, source: str, teacher: Denoiser, guidance: float) -> int:
        cfg = self.config
        cfg_factor = 2 if (guidance != 1.0 and teacher.num_classes > 0) else 1
        n = cfg.k_timesteps if cfg.instance_target else 0
        if source == "teacher":
            n += sampler_nfe(cfg.teacher_solver, cfg.teacher_steps)
        return n * cfg_factor

    def cache_meta(self, ctx: DistillContext, teacher: Denoiser, source: str) -> dict[str, Any]:
        cfg = self.config
        meta = {
            "kind": "rayflow-eps_mu", "format": 1, "source": source, "teacher": _teacher_fingerprint(teacher),
            "data": ctx.dataset.spec, "schedule": ctx.schedule.config, "guidance": float(ctx.guidance),
            "instance_target": cfg.instance_target, "k_timesteps": cfg.k_timesteps,
            "timestep_set": cfg.timestep_set, "timestep_min": cfg.timestep_min, "cache_seed": cfg.cache_seed,
            "conditional": teacher.num_classes > 0,
        }
        if source == "teacher":
            meta.update(teacher_solver=cfg.teacher_solver, teacher_steps=cfg.teacher_steps)
        return meta

    def pool_size(self, ctx: DistillContext) -> int:
        return self.config.cache_size or max(len(ctx.dataset), 16384)

    def build_pool(self, ctx: DistillContext, teacher: Denoiser, source: str, root: Path | None,
                   progress: bool = False) -> dict[str, torch.Tensor]:
        """The cached instances of one x0 source: built in shards (resumable), reused when the meta matches.

        Shard tensors: ``noise_seed`` (each row's ``eps`` is ``randn`` from it), ``eps_mu``, and ``index``
        (data rows, cycled) or ``x0``/``label`` (teacher samples).
        """
        cfg, ds = self.config, ctx.dataset
        n_data = len(ds)
        helper = InstanceSource(self, ctx, teacher, None)
        shape = tuple(ds.x.shape[1:])

        def make_shard(index: int, start: int, count: int, g: torch.Generator) -> dict[str, torch.Tensor]:
            seeds = torch.randint(0, 2**62, (count,), generator=g)
            eps = _noise_from_seeds(seeds, shape).to(ctx.device)
            out: dict[str, torch.Tensor] = {"noise_seed": seeds}
            if source == "data":
                idx = (start + torch.arange(count)) % n_data
                x0, cond = ds.x[idx].float().to(ctx.device), helper._cond(idx)
                out["index"] = idx
            else:
                cond = None
                if helper.labels is not None:
                    cond = helper.labels[torch.randint(0, n_data, (count,), generator=g)]
                    out["label"] = cond
                x0 = helper.make_teacher_x0(eps, None if cond is None else cond.to(ctx.device)).float()
                out["x0"] = x0.cpu()
            cond = None if cond is None else cond.to(ctx.device)
            out["eps_mu"] = helper.compute(x0, eps, cond, g).float().cpu()
            return out

        return build_or_load(root, self.cache_meta(ctx, teacher, source), self.pool_size(ctx), make_shard,
                             seed=cfg.cache_seed, shard_size=cfg.cache_shard_size, progress=progress,
                             desc=f"eps_mu ({source} x0)", rank=_rank(ctx), world_size=_world(ctx),
                             barrier=None if ctx.accelerator is None else ctx.accelerator.wait_for_everyone)

    def needed_sources(self) -> list[str]:
        cfg = self.config
        if cfg.x0_source == "mixed":
            return [s for s, used in (("teacher", max(cfg.mix_start, cfg.mix_end) > 0),
                                      ("data", min(cfg.mix_start, cfg.mix_end) < 1)) if used]
        return [cfg.x0_source]

    # -------------------------------------------------------------- start noise
    @torch.no_grad()
    def measure_start_std(self, source: InstanceSource, schedule: VPSchedule, n: int = 2048) -> float:
        """RMS of the ray endpoint ``x_T = a_T x0 + (1 - a_T) eps_mu + sigma s_T z`` over ``n`` instances."""
        g = torch.Generator(device=source.ctx.device).manual_seed(self.config.cache_seed + 4242)
        x0, _, eps_mu = source.draw(n, 0, g)
        T = schedule.num_train_timesteps - 1
        a, s = float(schedule.a(T)), float(schedule.s(T))
        x_T = a * x0 + (1 - a) * eps_mu
        var = float(x_T.double().square().mean()) + (self.config.sigma * s) ** 2
        return float(f"{math.sqrt(var):.6g}")  # rounded: the value is part of the run's config

    # -------------------------------------------------------------- distillation
    def distill(self, ctx: DistillContext) -> DistillResult:
        from rayflow.training import Trainer

        cfg, schedule = self.config, ctx.schedule
        require(float(schedule.a(schedule.num_train_timesteps - 1)) > 0,
                "rayflow: the schedule's last a_T is 0; the ray inversion divides by a_T")
        teacher = epsilon_teacher(ctx.teacher, schedule)
        before = int(getattr(ctx.teacher, "evaluations", 0))
        network = self.build_network(ctx)
        student_cfg = self.student_config(ctx)

        pools = None
        pooled_nfe = 0  # what the pools cost, whether built now or reused from an earlier run
        require(not (cfg.online and ctx.cache_dir is not None),
                "rayflow: online=true computes eps_mu per batch and caches nothing; drop --cache or online=true")
        if not cfg.online:
            pools = {}
            for src in self.needed_sources():
                root = None if ctx.cache_dir is None else ctx.cache_path("eps_mu") / src
                pools[src] = self.build_pool(ctx, teacher, src, root, progress=ctx.progress)
                pooled_nfe += self.pool_size(ctx) * self.teacher_nfe_per_instance(src, teacher, ctx.guidance)
        after_pools = int(getattr(ctx.teacher, "evaluations", 0))
        source = InstanceSource(self, ctx, teacher, pools)
        if cfg.start_noise == "variance-matched" and cfg.start_std == 0:
            self.config.start_std = self.measure_start_std(source, schedule)

        features = NUM_FEATURES if (cfg.time_sampler == "learned" and cfg.time_sampler_features) else 0
        sampler = self.build_time_sampler(schedule.num_train_timesteps, features)
        steps = max(1, int(ctx.train.max_steps))
        objective = RayFlowObjective(source, schedule, cfg, sampler, ctx.train.batch_size,
                                     network.num_classes, snapshot_every=max(1, steps // 20))
        run_config = ctx.run_config(self, model=student_cfg.to_dict(), sampler=self.sampler_info())
        trained = Trainer(network, objective, ctx.train, ctx.out_dir, run_config, accelerator=ctx.accelerator).train()
        if ctx.accelerator is None or ctx.accelerator.is_main_process:
            self.write_time_sampler_log(objective, ctx.out_dir, schedule.num_train_timesteps)
        end = int(getattr(ctx.teacher, "evaluations", 0))
        teacher_nfe = pooled_nfe + (end - after_pools)  # + online eps_mu / teacher x0 / start_std measurement
        logs = {"teacher_evaluations_this_run": end - before, "start_std": self.config.start_std,
                "time_sampler_snapshots": len(objective.snapshots)}
        return DistillResult(self.wrap_student(trained, schedule), teacher_nfe=teacher_nfe, logs=logs)

    def build_time_sampler(self, num_timesteps: int, num_features: int = 0) -> TimeSampler:
        cfg = self.config
        opts: dict[str, Any] = {}
        if cfg.time_sampler == "learned":
            opts = dict(bandwidth=cfg.ksd_bandwidth, warmup=cfg.time_sampler_warmup,
                        uniform_mix=cfg.time_sampler_uniform_mix, lr=cfg.time_sampler_lr)
        elif cfg.time_sampler == "logit-normal":
            opts = dict(mean=cfg.logit_normal_mean, std=cfg.logit_normal_std)
        elif cfg.time_sampler == "u-shaped":
            opts = dict(a=cfg.u_shape_a)
        elif cfg.time_sampler == "loss-history":
            opts = dict(uniform_mix=cfg.time_sampler_uniform_mix)
        return build_time_sampler(cfg.time_sampler, num_timesteps, num_features=num_features,
                                  weight_clip=cfg.weight_clip, **opts)

    def sampler_info(self) -> dict[str, Any]:
        """What ``config.json`` says about sampling this student (it needs the ray sampler, not DDIM)."""
        cfg = self.config
        return {"name": "rayflow-ray", "parameterization": cfg.parameterization, "spacing": cfg.spacing,
                "start_noise": cfg.start_noise, "start_std": cfg.start_std, "steps": 4}

    def write_time_sampler_log(self, objective: RayFlowObjective, out_dir: Path, num_timesteps: int) -> None:
        from rayflow.checkpoint import write_json_atomic

        out_dir = Path(out_dir)
        write_json_atomic({"sampler": self.config.time_sampler, "num_timesteps": num_timesteps,
                           "bins": 100, "snapshots": objective.snapshots}, out_dir / "time_sampler.json")
        if objective.snapshots:
            plot_time_distribution(objective.snapshots, out_dir / "time_sampler.png", num_timesteps,
                                   title=f"RayFlow Time Sampler ({self.config.time_sampler})")

    # -------------------------------------------------------------- sampling
    def start_scale(self) -> float:
        cfg = self.config
        if cfg.start_noise == "standard":
            return 1.0
        require(cfg.start_std > 0, "rayflow: start_noise=variance-matched needs start_std (measured at distillation)")
        return cfg.start_std

    def sample(self, student: Denoiser, noise: torch.Tensor, schedule: VPSchedule, steps: int,
               cond: Condition = None, guidance: float = 1.0, timesteps: torch.Tensor | None = None
               ) -> torch.Tensor:
        require(timesteps is not None or int(steps) >= 1, f"rayflow: steps must be >= 1, got {steps}")
        student = self.wrap_student(student, schedule)
        return ray_sample(student, noise, schedule, steps, cond, guidance, timesteps, self.config.spacing,
                          self.start_scale())


def _rank(ctx: DistillContext) -> int:
    return 0 if ctx.accelerator is None else int(ctx.accelerator.process_index)


def _world(ctx: DistillContext) -> int:
    return 1 if ctx.accelerator is None else int(ctx.accelerator.num_processes)


__all__ = ["InstanceSource", "RayFlow", "RayFlowConfig", "RayFlowObjective", "RayParameterization", "RayStudent",
           "check_grid", "eps_mu_timesteps", "epsilon_teacher", "instance_features", "ray_point", "ray_sample",
           "ray_target", "ray_x0_eps", "snr_weight_table", "teacher_x0", "unified_noise_expectation",
           "validate_config", "vp_matched"]
