"""RayFlow's Time Sampler (reconstruction §2.8) built from its config section, and the log of what it learned.

The distributions themselves (the learned ``T_theta`` and the fixed ones it is compared with) live in
:mod:`rayflow.time_samplers`, shared with every method that draws training timesteps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rayflow.methods.rayflow.config import TimeSamplerConfig
from rayflow.timestep_dists import TimestepDistribution as TimeSampler
from rayflow.timestep_dists import build_timestep_distribution as build_time_sampler
from rayflow.timestep_dists import plot_time_distribution

NUM_FEATURES = 4  # instance features of the conditioned Time Sampler (see targets.instance_features)


def make_time_sampler(cfg: TimeSamplerConfig, num_timesteps: int) -> TimeSampler:
    """The configured distribution over training timesteps (conditioned on instance features if asked)."""
    features = NUM_FEATURES if (cfg.time_sampler == "learned" and cfg.time_sampler_features) else 0
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
    return build_time_sampler(cfg.time_sampler, num_timesteps, num_features=features,
                              weight_clip=cfg.weight_clip, **opts)


def write_time_sampler_log(kind: str, snapshots: list[dict[str, Any]], out_dir: Path, num_timesteps: int) -> None:
    """``time_sampler.json`` (the density every few steps) and its plot ``time_sampler.png``."""
    from rayflow.checkpoint import write_json_atomic

    out_dir = Path(out_dir)
    write_json_atomic({"sampler": kind, "num_timesteps": num_timesteps, "bins": 100, "snapshots": snapshots},
                      out_dir / "time_sampler.json")
    if snapshots:
        plot_time_distribution(snapshots, out_dir / "time_sampler.png", num_timesteps,
                               title=f"RayFlow Time Sampler ({kind})")


__all__ = ["NUM_FEATURES", "make_time_sampler", "write_time_sampler_log"]
