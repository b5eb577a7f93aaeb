r"""RayFlow's training instances ``(x0, c, eps_mu)``: the unified noise expectation (reconstruction §2.3), the
teacher's samples used as ``x0``, and the pools that cache them (resumable, sharded).

``eps_mu = 1/K sum_k eps_phi(a_{t_k} x0 + s_{t_k} eps, t_k, c)`` with one shared noise draw ``eps`` per instance.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from rayflow.caches import build_or_load, model_fingerprint
from rayflow.errors import require
from rayflow.methods.base import DistillContext
from rayflow.methods.rayflow.config import TargetConfig, parse_timestep_list
from rayflow.methods.rayflow.readings import start_consistent_eps_mu, teacher_trajectory
from rayflow.models import Condition, Denoiser, with_guidance
from rayflow.samplers import get_sampler, make_timesteps, sampler_nfe
from rayflow.schedules import VPSchedule, convert_prediction, expand_like


def eps_mu_timesteps(config: TargetConfig, num_train_timesteps: int, n: int,
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
def _noise_rows(seeds: list[int], shape: tuple[int, ...], out: torch.Tensor) -> None:
    g = torch.Generator()
    for i, seed in enumerate(seeds):
        g.manual_seed(seed)  # resets the generator completely: the draw of a fresh generator with this seed
        torch.randn(shape, generator=g, out=out[i])


#: rows per thread below which the noise is drawn in the calling thread (a pool's shard is thousands of rows)
NOISE_ROWS_PER_THREAD = 512


def _noise_from_seeds(seeds: torch.Tensor, shape: tuple[int, ...], threads: int | None = None) -> torch.Tensor:
    """One ``N(0, I)`` draw per row from its own seed: a cached instance's noise can always be regenerated.

    Rows are independent, so a large shard is drawn by up to ``threads`` (default: up to 8 of the CPUs) threads
    with identical values; drawing them one by one in Python cost about a quarter of the GPU time of a K = 8
    eps_mu shard, during which the GPU waited.
    """
    seeds_list = [int(s) for s in seeds.tolist()]
    out = torch.empty((len(seeds_list), *shape))
    if threads is None:
        threads = min(8, os.cpu_count() or 1, len(seeds_list) // NOISE_ROWS_PER_THREAD)
    if threads <= 1:
        _noise_rows(seeds_list, shape, out)
        return out
    step = -(-len(seeds_list) // threads)
    with ThreadPoolExecutor(threads) as pool:
        for job in [pool.submit(_noise_rows, seeds_list[i:i + step], shape, out[i:i + step])
                    for i in range(0, len(seeds_list), step)]:
            job.result()
    return out


class InstanceSource:
    """Supplies ``(x0, cond, eps_mu)`` batches: rows of the pre-computed pools (``pools`` maps ``"data"`` /
    ``"teacher"`` to :func:`build_pool` output), or, with ``pools=None``, instances computed online."""

    def __init__(self, config: TargetConfig, ctx: DistillContext, teacher: Denoiser,
                 pools: dict[str, dict] | None) -> None:
        self.cfg = config
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
        if self.cfg.eps_mu_reading == "start":  # issue #14 reading 2 (readings.py): no teacher call
            return start_consistent_eps_mu(x0, eps, self.schedule)
        require(self.cfg.eps_mu_reading == "average",
                "rayflow: the trajectory reading of eps_mu comes with the teacher's x0 (teacher_instances)")
        ts = eps_mu_timesteps(self.cfg, self.schedule.num_train_timesteps, x0.shape[0], generator)
        return unified_noise_expectation(self.teacher, x0, eps, ts, self.schedule, cond, self.ctx.guidance)

    def make_teacher_x0(self, eps: torch.Tensor, cond: Condition) -> torch.Tensor:
        return teacher_x0(self.teacher, eps, self.schedule, cond, self.ctx.guidance, self.cfg.teacher_solver,
                          self.cfg.teacher_steps)

    def teacher_instances(self, eps: torch.Tensor, cond: Condition, generator: torch.Generator | None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(x0, eps_mu, traj_x, traj_t)`` of teacher-x0 instances: ``x0`` the teacher's ODE from ``eps``; with the
        trajectory reading or the consistency loss (issue #14) the same solve is recorded, and ``traj_x`` at VP
        timestep ``traj_t`` is one of its states per row (None unless the consistency loss needs it)."""
        cfg = self.cfg
        consistency = cfg.consistency_weight > 0
        if not (cfg.instance_target and cfg.eps_mu_reading == "trajectory") and not consistency:
            x0 = self.make_teacher_x0(eps, cond)
            return x0, self.compute(x0, eps, cond, generator), None, None
        traj = teacher_trajectory(self.teacher, eps, self.schedule, cond, self.ctx.guidance, cfg.teacher_solver,
                                  cfg.teacher_steps, keep_states=consistency)
        x0 = traj.x0
        eps_mu = traj.eps_mu if cfg.eps_mu_reading == "trajectory" else self.compute(x0, eps, cond, generator)
        tx, tt = traj.pick(None if generator is None or generator.device.type != "cpu" else generator) \
            if consistency else (None, None)
        return x0, eps_mu, tx, tt

    def draw(self, n: int, step: int, generator: torch.Generator) -> tuple[torch.Tensor, Condition, torch.Tensor]:
        """``(x0, cond, eps_mu)`` of ``n`` instances."""
        return self.draw_instances(n, step, generator)[:3]

    def draw_instances(self, n: int, step: int, generator: torch.Generator
                       ) -> tuple[torch.Tensor, Condition, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``(x0, cond, eps_mu, trajectory)``; ``trajectory`` = ``(traj_x, traj_t)``, one point of each row's
        teacher trajectory, when the consistency loss is on (all rows are teacher rows then), else None."""
        dev = self.ctx.device
        use_teacher = torch.rand(n, generator=generator, device=generator.device) < self.teacher_fraction(step)
        if self.pools is not None:
            return self._draw_pools(n, use_teacher, generator)
        use_teacher = use_teacher.cpu()
        if self.cfg.consistency_weight > 0 or self.cfg.eps_mu_reading == "trajectory":  # x0_source=teacher
            eps = torch.randn((n, *self.data.shape[1:]), generator=generator, device=generator.device).to(dev)
            cond = None
            if self.labels is not None:
                idx = torch.randint(0, self.data.shape[0], (n,), generator=generator, device=generator.device).cpu()
                cond = self._cond(idx).to(dev)
            g_ts = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator,
                                                                   device=generator.device)))
            x0, eps_mu, tx, tt = self.teacher_instances(eps, cond, g_ts)
            return x0, cond, eps_mu, (None if tx is None else (tx, tt))
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
        return x0, cond, self.compute(x0, eps, cond, g_ts), None

    @property
    def capturable(self) -> bool:
        """Its draws are device-only: one pool, without trajectory points (see :meth:`_draw_pools`)."""
        return self.pools is not None and self._single_pool() is not None and self.cfg.consistency_weight == 0

    def _single_pool(self) -> str | None:
        """The one pool every row comes from when the x0 source is not mixed (``data`` or ``teacher``)."""
        fraction = {"data": 0.0, "teacher": 1.0}.get(self.cfg.x0_source)
        if fraction is None or len(self.pools or {}) != 1:
            return None
        name = "teacher" if fraction == 1.0 else "data"
        return name if name in self.pools else None

    def _pool_on(self, name: str, device: torch.device) -> dict[str, torch.Tensor] | None:
        """Pool ``name`` (and for the data pool the data set's images and labels) on ``device``, copied once; None
        when it is over 1 GiB (it then stays in host memory and rows are gathered there)."""
        cache = self.__dict__.setdefault("_device_pools", {})
        key = (name, str(device))
        if key not in cache:
            pool = {k: v for k, v in self.pools[name].items() if torch.is_tensor(v)}
            if name == "data":
                pool["data_x"] = self.data
                if self.labels is not None:
                    pool["data_labels"] = torch.as_tensor(self.labels)
            size = sum(v.numel() * v.element_size() for v in pool.values())
            cache[key] = {k: v.to(device) for k, v in pool.items()} if size <= (1 << 30) else None
        return cache[key]

    def _draw_pools(self, n, use_teacher, generator):
        dev = self.ctx.device
        name = self._single_pool()
        pool = None if name is None else self._pool_on(name, generator.device)
        if pool is not None:
            # every row from one pool: the rows are drawn and gathered on the device (the same draws as the
            # general path below, without its host round trips, which stall a GPU step)
            rows = torch.randint(0, pool["eps_mu"].shape[0], (n,), generator=generator, device=generator.device)
            if name == "data":
                idx = pool["index"][rows]
                x0 = pool["data_x"][idx]
                cond = None if self.labels is None else pool["data_labels"][idx]
            else:
                x0 = pool["x0"][rows]
                cond = None if self.labels is None else pool["label"][rows]
            traj = None
            if self.cfg.consistency_weight > 0:
                require(name == "teacher" and "traj_x" in pool,
                        "rayflow: consistency_weight > 0 needs pools with trajectory points (x0_source=teacher)")
                traj = (pool["traj_x"][rows].to(dev), pool["traj_t"][rows])
            return x0.to(dev), None if cond is None else cond.to(dev), pool["eps_mu"][rows].to(dev), traj
        use_teacher = use_teacher.cpu()
        parts_x0, parts_c, parts_e, parts_tx, parts_tt = [], [], [], [], []
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
                if "traj_x" in pool:
                    parts_tx.append(pool["traj_x"][rows])
                    parts_tt.append(pool["traj_t"][rows])
            parts_e.append(pool["eps_mu"][rows])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n)
        x0 = torch.cat(parts_x0)[inverse].to(dev)
        e = torch.cat(parts_e)[inverse].to(dev)
        cond = None if self.labels is None else torch.cat(parts_c)[inverse].to(dev)
        traj = None
        if self.cfg.consistency_weight > 0:
            require(len(parts_tx) == 1 and len(parts_x0) == 1,
                    "rayflow: consistency_weight > 0 needs pools with trajectory points (x0_source=teacher)")
            traj = (torch.cat(parts_tx)[inverse].to(dev), torch.cat(parts_tt)[inverse])
        return x0, cond, e, traj




# ---------------------------------------------------------------------- the pools (the eps_mu cache)
def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """Fingerprint of the model inside the counting/conversion wrappers (they hold no weights of their own)."""
    while isinstance(getattr(teacher, "model", None), torch.nn.Module):
        teacher = teacher.model
    return model_fingerprint(teacher)


def needed_sources(cfg: TargetConfig) -> list[str]:
    """The x0 sources whose pools a run draws from (``mixed`` needs both unless its schedule is constant)."""
    if cfg.x0_source == "mixed":
        return [s for s, used in (("teacher", max(cfg.mix_start, cfg.mix_end) > 0),
                                  ("data", min(cfg.mix_start, cfg.mix_end) < 1)) if used]
    return [cfg.x0_source]


def teacher_nfe_per_instance(cfg: TargetConfig, source: str, teacher: Denoiser, guidance: float) -> int:
    """Teacher evaluations one pooled instance costs: K for eps_mu, plus its ODE for a teacher x0; x2 with CFG."""
    cfg_factor = 2 if (guidance != 1.0 and teacher.num_classes > 0) else 1
    # the trajectory and start readings cost no teacher call beyond the teacher's x0 (issue #14)
    n = cfg.k_timesteps if (cfg.instance_target and cfg.eps_mu_reading == "average") else 0
    if source == "teacher":
        n += sampler_nfe(cfg.teacher_solver, cfg.teacher_steps)
    return n * cfg_factor


def pool_meta(cfg: TargetConfig, ctx: DistillContext, teacher: Denoiser, source: str) -> dict[str, Any]:
    """What a pool depends on: a cache is reused only when this matches."""
    meta = {
        "kind": "rayflow-eps_mu", "format": 1, "source": source, "teacher": teacher_fingerprint(teacher),
        "data": ctx.dataset.spec, "schedule": ctx.schedule.config, "guidance": float(ctx.guidance),
        "instance_target": cfg.instance_target, "k_timesteps": cfg.k_timesteps,
        "timestep_set": cfg.timestep_set, "timestep_min": cfg.timestep_min, "cache_seed": cfg.cache_seed,
        "conditional": teacher.num_classes > 0,
    }
    if source == "teacher":
        meta.update(teacher_solver=cfg.teacher_solver, teacher_steps=cfg.teacher_steps)
    # issue #14: recorded only off the defaults, so caches built before these options stay valid
    if cfg.eps_mu_reading != "average":
        meta["eps_mu_reading"] = cfg.eps_mu_reading
    if cfg.consistency_weight > 0 and source == "teacher":
        meta["trajectory_points"] = True
    return meta


def pool_size(cfg: TargetConfig, ctx: DistillContext) -> int:
    return cfg.pool_size or max(len(ctx.dataset), 16384)


def build_pool(cfg: TargetConfig, ctx: DistillContext, teacher: Denoiser, source: str, root: Path | None,
               progress: bool = False) -> dict[str, torch.Tensor]:
    """The cached instances of one x0 source: built in shards (resumable), reused when the meta matches.

    Shard tensors: ``noise_seed`` (each row's ``eps`` is ``randn`` from it), ``eps_mu``, and ``index``
    (data rows, cycled) or ``x0``/``label`` (teacher samples).
    """
    ds = ctx.dataset
    n_data = len(ds)
    helper = InstanceSource(cfg, ctx, teacher, None)  # its eps_mu / teacher-x0 / label code, without pools
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
            x0, eps_mu, tx, tt = helper.teacher_instances(eps, None if cond is None else cond.to(ctx.device), g)
            out["x0"] = x0.float().cpu()
            out["eps_mu"] = eps_mu.float().cpu()
            if tx is not None:
                out["traj_x"], out["traj_t"] = tx.float().cpu(), tt.double().cpu()
            return out
        cond = None if cond is None else cond.to(ctx.device)
        out["eps_mu"] = helper.compute(x0, eps, cond, g).float().cpu()
        return out

    acc = ctx.accelerator
    return build_or_load(root, pool_meta(cfg, ctx, teacher, source), pool_size(cfg, ctx), make_shard,
                         seed=cfg.cache_seed, shard_size=cfg.cache_shard_size, progress=progress,
                         desc=f"rayflow: eps_mu pool ({source} x0)", rank=0 if acc is None else int(acc.process_index),
                         world_size=1 if acc is None else int(acc.num_processes),
                         barrier=None if acc is None else acc.wait_for_everyone)


__all__ = ["InstanceSource", "build_pool", "eps_mu_timesteps", "instance_features", "needed_sources", "pool_meta",
           "pool_size", "teacher_fingerprint", "teacher_nfe_per_instance", "teacher_x0", "unified_noise_expectation"]
