"""2-Rectified Flow (Liu, Gong & Liu 2022) and InstaFlow (Liu et al., ICLR 2024).

Time. We use flow time ``tau in [0, 1]`` with ``tau = 1`` noise (rfpp / minRF orientation; RectifiedFlow and
InstaFlow run the other way: their ``X_t = t X1 + (1-t) X0`` is ours with ``t = 1 - tau`` and their velocity
``X1 - X0`` is ``-u``). The student's time input is the timestep ``t = tau T - 1`` (:func:`flow_time_to_timestep`).

Reflow [SECONDARY Eq., matches CODE ``get_rectified_flow_loss_fn``]. Pairs ``(eps, x0_hat)`` with
``x0_hat = ODE_teacher(eps)`` (InstaFlow: SD + 25-step DPM-Solver, CFG 5 [SECONDARY])::

    x_tau = (1 - tau) x0_hat + tau eps,      tau ~ U[1e-3, 1]
    min_theta E || u_theta(x_tau, t) - (eps - x0_hat) ||^2                   (u = dx/dtau = eps - x0)

Sampler [CODE ``pipeline_rf.py``]: Euler with uniform steps from ``tau = 1`` to ``0``, ``x <- x + dtau * u``.

One-step distillation (InstaFlow [VERBATIM model card]: "t fixed at 0", L2, then LPIPS): pairs made by the
2-RF student itself (its ``distill_pair_steps``-step Euler solve), and the loss at ``tau = 1`` only::

    min_theta E || (eps - u_theta(eps, T-1)) - x0_2RF(eps) ||^2          (one Euler step lands on x0_2RF)

Initialisation from an epsilon teacher (our addition, so a flow student starts at the teacher's solution).
``x_tau = (1 - tau) x0 + tau eps`` divided by ``r = sqrt((1 - tau)^2 + tau^2)`` is a VP point with
``a = (1 - tau) / r``, ``s = tau / r`` and the same ``(x0, eps)``; feed it to the epsilon network at the timestep
with that ``alpha_bar = a^2`` (:meth:`VPSchedule.timestep_from_alpha_bar`), convert its output to ``(x0_hat,
eps_hat)`` and return ``u = eps_hat - x0_hat`` (= ``(x_tau - x0_hat) / tau``, the form used for ``tau >= 1/2``,
which stays defined at ``tau = 1`` where the teacher is evaluated at its noisiest timestep ``T-1``). This is exact
wherever ``alpha_bar`` lies inside the schedule's table, and with it a flow Euler step is exactly a DDIM step on
the matching VP grid (``parameterization="epsilon"``; ``eps`` is its old name). By default (``"flow"``) the
network predicts ``u`` directly, initialised from the teacher's weights as InstaFlow turns SD's epsilon UNet into
a velocity model: measured on ``digits`` (docs/proreflow.md) the epsilon view is badly conditioned at few steps -
at ``tau = 1`` it divides the teacher's epsilon error by ``a_{T-1}`` (0.0064 on DDPM's linear schedule) - and
loses at 1-2 NFE.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rayflow import pairs as P
from rayflow.errors import require
from rayflow.losses import regression_loss
from rayflow.methods import register
from rayflow.methods.base import CountingDenoiser, DistillContext, DistillResult, Method
from rayflow.methods.kit import PairSpec, make_pairs
from rayflow.models.base import Condition, Denoiser
from rayflow.schedulers import FlowEulerScheduler, flow_timesteps, schedule_fields, velocity_from_vp, vp_point
from rayflow.schedules import VPSchedule, expand_like
from rayflow.training import LossOutput

PARAMETERIZATIONS = ("flow", "epsilon")


# ---------------------------------------------------------------------- the flow view of a VP network
def flow_velocity(net: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: Condition, schedule: VPSchedule,
                  prediction_type: str) -> torch.Tensor:
    """``u(x_tau, t)`` of a network: its own output for a ``"flow"`` network, else the VP conversion (module doc)."""
    if prediction_type == "flow":
        return net(x, t.to(device=x.device, dtype=torch.float32), cond)
    # on t's device (a host copy of device timesteps would stall a training step on the GPU)
    tau = (torch.as_tensor(t, dtype=torch.float64) + 1.0) / schedule.num_train_timesteps
    r, t_vp, _, _ = vp_point(tau, schedule)
    pred = net(x / expand_like(r, x), t_vp.to(device=x.device, dtype=torch.float32), cond)
    return velocity_from_vp(pred, prediction_type, x, tau, schedule)


class FlowStudent(Denoiser):
    """A network seen as a rectified-flow velocity model: ``model(x_tau, t) -> u`` with ``t = tau T - 1``.

    Inputs live on the *flow* scale (``x_tau = (1-tau) x0 + tau eps``), so use it with :func:`euler_flow`, not with
    the VP samplers.
    """

    prediction_type = "flow"

    def __init__(self, net: Denoiser, schedule: VPSchedule) -> None:
        super().__init__()
        self.net, self.schedule = net, schedule
        self.num_classes = net.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition = None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        return flow_velocity(self.net, x, t, cond, self.schedule, self.net.prediction_type)

    def null_condition(self, batch_size: int, device: torch.device) -> Condition:
        return self.net.null_condition(batch_size, device)


# ---------------------------------------------------------------------- sampler
@torch.no_grad()
def euler_flow(model: Denoiser, noise: torch.Tensor, timesteps: torch.Tensor, num_train_timesteps: int,
               cond: Condition = None) -> torch.Tensor:
    """Euler on ``dx/dtau = u``: ``x <- x + (tau' - tau) u(x, t)`` along a grid of timesteps ``t = tau T - 1``."""
    x = noise
    T = num_train_timesteps
    for i in range(timesteps.numel() - 1):
        t, tn = timesteps[i], timesteps[i + 1]
        u = model(x, torch.full((x.shape[0],), float(t), device=x.device), cond)
        x = x + ((tn - t) / T).item() * u.to(x.dtype)
    return x


# ---------------------------------------------------------------------- objectives
class ReflowObjective:
    """``|| u_theta(x_tau) - (eps - x0_hat) ||`` on the straight interpolation of the pairs (module doc)."""

    capturable = True  # device draws and maths only: the trainer may capture the whole step (TrainConfig.step_graph)

    def __init__(self, pool: P.Pairs, schedule: VPSchedule, batch_size: int, prediction_type: str,
                 loss: str = "mse", huber_c: float = 1e-3, tau_min: float = 1e-3) -> None:
        self.pool, self.schedule, self.batch_size = pool, schedule, batch_size
        self.prediction_type, self.loss, self.huber_c, self.tau_min = prediction_type, loss, huber_c, tau_min

    def __call__(self, model: Denoiser, step: int, generator: torch.Generator) -> LossOutput:
        dev = generator.device
        b = self.pool.batch(self.batch_size, generator)
        eps, x0 = b["noise"], b["sample"]
        tau = self.tau_min + (1 - self.tau_min) * torch.rand(self.batch_size, generator=generator, device=dev)
        x = (1 - expand_like(tau, x0)) * x0 + expand_like(tau, x0) * eps
        t = tau.double() * self.schedule.num_train_timesteps - 1  # stays on the device
        u = flow_velocity(model, x, t, b.get("labels"), self.schedule, self.prediction_type).float()
        return LossOutput(regression_loss(u, eps - x0, self.loss, self.huber_c).mean())


class OneStepObjective:
    """InstaFlow's distillation at ``tau = 1``: ``|| (eps - u_theta(eps, T-1)) - x0_2RF ||^2``."""

    def __init__(self, pool: P.Pairs, schedule: VPSchedule, batch_size: int, prediction_type: str) -> None:
        self.pool, self.schedule, self.batch_size, self.prediction_type = pool, schedule, batch_size, prediction_type

    def __call__(self, model: Denoiser, step: int, generator: torch.Generator) -> LossOutput:
        b = self.pool.batch(self.batch_size, generator)
        eps, target = b["noise"], b["sample"]
        t = torch.full((self.batch_size,), float(self.schedule.num_train_timesteps - 1), dtype=torch.float64)
        u = flow_velocity(model, eps, t, b.get("labels"), self.schedule, self.prediction_type).float()
        return LossOutput(regression_loss(eps - u, target, "mse").mean())


# ---------------------------------------------------------------------- the method
@dataclass
class ReflowConfig:
    pair_solver: str = "dpm++2m"  # InstaFlow: DPM-Solver [SECONDARY]
    pair_steps: int = 25  # InstaFlow / Rectified Diffusion: 25 steps
    pair_spacing: str = "trailing"
    pool_size: int = 16384  # pool size (InstaFlow: 1.6M on SD)
    # flow: the network predicts u | epsilon: the VP view of an epsilon net (exact init)
    parameterization: str = "flow"
    loss: str = "mse"  # mse | huber
    huber_c: float = 1e-3
    tau_min: float = 1e-3  # RectifiedFlow's eps = 1e-3
    label_dropout: float = 0.1
    one_step_distill: bool = False  # InstaFlow: a second stage distilling the 2-RF into one step
    distill_fraction: float = 0.5  # share of --max-steps given to the one-step stage
    distill_pair_steps: int = 8  # Euler steps of the 2-RF student that make the one-step targets
    distill_num_pairs: int = 16384


@register
class Reflow(Method):
    """2-Rectified Flow / InstaFlow: straight interpolation of teacher pairs, velocity target, Euler sampler."""

    name = "reflow"
    display_name = "2-Rectified Flow"
    tiny_options = {"pool_size": "64", "distill_num_pairs": "64"}
    config_class = ReflowConfig
    nfes = (1, 2, 4, 8)
    value_aliases = {"parameterization": {"eps": "epsilon"}}

    def validate(self) -> None:
        c = self.config
        require(c.pair_solver in P.PAIR_SOLVERS, f"reflow: unknown pair_solver {c.pair_solver!r}")
        require(c.pair_steps >= 1, f"reflow: pair_steps must be >= 1, got {c.pair_steps}")
        require(c.pool_size >= 1 and c.distill_num_pairs >= 1, "reflow: pool_size and distill_num_pairs must be >= 1")
        require(c.parameterization in PARAMETERIZATIONS,
                f"reflow: parameterization must be one of {', '.join(PARAMETERIZATIONS)}, got {c.parameterization!r}")
        require(c.loss in ("mse", "huber"), f"reflow: loss must be mse or huber, got {c.loss!r}")
        require(0 <= c.tau_min < 1, f"reflow: tau_min must be in [0, 1), got {c.tau_min}")
        require(0 < c.distill_fraction < 1, f"reflow: distill_fraction must be in (0, 1), got {c.distill_fraction}")
        require(c.distill_pair_steps >= 1, f"reflow: distill_pair_steps must be >= 1, got {c.distill_pair_steps}")
        require(0 <= c.label_dropout < 1, f"reflow: label_dropout must be in [0, 1), got {c.label_dropout}")
        if c.one_step_distill:
            self.nfes = (1,)

    def _student_config(self, ctx: DistillContext):
        """The network config the student is saved with: a ``flow`` head, or the teacher's epsilon head."""
        cfg = dataclasses.replace(ctx.student_config)
        if self.config.parameterization == "flow":
            cfg.prediction_type = "flow"
        else:
            require(cfg.prediction_type != "flow", "reflow: parameterization=epsilon needs an epsilon-type network")
        return cfg

    def _train(self, ctx: DistillContext, cfg, objective, steps: int, out_dir, init: Denoiser | None,
               **extra) -> Denoiser:
        return ctx.train_stage(self, ctx.build_student(cfg, init), objective, steps, out_dir,
                               {"model": cfg.to_dict(), **extra})

    def pair_spec(self) -> PairSpec:
        """The teacher pairs 2-RF trains on: ``pool_size`` ODE solves from fresh noise."""
        c = self.config
        return PairSpec("reflow-pairs", c.pool_size, seed=11, desc="reflow: teacher pairs", solver=c.pair_solver,
                        steps=c.pair_steps, spacing=c.pair_spacing, label_dropout=c.label_dropout)

    def distill(self, ctx: DistillContext) -> DistillResult:
        cfg = self._student_config(ctx)
        c = self.config
        pool = make_pairs(ctx, self.pair_spec())
        total = ctx.train.max_steps
        reflow_steps = total - int(round(total * c.distill_fraction)) if c.one_step_distill else total
        obj = ReflowObjective(pool, ctx.schedule, ctx.train.batch_size, cfg.prediction_type, c.loss, c.huber_c,
                              c.tau_min)
        reflow_dir = ctx.out_dir / "stages" / "2-rectified-flow" if c.one_step_distill else ctx.out_dir
        net = self._train(ctx, cfg, obj, reflow_steps, reflow_dir, None, stage="2-rectified-flow")
        logs = {"pair_nfe": pool.nfe, "num_pairs": len(pool)}
        if c.one_step_distill:
            rf = FlowStudent(net, ctx.schedule)
            counter = CountingDenoiser(rf)
            grid = flow_timesteps(c.distill_pair_steps, ctx.schedule.num_train_timesteps)
            d_pool = make_pairs(ctx, PairSpec(
                "reflow-distill-pairs", c.distill_num_pairs, seed=13, desc="reflow: one-step pairs (2-RF student)",
                label_dropout=c.label_dropout, meta=P.student_meta(net, solver="euler", steps=c.distill_pair_steps),
                solve=lambda noise, cond: euler_flow(counter, noise, grid, ctx.schedule.num_train_timesteps, cond),
                counter=counter))
            obj = OneStepObjective(d_pool, ctx.schedule, ctx.train.batch_size, cfg.prediction_type)
            net = self._train(ctx, cfg, obj, total - reflow_steps, ctx.out_dir, net, stage="one-step")
            logs.update(student_pair_nfe=d_pool.nfe, distill_num_pairs=len(d_pool))
        logs["teacher_nfe_this_run"] = ctx.teacher.evaluations
        return DistillResult(self.wrap_student(net, ctx.schedule), ctx.teacher_nfe, logs, method=self)

    def wrap_student(self, network: Denoiser, schedule: VPSchedule) -> Denoiser:
        return network if isinstance(network, FlowStudent) else FlowStudent(network, schedule)

    def raw_network(self, student: Denoiser) -> Denoiser:
        return student.net if isinstance(student, FlowStudent) else student

    def make_scheduler(self, schedule: VPSchedule, network: Denoiser | None = None) -> FlowEulerScheduler:
        ptype = "flow" if self.config.parameterization == "flow" else getattr(network, "prediction_type", "epsilon")
        return FlowEulerScheduler(**schedule_fields(schedule), prediction_type=ptype)



__all__ = ["FlowStudent", "OneStepObjective", "Reflow", "ReflowConfig", "ReflowObjective", "euler_flow",
           "flow_timesteps", "flow_velocity", "vp_point"]
