"""RayFlow's options, in four sections: the instance targets, the ray and its loss, the Time Sampler, sampling.

Every option is set flat from the command line (``--option k_timesteps=8``); :func:`rayflow.methods.base.
config_fields` maps the flat name to its section. [NOT FOUND] in the paper unless noted.

Defaults were chosen by measurement on exact Gaussian-mixture teachers (docs/rayflow.md §3: the one-factor-at-a-time
sweep ``benchmarks/rayflow_ablation.py --table defaults`` and the ablation): flow form (4-15x better than
epsilon), teacher-ODE x0 (best at every NFE with an exact teacher; with a learned teacher, data or mixed x0 wins at
4+ NFE), the learned Time Sampler (best of learned / uniform / logit-normal with teacher x0), K = 8, sigma = 0,
standard start noise, uniform weighting, reweighting on.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from rayflow.errors import RayflowError, require
from rayflow.methods.base import config_from_dict
from rayflow.samplers import SPACINGS, get_sampler
from rayflow.schedules import PREDICTION_TYPES
from rayflow.timestep_dists import TIMESTEP_DISTRIBUTIONS as TIME_SAMPLERS

PARAMETERIZATIONS = ("epsilon", "flow")
#: renamed option values: the velocity form was ``v = x0 - eps_mu``; it is now ``flow = eps_mu - x0`` (the sign of
#: every other flow in the package: d x_t / d(noise)), with identical training and samples (the loss is a square)
VALUE_ALIASES = {"parameterization": {"velocity": "flow"}}
X0_SOURCES = ("data", "teacher", "mixed")
EPS_MU_READINGS = ("average", "trajectory", "start")  # issue #14 (readings.py re-exports the same tuple)
LOSS_WEIGHTINGS = ("uniform", "snr")
START_NOISES = ("standard", "variance-matched")


@dataclass
class TargetConfig:
    """The training instances ``(x0, c, eps_mu)``: the unified noise expectation (reconstruction §2.3), its pools."""

    k_timesteps: int = 8  # K teacher timesteps averaged into eps_mu
    timestep_set: str = "linspace"  # "linspace" (K evenly spaced in [timestep_min, T-1]) | "random" | "999,500,..."
    timestep_min: int = 0
    instance_target: bool = True  # False: eps_mu := eps (ablation: a plain straight-path flow / reflow)
    x0_source: str = "teacher"  # "data" (the paper) | "teacher" (its ODE from eps) | "mixed" (schedule below)
    mix_start: float = 1.0  # mixed: fraction of teacher-x0 instances at the first step ...
    mix_end: float = 0.0  # ... and at the last (linear in between)
    teacher_solver: str = "dpm++2m"  # teacher ODE for teacher-x0 instances
    teacher_steps: int = 25
    # eps_mu pools: cached in the run's cache directory (resumable), else computed in memory at the start;
    # online=true computes eps_mu (and teacher x0) afresh for every batch instead (no cache directory then)
    online: bool = False
    pool_size: int = 0  # instances per pool (old name: cache_size); 0 = max(len(dataset), 16384)
    cache_shard_size: int = 4096
    cache_seed: int = 0
    # issue #14's readings of eps_mu ([INFERRED], see readings.py): "average" (the K points above) | "trajectory"
    # (mean of the teacher's noise along its own ODE path from eps; needs x0_source=teacher) | "start"
    # ((eps - a_T x0)/(1 - a_T): the ray passes through the sampler's starting noise)
    # default "start": on the Fashion-MNIST H200 benchmark it took 1-NFE fd_classifier from 0.61 (average) to 0.22
    # (docs/rayflow.md section 5.2)
    eps_mu_reading: str = "start"
    # expected-noise consistency: weight of the loss that regresses the student's noise at a point of the teacher's
    # trajectory onto eps_mu (0 = off; > 0 stores one trajectory point per pooled instance; needs x0_source=teacher)
    consistency_weight: float = 0.0


@dataclass
class RayConfig:
    """The ray process and the student's loss (reconstruction §2.4, §2.7)."""

    sigma: float = 0.0  # target std; the paper's optimum is sigma* -> 0
    parameterization: str = "flow"  # "epsilon" (eps_mu, the paper's) | "flow" (eps_mu - x0; old: velocity = -flow)
    # what the raw network outputs at the VP-matched point: auto = the form's own (flow for flow, epsilon for
    # epsilon), the teacher's weights reinterpreted as InstaFlow does; the teacher's type (e.g. epsilon) keeps
    # the exact init, which the velocity form then divides by a_t (measured far worse at 1 NFE; see docs §1)
    network_prediction: str = "auto"
    loss_weighting: str = "uniform"  # "uniform" | "snr" (flow-matching weight 1/a_t^2 on the eps residual)
    snr_weight_max: float = 1000.0  # clip of the snr weight before normalising it to mean 1 over t
    label_dropout: float = 0.0  # student label dropout, for CFG at sampling time


@dataclass
class TimeSamplerConfig:
    """Which timesteps the student trains on (reconstruction §2.8): the learned Time Sampler or a fixed one."""

    # learned (T_theta, the paper's) | uniform | logit-normal | u-shaped | loss-history. Uniform by default since
    # issue #14: on both Fashion-MNIST teachers (3 seeds each) T_theta cost 1-9 % of FD (docs/rayflow.md §5.6)
    time_sampler: str = "uniform"
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


@dataclass
class SamplingConfig:
    """The few-step ray sampler (reconstruction §2.9, §2.10)."""

    spacing: str = "trailing"  # timestep grid of the few-step sampler
    start_noise: str = "standard"  # "standard" N(0, I) | "variance-matched" (scaled by start_std)
    start_std: float = 0.0  # variance-matched scale; 0 = measured on the ray endpoints at distillation


@dataclass
class RayFlowConfig:
    """Every option of RayFlow, by section; ``RayFlowConfig.from_dict(k_timesteps=4, sigma=0.1)`` sets them flat."""

    targets: TargetConfig = field(default_factory=TargetConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    time: TimeSamplerConfig = field(default_factory=TimeSamplerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    @classmethod
    def from_dict(cls, mapping: dict[str, Any] | None = None, **options: Any) -> RayFlowConfig:
        """From flat option names and/or nested sections (``config.json`` of older runs is flat)."""
        return config_from_dict(cls, {**(mapping or {}), **options}, VALUE_ALIASES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(value: str, choices: tuple[str, ...], what: str) -> None:
    require(value in choices, f"rayflow: {what} must be one of {', '.join(choices)}, got {value!r}")


def validate_config(config: RayFlowConfig) -> None:
    """One-line :class:`RayflowError` for every out-of-range option."""
    c, r, ts, s = config.targets, config.ray, config.time, config.sampling
    require(c.k_timesteps >= 1, f"rayflow: k_timesteps (K) must be >= 1, got {c.k_timesteps}")
    require(r.sigma >= 0 and math.isfinite(r.sigma), f"rayflow: sigma must be >= 0, got {r.sigma}")
    require(c.timestep_min >= 0, f"rayflow: timestep_min must be >= 0, got {c.timestep_min}")
    if c.timestep_set not in ("linspace", "random"):
        parse_timestep_list(c.timestep_set)
    _choice(c.x0_source, X0_SOURCES, "x0_source")
    _choice(c.eps_mu_reading, EPS_MU_READINGS, "eps_mu_reading")
    require(c.consistency_weight >= 0 and math.isfinite(c.consistency_weight),
            f"rayflow: consistency_weight must be >= 0, got {c.consistency_weight}")
    if c.eps_mu_reading == "trajectory" or c.consistency_weight > 0:
        require(c.x0_source == "teacher", "rayflow: eps_mu_reading=trajectory and consistency_weight > 0 need "
                f"x0_source=teacher (the teacher's trajectory from eps), got x0_source={c.x0_source}")
    if c.eps_mu_reading == "trajectory":  # "start" and "average" are simply unused when eps_mu := eps
        require(c.instance_target, f"rayflow: eps_mu_reading={c.eps_mu_reading} needs instance_target=true")
    _choice(r.parameterization, PARAMETERIZATIONS, "parameterization")
    _choice(r.loss_weighting, LOSS_WEIGHTINGS, "loss_weighting")
    _choice(ts.time_sampler, TIME_SAMPLERS, "time_sampler")
    _choice(s.start_noise, START_NOISES, "start_noise")
    _choice(s.spacing, SPACINGS, "spacing")
    _choice(r.network_prediction, ("auto", *PREDICTION_TYPES), "network_prediction")
    get_sampler(c.teacher_solver)
    require(c.teacher_steps >= 1, f"rayflow: teacher_steps must be >= 1, got {c.teacher_steps}")
    for name in ("mix_start", "mix_end"):
        v = getattr(c, name)
        require(0 <= v <= 1, f"rayflow: {name} must be in [0, 1], got {v}")
    require(0 <= r.label_dropout < 1, f"rayflow: label_dropout must be in [0, 1), got {r.label_dropout}")
    require(c.pool_size >= 0, f"rayflow: pool_size must be >= 0 (0 = automatic), got {c.pool_size}")
    require(c.cache_shard_size >= 1, f"rayflow: cache_shard_size must be >= 1, got {c.cache_shard_size}")
    require(ts.weight_clip >= 1, f"rayflow: weight_clip must be >= 1, got {ts.weight_clip}")
    require(r.snr_weight_max >= 1, f"rayflow: snr_weight_max must be >= 1, got {r.snr_weight_max}")
    require(ts.ksd_bandwidth > 0, f"rayflow: ksd_bandwidth must be > 0, got {ts.ksd_bandwidth}")
    require(ts.time_sampler_warmup >= 0,
            f"rayflow: time_sampler_warmup must be >= 0, got {ts.time_sampler_warmup}")
    require(0 <= ts.time_sampler_uniform_mix < 1,
            f"rayflow: time_sampler_uniform_mix must be in [0, 1), got {ts.time_sampler_uniform_mix}")
    require(s.start_std >= 0, f"rayflow: start_std must be >= 0 (0 = measure), got {s.start_std}")


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


__all__ = ["EPS_MU_READINGS", "LOSS_WEIGHTINGS", "PARAMETERIZATIONS", "RayConfig", "RayFlowConfig", "SamplingConfig",
           "START_NOISES", "TargetConfig", "TimeSamplerConfig", "VALUE_ALIASES", "X0_SOURCES", "parse_timestep_list",
           "validate_config"]
