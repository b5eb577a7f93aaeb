"""Deprecated name of :mod:`rayflow.timestep_dists` (training-time distributions over ``t``); kept for one release."""

from __future__ import annotations

from rayflow.stein_time_sampler import SteinSampler
from rayflow.timestep_dists import (
    TIME_SAMPLERS,
    TIMESTEP_DISTRIBUTIONS,
    LogitNormalSampler,
    LossHistorySampler,
    TimeSampler,
    TimestepDistribution,
    UniformSampler,
    UShapedSampler,
    build_time_sampler,
    build_timestep_distribution,
    downsample,
    plot_time_distribution,
)

__all__ = ["TIMESTEP_DISTRIBUTIONS", "TIME_SAMPLERS", "LogitNormalSampler", "LossHistorySampler", "SteinSampler",
           "TimeSampler", "TimestepDistribution", "UShapedSampler", "UniformSampler", "build_time_sampler",
           "build_timestep_distribution", "downsample", "plot_time_distribution"]
