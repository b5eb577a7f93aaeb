r"""Algorithm 1 of RayFlow: one student update (:meth:`RayFlowObjective.__call__`, read top to bottom).

::

    (x0, c, eps_mu) ~ the instance source              x0: data or the teacher's ODE; eps_mu: K-teacher average
    t, w = Time Sampler draw                           w = p(t) / q(t)                [RECOVERED q* ∝ xi_t p(t)]
    x_t = a_t x0 + (1 - a_t) eps_mu + sigma s_t z      the ray process
    L = w * lambda(t) * || pred_theta(x_t, t, c) - target ||^2
        epsilon form: target eps_mu;  velocity form: target v = x0 - eps_mu
    then (after the optimiser step) the Time Sampler learns from the per-instance losses
"""

from __future__ import annotations

from typing import Any

import torch

from rayflow.devices import DeviceCache, host_threads
from rayflow.methods.rayflow.config import RayFlowConfig
from rayflow.methods.rayflow.ray import RayParameterization, ray_point, ray_target, ray_x0_eps
from rayflow.methods.rayflow.readings import consistency_residual
from rayflow.methods.rayflow.targets import InstanceSource, instance_features
from rayflow.models.base import drop_labels
from rayflow.schedules import VPSchedule, expand_like
from rayflow.timestep_dists import TimestepDistribution as TimeSampler
from rayflow.timestep_dists import downsample


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
        self.ray = RayParameterization(schedule, config.ray.parameterization)
        self.loss_weight = (snr_weight_table(schedule, config.ray.snr_weight_max)
                            if config.ray.loss_weighting == "snr" else None)
        self._loss_weight: DeviceCache[torch.Tensor] = DeviceCache()  # the table where the timesteps are drawn
        self.snapshot_every = max(1, int(snapshot_every))
        self.snapshots: list[dict[str, Any]] = []
        self._pending: tuple | None = None
        self._queued: list[tuple] = []  # GPU runs: steps whose losses are on their way to the host
        #: the Time Sampler learns a step late (always on a GPU; settable on a CPU to test that schedule)
        self.lagged = False

    @property
    def capturable(self) -> bool:
        """The trainer may capture the step in a CUDA graph when nothing runs on the host: a fixed time density
        drawn on the device (the default uniform one; the learned Time Sampler draws and learns on the host) and
        instances drawn from one pool."""
        return (not self.time_sampler.adaptive and self.time_sampler.draws_on_device
                and getattr(self.source, "capturable", False))

    @property
    def conditioned(self) -> bool:
        return self.cfg.time.time_sampler == "learned" and self.cfg.time.time_sampler_features

    def __call__(self, model: torch.nn.Module, step: int, generator: torch.Generator):
        from rayflow.training import LossOutput

        rc, dev = self.cfg.ray, self.source.ctx.device
        b = self.batch_size
        x0, cond, eps_mu, traj = self.source.draw_instances(b, step, generator)  # pooled or computed online
        feats = instance_features(x0, eps_mu) if self.conditioned else None
        with host_threads(1):  # tiny host work: a thread pool would only spin beside the GPU step
            t, w = self.time_sampler.sample(b, generator, feats)  # t ~ q(t), w = p(t) / q(t)
        z = torch.randn(x0.shape, generator=generator, device=generator.device).to(dev, x0.dtype)
        a = expand_like(self.schedule.a(t).to(x0.dtype), x0)  # integer t: a table read; moved to x0's device
        s = expand_like(self.schedule.s(t).to(x0.dtype), x0)
        x_t = ray_point(x0, eps_mu, a, s, rc.sigma, z)  # the ray process at t
        if cond is not None and rc.label_dropout > 0 and self.num_classes > 0:
            cond = drop_labels(cond, rc.label_dropout, self.num_classes, generator)
        if self.num_classes == 0:
            cond = None
        # the network at the VP-matched point, read on the ray (host timesteps copied without waiting on the GPU)
        pred = self.ray(model, x_t, t.to(dev, non_blocking=True), cond).float()
        if self.loss_weight is None:
            residual = pred - ray_target(x0, eps_mu, rc.parameterization).float()
            per = residual.square().flatten(1).mean(1)
        else:
            _, eps_hat = ray_x0_eps(pred, rc.parameterization, x_t.float(), a.float())
            lam = self._loss_weight.get(t.device, self.loss_weight.to)[t].to(dev, non_blocking=True)
            per = (eps_hat - eps_mu.float()).square().flatten(1).mean(1) * lam
        # importance weights p/q
        weights = w.to(dev, non_blocking=True) if self.cfg.time.reweight else torch.ones_like(per)
        loss = (per * weights).mean()
        # logs stay device tensors: the trainer reads them once per log interval, not every step
        logs = {"loss_unweighted": per.detach().mean()}
        if traj is not None and self.cfg.targets.consistency_weight > 0:
            # issue #14 reading 3, expected-noise consistency (readings.py): the student's noise at a point of the
            # teacher's trajectory regresses eps_mu; not importance-weighted (its timestep is not drawn from q)
            cons = consistency_residual(self.ray, model, traj[0], traj[1], eps_mu, cond, self.schedule).mean()
            loss = loss + self.cfg.targets.consistency_weight * cons
            logs["loss_consistency"] = cons.detach()
        if self.time_sampler.adaptive:  # a fixed density learns nothing: no copy of the losses, no wait for them
            self._stash(t, per.detach(), feats)
        return LossOutput(loss, logs)

    def _stash(self, t: torch.Tensor, per: torch.Tensor, feats: torch.Tensor | None) -> None:
        """Keep this step's ``(t, per-instance loss, features)`` for the Time Sampler's update.

        On a CPU it is read right away. On a GPU the losses are copied to pinned host memory without waiting
        (an event marks when they are there) and the update of step ``n`` runs after step ``n + 1`` has been
        queued, so the CPU never stalls on the device: the Time Sampler then learns one step late (step
        ``n + 2`` draws from a density fitted to the losses of steps ``<= n``).
        """
        t = t if t.device.type == "cpu" else t.cpu()  # the Time Sampler draws on the host: normally no copy
        if per.device.type == "cuda":
            host = torch.empty(per.shape, dtype=per.dtype, pin_memory=True).copy_(per, non_blocking=True)
            if feats is not None:
                feats = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True).copy_(feats.detach(),
                                                                                           non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._queued.append((t, host, feats, event))
        elif self.lagged:  # the GPU's schedule on a CPU (tests)
            self._queued.append((t, per.clone(), None if feats is None else feats.clone(), _Done()))
        else:
            self._pending = (t, per, feats)

    def after_step(self, model: torch.nn.Module, step: int, generator: torch.Generator) -> dict[str, Any]:
        logs: dict[str, Any] = {}
        if not self.time_sampler.adaptive:  # nothing to learn; the (constant) density is still logged
            if self._snapshot_due(step):
                self.snapshots.append(self.snapshot(step + 1, None))
            return logs
        if len(self._queued) > 1:  # the GPU path: the previous step's losses
            t, per, feats, event = self._queued.pop(0)
            event.synchronize()  # long done unless the GPU is more than a step behind
            self._pending = (t, per, feats)
        if self._pending is not None:
            t, per, feats = self._pending
            self._pending = None
            with host_threads(1):
                logs = self.time_sampler.update(t, per, feats, generator)
                if self._snapshot_due(step):
                    self.snapshots.append(self.snapshot(step + 1, feats))
        elif step == 0 and self._queued:  # GPU: the first update comes a step later; record the start anyway
            self._queued[0][3].synchronize()
            self.snapshots.append(self.snapshot(1, self._queued[0][2]))
        return logs

    def _snapshot_due(self, step: int) -> bool:
        """The density is logged after the first step and every ``snapshot_every`` steps."""
        return (step + 1) % self.snapshot_every == 0 or step == 0

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
        state: dict[str, Any] = {"time_sampler": self.time_sampler.state_dict(), "snapshots": self.snapshots}
        if self._queued:  # a GPU run's update still to come: saved, so a resumed run makes it at the same step
            t, per, feats, event = self._queued[-1]
            event.synchronize()
            state["queued"] = {"t": t.clone(), "per": per.clone(),
                               **({} if feats is None else {"feats": feats.clone()})}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.time_sampler.load_state_dict(state["time_sampler"])
        self.snapshots = list(state.get("snapshots", []))
        queued = state.get("queued")
        self._queued = []
        if queued is not None:
            self._queued.append((queued["t"], queued["per"], queued.get("feats"), _Done()))


class _Done:
    """A stand-in for a CUDA event that has already completed."""

    def synchronize(self) -> None:
        pass




__all__ = ["RayFlowObjective", "snr_weight_table"]
