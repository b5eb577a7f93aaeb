"""The RayFlow method: build the student, the instance pools and the Time Sampler, train (Algorithm 1 in
:mod:`.objective`), and sample along the ray (:func:`.ray.ray_sample`)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from rayflow.errors import require
from rayflow.methods import register
from rayflow.methods.base import DistillContext, DistillResult, Method, check_resolved
from rayflow.methods.rayflow.config import VALUE_ALIASES, RayFlowConfig, validate_config
from rayflow.methods.rayflow.objective import RayFlowObjective
from rayflow.methods.rayflow.ray import RayStudent, ray_sample
from rayflow.methods.rayflow.targets import (
    InstanceSource,
    build_pool,
    needed_sources,
    pool_meta,
    pool_size,
    teacher_nfe_per_instance,
)
from rayflow.methods.rayflow.time_sampler import make_time_sampler, write_time_sampler_log
from rayflow.models import Condition, Denoiser, ModelConfig, as_epsilon
from rayflow.schedulers import RayFlowScheduler, run_scheduler, schedule_fields
from rayflow.schedules import VPSchedule
from rayflow.timestep_dists import TimestepDistribution as TimeSampler


def epsilon_teacher(teacher: Denoiser, schedule: VPSchedule) -> Denoiser:
    """The teacher as an epsilon-predictor: converted when it predicts x0, v or flow; refused otherwise."""
    return as_epsilon(teacher, schedule)


@register
class RayFlow(Method):
    """RayFlow (CVPR 2025): each instance gets its own straight ray from data to a teacher-averaged noise
    eps_mu; the student learns it in a few steps; the paper's learned Time Sampler picks the training timesteps
    with ``time_sampler=learned`` (uniform t by default: docs/rayflow.md §5.6 measured it ahead)."""

    name = "rayflow"
    display_name = "RayFlow"
    tiny_options = {"pool_size": "64", "teacher_steps": "2"}
    benchmark_variants = {
        "rayflow": {},
        # the paper's learned Time Sampler T_theta (the default until issue #14 measured uniform t ahead)
        "rayflow-learned-time-sampler": {"time_sampler": "learned"},
        "rayflow-no-instance-target": {"instance_target": "false"},
        # the teacher's epsilon head kept (the exact init, RayFlow's default until the flow head): the head ablation
        "rayflow-epsilon-head": {"network_prediction": "epsilon"},
        # start noise scaled to the RMS of the rays' noise ends (eps_mu), measured at distillation: an option
        "rayflow-matched-start": {"start_noise": "variance-matched"},
    }
    config_class = RayFlowConfig
    nfes = (1, 2, 4, 8)
    value_aliases = VALUE_ALIASES

    def validate(self) -> None:
        validate_config(self.config)

    # -------------------------------------------------------------- student construction
    def student_config(self, ctx: DistillContext) -> ModelConfig:
        """The network the student uses: the teacher's architecture, whose raw output at the VP-matched point is
        ``network_prediction``; ``auto`` is the form's own output, ``epsilon`` for the epsilon form and ``flow``
        (``= eps_mu - x0``) for the flow form.

        A teacher-initialised student whose output type differs from the teacher's keeps the teacher's weights
        and reinterprets its head, as InstaFlow turns SD's epsilon UNet into a velocity model [OURS, measured:
        docs/rayflow.md §1]. Asking for the teacher's own type instead keeps the exact init (the student starts
        as the teacher), at the price of dividing its epsilon error by ``a_t`` near the noise end.
        """
        cfg = dataclasses.replace(ctx.student_config)
        cfg.prediction_type = self.network_prediction()
        return cfg

    def build_network(self, ctx: DistillContext) -> Denoiser:
        return ctx.build_student(self.student_config(ctx))

    def wrap_student(self, network: Denoiser, schedule: VPSchedule) -> Denoiser:
        if str(getattr(network, "prediction_type", "")).startswith("ray-"):  # already predicts along the ray
            # in whichever form it declares (its ``parameterization``): the ray sampler reads that, not the config's
            return network
        return RayStudent(network, schedule, self.config.ray.parameterization)

    # -------------------------------------------------------------- eps_mu pools (the cache; see .targets)
    def teacher_nfe_per_instance(self, source: str, teacher: Denoiser, guidance: float) -> int:
        return teacher_nfe_per_instance(self.config.targets, source, teacher, guidance)

    def cache_meta(self, ctx: DistillContext, teacher: Denoiser, source: str) -> dict[str, Any]:
        return pool_meta(self.config.targets, ctx, teacher, source)

    def pool_size(self, ctx: DistillContext) -> int:
        return pool_size(self.config.targets, ctx)

    def build_pool(self, ctx: DistillContext, teacher: Denoiser, source: str, root: Path | None,
                   progress: bool = False) -> dict[str, torch.Tensor]:
        return build_pool(self.config.targets, ctx, teacher, source, root, progress)

    def needed_sources(self) -> list[str]:
        return needed_sources(self.config.targets)

    # -------------------------------------------------------------- start noise
    @torch.no_grad()
    def measure_start_std(self, source: InstanceSource, schedule: VPSchedule, n: int = 2048) -> float:
        """RMS of the ray endpoint ``x_T = a_T x0 + (1 - a_T) eps_mu + sigma s_T z`` over ``n`` instances."""
        g = torch.Generator(device=source.ctx.device).manual_seed(self.config.targets.cache_seed + 4242)
        x0, _, eps_mu = source.draw(n, 0, g)
        T = schedule.num_train_timesteps - 1
        a, s = float(schedule.a(T)), float(schedule.s(T))
        x_T = a * x0 + (1 - a) * eps_mu
        var = float(x_T.double().square().mean()) + (self.config.ray.sigma * s) ** 2
        return float(f"{math.sqrt(var):.6g}")  # rounded: the value is part of the run's config

    def resolve(self, ctx: DistillContext) -> RayFlowConfig:
        """``network_prediction=auto`` written out (the form's own output); ``start_std`` of variance-matched start
        noise is measured later, on the instance pools (:meth:`with_start_std`)."""
        ray = dataclasses.replace(self.config.ray, network_prediction=self.network_prediction())
        return dataclasses.replace(self.config, ray=ray)

    def unresolved(self) -> list[str]:
        # network_prediction=auto depends on the config alone (older students record it so): not run-dependent
        left = [name for name in super().unresolved() if name != "network_prediction"]
        s = self.config.sampling
        measured = s.start_noise != "variance-matched" or s.start_std > 0
        return left + ([] if measured else ["start_std"])

    def with_start_std(self, source: InstanceSource, schedule: VPSchedule) -> RayFlow:
        """This method, or (variance-matched start noise still to be measured) a new one whose config records the
        start noise scale measured on ``source``'s rays: the resolution that needs the instance pools."""
        s = self.config.sampling
        if s.start_noise != "variance-matched" or s.start_std > 0:
            return self
        sampling = dataclasses.replace(s, start_std=self.measure_start_std(source, schedule))
        return RayFlow(dataclasses.replace(self.config, sampling=sampling))

    # -------------------------------------------------------------- distillation
    def distill(self, ctx: DistillContext) -> DistillResult:
        cfg, schedule = self.config, ctx.schedule
        require(float(schedule.a(schedule.num_train_timesteps - 1)) > 0,
                "rayflow: the schedule's last a_T is 0; the ray inversion divides by a_T")
        teacher = epsilon_teacher(ctx.teacher, schedule)
        before = int(getattr(ctx.teacher, "evaluations", 0))
        network = self.build_network(ctx)
        student_cfg = self.student_config(ctx)

        pools = None
        require(not (cfg.targets.online and ctx.cache_dir is not None),
                "rayflow: online=true computes eps_mu per batch and caches nothing; drop --cache or online=true")
        if not cfg.targets.online:
            pools = {}
            for src in self.needed_sources():
                root = None if ctx.cache_dir is None else ctx.cache_path("eps_mu") / src
                # what the pool costs, whether built now or reused from an earlier run
                with ctx.pool_cost(self.pool_size(ctx) * self.teacher_nfe_per_instance(src, teacher, ctx.guidance)):
                    pools[src] = self.build_pool(ctx, teacher, src, root, progress=ctx.progress)
        source = InstanceSource(cfg.targets, ctx, teacher, pools)
        method = self.with_start_std(source, schedule)  # counted live, as online eps_mu and teacher x0 are

        sampler = method.build_time_sampler(schedule.num_train_timesteps)
        steps = max(1, int(ctx.train.max_steps))
        objective = RayFlowObjective(source, schedule, method.config, sampler, ctx.train.batch_size,
                                     network.num_classes, snapshot_every=max(1, steps // 20))
        trained = ctx.train_stage(method, network, objective, ctx.train.max_steps, ctx.out_dir,
                                  {"model": student_cfg.to_dict(), "sampler": method.sampler_info()})
        if ctx.is_main:
            write_time_sampler_log(cfg.time.time_sampler, objective.snapshots, ctx.out_dir,
                                   schedule.num_train_timesteps)
        end = int(getattr(ctx.teacher, "evaluations", 0))
        logs = {"teacher_evaluations_this_run": end - before, "start_std": method.config.sampling.start_std,
                "time_sampler_snapshots": len(objective.snapshots)}
        return DistillResult(method.wrap_student(trained, schedule), teacher_nfe=ctx.teacher_nfe, logs=logs,
                             method=method)

    def build_time_sampler(self, num_timesteps: int) -> TimeSampler:
        return make_time_sampler(self.config.time, num_timesteps)

    def sampler_info(self) -> dict[str, Any]:
        """What ``config.json`` says about sampling this student (it needs the ray sampler, not DDIM)."""
        s = self.config.sampling
        return {"name": "rayflow-ray", "parameterization": self.config.ray.parameterization, "spacing": s.spacing,
                "start_noise": s.start_noise, "start_std": s.start_std, "steps": 4}

    # -------------------------------------------------------------- sampling
    def start_scale(self) -> float:
        s = self.config.sampling
        return 1.0 if s.start_noise == "standard" else s.start_std

    def network_prediction(self, network: Denoiser | None = None) -> str:
        """What the raw network outputs at the VP-matched point (the config's, else ``auto``'s choice)."""
        if network is not None and not str(network.prediction_type).startswith("ray-"):
            return str(network.prediction_type)
        wanted = self.config.ray.network_prediction
        if wanted == "auto":
            wanted = "epsilon" if self.config.ray.parameterization == "epsilon" else "flow"
        return wanted

    def raw_network(self, student: Denoiser) -> Denoiser:
        return student.network if isinstance(student, RayStudent) else student

    def make_scheduler(self, schedule: VPSchedule, network: Denoiser | None = None) -> RayFlowScheduler:
        s = self.config.sampling
        return RayFlowScheduler(**schedule_fields(schedule), prediction_type=self.network_prediction(network),
                                timestep_spacing=s.spacing, start_std=self.start_scale())

    def sample(self, student: Denoiser, noise: torch.Tensor, schedule: VPSchedule, steps: int,
               cond: Condition = None, guidance: float = 1.0, timesteps: torch.Tensor | None = None
               ) -> torch.Tensor:
        require(timesteps is not None or int(steps) >= 1, f"rayflow: steps must be >= 1, got {steps}")
        check_resolved(self)
        network = self.raw_network(student)
        if str(network.prediction_type).startswith("ray-"):  # a model that predicts along the ray itself
            student = self.wrap_student(network, schedule)
            return ray_sample(student, noise, schedule, steps, cond, guidance, timesteps,
                              self.config.sampling.spacing, self.start_scale())
        scheduler = self.make_scheduler(schedule, network)
        return run_scheduler(network, scheduler, noise, int(steps or 0), cond, guidance, grid=timesteps)


__all__ = ["RayFlow", "epsilon_teacher"]
