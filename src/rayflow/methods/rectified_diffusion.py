"""Rectified Diffusion (Wang et al., ICLR 2025; ``G-U-N/Rectified-Diffusion``) and its phased variant.

Thesis [VERBATIM]: the essence of rectification is "retraining with pre-computed noise-sample pair[s]"; neither
the flow-matching form nor v-prediction is needed - the target is a *first-order* ODE path, curved for a VP
schedule. With the diffusion form ``x_t = a_t x0 + s_t eps`` (our ``a = sqrt(alpha_bar)``, ``s = sqrt(1 -
alpha_bar)``, ``sigma = s / a`` the noise-to-signal ratio):

First-order ODE (Eq. 2) [VERBATIM]::

    x_t = (a_t / a_r) x_r + a_t eps_theta(x_r, r) (sigma_t - sigma_r)

which is the exact solution (Eq. 1) for every ``r, t`` iff ``eps_theta`` is constant along the trajectory
(Theorem 1). Hence (Eq. 3) the training sample is the forward process applied to a *paired* ``(eps, x0_hat)``.

Rectified Diffusion (Algorithm 4 [VERBATIM] + ``train.py`` [CODE])::

    (eps, x0_hat = ODE_teacher(eps))            global pairs (SD: 25-step DPM-Solver, CFG 5)
    t ~ U{0..T-1},  x_t = a_t x0_hat + s_t eps
    x0_theta = (x_t - s_t eps_theta(x_t, t)) / a_t
    L = mean_d ( sqrt((x0_theta - x0_hat)^2 + c^2) - c ),   c = 0.001        (pseudo-Huber on x0 [CODE])

Sampler: DDIM, ``timestep_spacing="trailing"`` [CODE]. The student's schedule is a free choice - the pairs are
fixed, so any ``(a_t, s_t)`` defines a valid first-order path (the thesis), and the released non-phased script
indeed trains and samples with *linear* betas although SD uses scaled-linear [CODE]. ``student_schedule`` picks it:
the default (``auto``) is Stable Diffusion's ``scaled_linear`` (the paper's setting) whatever the teacher's, as an
epsilon-student's one-step ``x0 = (x - s eps) / a`` divides by ``a_{T-1}``: 0.068 there, 0.0064 on DDPM's linear
schedule, where it blows up (measured in docs/proreflow.md). ``teacher`` keeps the teacher's schedule. The phased
variant always keeps the teacher's schedule (its pairs are points of the teacher's VP path).

Phased (Rectified Diffusion-Phased, §2.3 [VERBATIM] + ``train_phased.py`` [CODE]). ``M`` phases with the window
boundaries of :func:`rayflow.pairs.window_boundaries` (M = 4: 999/749/499/249 [CODE]). Real ``x0`` noised to the
phase start ``t_s``, the teacher solved to the phase end ``t_e`` (10 DDIM steps [CODE]); then::

    eps_imp = (x_e / a_e - x_s / a_s) / (sigma_e - sigma_s)               implied noise (Eq. 4) = dz / dNSR
    x_t = (a_t / a_s) x_s + a_t eps_imp (sigma_t - sigma_s),   t ~ U{t_e+1..t_s}   (on the first-order path)
    x_e_theta = (a_e / a_t) x_t + a_e eps_theta(x_t, t) (sigma_e - sigma_t)         (Eq. 2 to the phase end)
    L = pseudo-Huber(x_e_theta, x_e)

and the sampler is DDIM with the steps spread over the phases like PeRFlow's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rayflow import pairs as P
from rayflow.devices import DeviceCache
from rayflow.errors import require
from rayflow.losses import regression_loss
from rayflow.methods import register
from rayflow.methods.base import DistillContext, DistillResult, Method
from rayflow.methods.kit import PairSpec, make_pairs
from rayflow.models.base import Denoiser
from rayflow.samplers import make_timesteps
from rayflow.schedulers import GridDDIMScheduler, schedule_fields
from rayflow.schedules import VPSchedule, expand_like
from rayflow.training import LossOutput
from rayflow.windows import piecewise_timesteps


# ---------------------------------------------------------------------- the first-order path
def first_order_step(x_r: torch.Tensor, eps: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                     schedule: VPSchedule) -> torch.Tensor:
    """Eq. 2: ``x_t = (a_t / a_r) x_r + a_t eps (sigma_t - sigma_r)`` (one DDIM step from ``r`` to ``t``)."""
    a_r, a_t = schedule.a(r), schedule.a(t)
    sig_r, sig_t = schedule.s(r) / a_r, schedule.s(t) / a_t
    return expand_like(a_t / a_r, x_r) * x_r + expand_like(a_t * (sig_t - sig_r), x_r) * eps


def implied_noise(x_s: torch.Tensor, x_e: torch.Tensor, t_s: torch.Tensor, t_e: torch.Tensor,
                  schedule: VPSchedule) -> torch.Tensor:
    """Eq. 4: the constant epsilon of the first-order path through ``(x_s, t_s)`` and ``(x_e, t_e)``."""
    a_s, a_e = schedule.a(t_s), schedule.a(t_e)
    sig_s, sig_e = schedule.s(t_s) / a_s, schedule.s(t_e) / a_e
    return (x_e / expand_like(a_e, x_e) - x_s / expand_like(a_s, x_s)) / expand_like(sig_e - sig_s, x_e)


# ---------------------------------------------------------------------- objectives
class RectifiedDiffusionObjective:
    """Algorithm 4 with the released loss: pseudo-Huber on ``x0`` (``loss_on="x0"``) or MSE on eps (``"eps"``)."""

    capturable = True  # device draws and maths only: the trainer may capture the whole step (TrainConfig.step_graph)

    def __init__(self, pool: P.Pairs, schedule: VPSchedule, batch_size: int, loss: str = "huber",
                 huber_c: float = 1e-3, loss_on: str = "x0") -> None:
        self.pool, self.schedule, self.batch_size = pool, schedule, batch_size
        self.loss, self.huber_c, self.loss_on = loss, huber_c, loss_on

    def __call__(self, model: Denoiser, step: int, generator: torch.Generator) -> LossOutput:
        dev = generator.device
        b = self.pool.batch(self.batch_size, generator)
        eps, x0 = b["noise"], b["sample"]
        t = torch.randint(0, self.schedule.num_train_timesteps, (self.batch_size,), generator=generator,
                          device=dev)  # the schedule is read on the device: no host round trip
        a, s = expand_like(self.schedule.a(t), x0), expand_like(self.schedule.s(t), x0)
        x_t = a * x0 + s * eps
        eps_hat = model(x_t, t.to(dev, torch.float32), b.get("labels")).float()
        if self.loss_on == "eps":
            return LossOutput(regression_loss(eps_hat, eps, self.loss, self.huber_c).mean())
        x0_hat = (x_t - s * eps_hat) / a
        return LossOutput(regression_loss(x0_hat, x0, self.loss, self.huber_c).mean())


class PhasedObjective:
    """Rectified Diffusion-Phased: the student's Eq.-2 jump to the phase end against the teacher's phase end."""

    capturable = True  # device draws and maths only: the trainer may capture the whole step (TrainConfig.step_graph)

    def __init__(self, pool: P.Pairs, boundaries: torch.Tensor, schedule: VPSchedule, batch_size: int,
                 loss: str = "huber", huber_c: float = 1e-3) -> None:
        self.pool, self.boundaries, self.schedule, self.batch_size = pool, boundaries, schedule, batch_size
        self.loss, self.huber_c = loss, huber_c
        self._bounds: DeviceCache[torch.Tensor] = DeviceCache()  # copied once: the phase maths stays on the device

    def __call__(self, model: Denoiser, step: int, generator: torch.Generator) -> LossOutput:
        dev = generator.device
        b = self.pool.batch(self.batch_size, generator)
        k = b["window"].to(dev)
        bounds = self._bounds.get(dev, self.boundaries.to)
        t_s, t_e = bounds[k], bounds[k + 1]
        u = torch.rand(self.batch_size, generator=generator, device=dev).double()
        t = t_e + 1 + torch.floor(u * (t_s - t_e))
        x_s, x_e = b["z_start"], b["z_end"]
        x_t = first_order_step(x_s, implied_noise(x_s, x_e, t_s, t_e, self.schedule), t_s, t, self.schedule)
        eps_hat = model(x_t, t.to(dev, torch.float32), b.get("labels")).float()
        x_e_hat = first_order_step(x_t, eps_hat, t, t_e, self.schedule)
        return LossOutput(regression_loss(x_e_hat, x_e, self.loss, self.huber_c).mean())


# ---------------------------------------------------------------------- the method
@dataclass
class RectifiedDiffusionConfig:
    phased: bool = False
    phases: int = 4  # M [CODE: 4 phases of 250 timesteps]
    pair_solver: str = "dpm++2m"  # global pairs [CODE: DPMSolverMultistepScheduler, 25 steps]
    pair_steps: int = 25
    pair_spacing: str = "trailing"
    phase_solver: str = "ddim"  # phased: the teacher solve per phase [CODE: DDIM, 10 steps]
    phase_steps: int = 10
    pool_size: int = 16384
    loss: str = "huber"  # huber [CODE] | mse
    huber_c: float = 1e-3  # [CODE: 0.001, elementwise]
    loss_on: str = "x0"  # x0 [CODE] | eps [Algorithm 4]; non-phased only
    student_schedule: str = "auto"  # auto | teacher | linear | scaled_linear | cosine (see the module doc)
    label_dropout: float = 0.1


@register
class RectifiedDiffusion(Method):
    """Rectified Diffusion: paired (eps, x0_hat) on the first-order VP path, eps-prediction, pseudo-Huber on x0."""

    name = "rectified-diffusion"
    display_name = "Rectified Diffusion"
    config_class = RectifiedDiffusionConfig
    nfes = (1, 2, 4, 8)

    def validate(self) -> None:
        c = self.config
        require(c.phases >= 1, f"rectified-diffusion: phases must be >= 1, got {c.phases}")
        require(c.pair_solver in P.PAIR_SOLVERS and c.phase_solver in P.PAIR_SOLVERS,
                f"rectified-diffusion: solvers must be among {', '.join(P.PAIR_SOLVERS)}")
        require(c.pair_steps >= 1 and c.phase_steps >= 1, "rectified-diffusion: solver steps must be >= 1")
        require(c.pool_size >= 1, f"rectified-diffusion: pool_size must be >= 1, got {c.pool_size}")
        require(c.loss in ("mse", "huber"), f"rectified-diffusion: loss must be mse or huber, got {c.loss!r}")
        require(c.huber_c > 0, f"rectified-diffusion: huber_c must be > 0, got {c.huber_c}")
        require(c.loss_on in ("x0", "eps"), f"rectified-diffusion: loss_on must be x0 or eps, got {c.loss_on!r}")
        require(c.student_schedule in ("auto", "teacher", "linear", "scaled_linear", "cosine"),
                f"rectified-diffusion: unknown student_schedule {c.student_schedule!r}")
        require(not (c.phased and c.student_schedule not in ("auto", "teacher")),
                "rectified-diffusion: the phased variant keeps the teacher's schedule (student_schedule=teacher)")
        require(0 <= c.label_dropout < 1,
                f"rectified-diffusion: label_dropout must be in [0, 1), got {c.label_dropout}")
        if c.phased:
            self.nfes = tuple(n for n in (c.phases, 2 * c.phases) if n <= 8) or (c.phases,)

    def resolve(self, ctx: DistillContext | None = None) -> RectifiedDiffusionConfig:
        """``student_schedule=auto``: ``scaled_linear`` (measured, module doc), or the teacher's for the phased
        variant, whose pairs are points of the teacher's own VP path. Needs nothing from the run."""
        if self.config.student_schedule != "auto":
            return self.config
        return dataclasses.replace(self.config, student_schedule="teacher" if self.config.phased else "scaled_linear")

    def unresolved(self) -> list[str]:
        # student_schedule=auto depends on the config alone (phased or not), so it is read where it is used too
        return [name for name in super().unresolved() if name != "student_schedule"]

    def student_schedule(self, teacher_schedule: VPSchedule) -> VPSchedule:
        name = self.resolve().student_schedule
        if name == "teacher":
            return teacher_schedule
        return VPSchedule.from_name(name, teacher_schedule.num_train_timesteps)

    def distill(self, ctx: DistillContext) -> DistillResult:
        c = self.config
        if c.phased:
            b = P.window_boundaries(c.phases, ctx.schedule.num_train_timesteps)
            pool = make_pairs(ctx, PairSpec(f"rectified-diffusion-phased-m{c.phases}", c.pool_size, seed=17,
                                            desc="rectified-diffusion: phase pairs (teacher)", solver=c.phase_solver,
                                            steps=c.phase_steps, spacing=None, windows=b,
                                            label_dropout=c.label_dropout))
            objective = PhasedObjective(pool, b, ctx.schedule, ctx.train.batch_size, c.loss, c.huber_c)
        else:
            pool = make_pairs(ctx, PairSpec("rectified-diffusion-pairs", c.pool_size, seed=11,
                                            desc="rectified-diffusion: teacher pairs", solver=c.pair_solver,
                                            steps=c.pair_steps, spacing=c.pair_spacing,
                                            label_dropout=c.label_dropout))
            objective = RectifiedDiffusionObjective(pool, self.student_schedule(ctx.schedule), ctx.train.batch_size,
                                                    c.loss, c.huber_c, c.loss_on)
        net = ctx.train_stage(self, ctx.build_student(), objective, ctx.train.max_steps, ctx.out_dir)
        return DistillResult(net, ctx.teacher_nfe, {"pair_nfe": pool.nfe, "num_pairs": len(pool),
                                                    "teacher_nfe_this_run": ctx.teacher.evaluations}, method=self)

    def timesteps(self, steps: int, schedule: VPSchedule) -> torch.Tensor:
        if self.config.phased:
            return piecewise_timesteps(steps, P.window_boundaries(self.config.phases, schedule.num_train_timesteps))
        return make_timesteps(steps, schedule.num_train_timesteps, "trailing")

    def make_scheduler(self, schedule: VPSchedule, network: Denoiser | None = None) -> GridDDIMScheduler:
        return GridDDIMScheduler(**schedule_fields(self.student_schedule(schedule)),
                                 prediction_type=getattr(network, "prediction_type", "epsilon"),
                                 timestep_spacing="windows" if self.config.phased else "trailing",
                                 windows=int(self.config.phases))



__all__ = ["PhasedObjective", "RectifiedDiffusion", "RectifiedDiffusionConfig", "RectifiedDiffusionObjective",
           "first_order_step", "implied_noise"]
