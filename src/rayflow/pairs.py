"""Pair generation for the reflow family: the (start, end) couplings that 2-RF, PeRFlow, Rectified Diffusion
and ProReflow regress onto.

Three sources (reflow-peers.md §D.4), all in our time convention (integer timesteps ``0 .. T-1``, large =
noise, ``t = -1`` = clean data):

(a) **Global pairs** - :func:`global_pairs`: noise ``eps`` at ``t = T-1`` -> teacher ODE (DDIM, DPM-Solver++ or
    Heun, with its NFE and CFG) -> sample ``x0_hat``. Used by 2-RF / InstaFlow [CODE RectifiedFlow] and
    Rectified Diffusion [CODE G-U-N].
(b) **Window pairs** - :func:`window_pairs` with :func:`teacher_window_solver`: real data ``x0`` noised to the
    window start, ``z_s = a_{t_s} x0 + s_{t_s} eps``, and the teacher solved from ``t_s`` to the window end
    ``t_e`` on a per-sample grid (:func:`rayflow.samplers.window_timesteps`). Used by PeRFlow [CODE
    perflow_accelerate_sd.py], Rectified Diffusion-Phased [CODE train_phased.py] and ProReflow's first stage.
(c) **Student pairs over merged windows** - the same :func:`window_pairs` with a solver made from the previous
    stage's student (ProReflow [SECONDARY]: "each stage utilizes the model from the previous stage to generate
    paired data"), or :func:`global_pairs` with a student (InstaFlow's one-step distillation data).

Pairs are generated **offline into a pool** of ``num_pairs`` items that training samples from; with a pool at
least ``max_steps * batch_size`` large this is PeRFlow's online generation, and the cost is explicit. Each pool
is a :class:`rayflow.caches.ShardedCache` when a cache directory is given (resumable: shard ``i`` is a pure
function of ``(seed, i)``, so an interrupted build computes exactly the missing shards - nothing duplicated or
lost; several accelerate processes each write their own shards) and is computed in memory otherwise (then every
process computes the whole pool, identically, and its cost is reported once). The cache's
``meta.json`` records what made it (kind, the generating model's fingerprint, data, solver, steps, CFG, windows,
seed), so a cache from another teacher or another previous-stage model is refused with a one-line error.

Every item records the network evaluations it cost (``nfe``); :attr:`Pairs.nfe` sums them, so a pool read back
from a cache still reports what it cost to make.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rayflow.caches import build_or_load, model_fingerprint
from rayflow.devices import DeviceCache
from rayflow.errors import require
from rayflow.models.base import Condition, Denoiser, drop_labels, with_guidance
from rayflow.models.counting import CountingDenoiser
from rayflow.samplers import get_sampler, make_timesteps, window_timesteps
from rayflow.schedules import VPSchedule

# the window maths moved to rayflow.windows; re-exported here for one release
from rayflow.windows import (  # noqa: F401
    check_stage_windows,
    merge_windows,
    subwindow_grid,
    window_boundaries,
    window_index,
)

#: solvers a teacher may use for pairs, with their diffusers names in comments
PAIR_SOLVERS = ("ddim", "dpm++2m", "heun", "euler")

GlobalSolve = Callable[[torch.Tensor, Condition], torch.Tensor]
WindowSolve = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Condition], torch.Tensor]


# ---------------------------------------------------------------------- the pool
@dataclass
class Pairs:
    """A pool of pairs: ``tensors`` (CPU, first dimension = item) and the evaluations they cost."""

    tensors: dict[str, torch.Tensor]
    nfe: int  # network evaluations spent on the whole pool (per sample, CFG doubling included)
    computed_nfe: int  # of which spent by this process now (0 when everything came from the cache)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def get(self, key: str) -> torch.Tensor | None:
        return self.tensors.get(key)

    _on_device: DeviceCache[dict[str, torch.Tensor]] = field(default_factory=DeviceCache, init=False, repr=False,
                                                             compare=False)

    def to(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in self.tensors.items() if k != "nfe"}

    def batch(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``batch_size`` items drawn uniformly with replacement, on ``generator``'s device (where the pool is
        copied once, on first use, so a training step indexes device memory instead of copying)."""
        dev = generator.device
        pool = self._on_device.get(dev, self.to)
        idx = torch.randint(0, len(self), (batch_size,), generator=generator, device=dev)
        return {k: v[idx] for k, v in pool.items()}


def distributed(accelerator: Any) -> tuple[int, int, Callable[[], None] | None]:
    """``(rank, world_size, barrier)`` of an accelerate ``Accelerator`` (``(0, 1, None)`` without one)."""
    if accelerator is None:
        return 0, 1, None
    return int(accelerator.process_index), int(accelerator.num_processes), accelerator.wait_for_everyone


def _per_item_nfe(total: int, count: int) -> torch.Tensor:
    """Spread ``total`` evaluations over ``count`` items as integers that sum exactly to ``total``."""
    base, rem = divmod(int(total), count)
    return torch.full((count,), base, dtype=torch.int64) + (torch.arange(count) < rem).long()


def _build(root: Path | None, meta: dict[str, Any], num_items: int, make_shard, *, seed: int, shard_size: int,
           progress: bool, desc: str, accelerator: Any, counter: CountingDenoiser) -> Pairs:
    rank, world, barrier = distributed(accelerator)
    before = counter.evaluations
    tensors = build_or_load(root, meta, num_items, make_shard, seed=seed, shard_size=shard_size, progress=progress,
                            desc=desc, rank=rank, world_size=world, barrier=barrier)
    nfe = int(tensors["nfe"].sum())
    return Pairs(tensors, nfe, counter.evaluations - before)


def _counted(model: Denoiser) -> CountingDenoiser:
    return model if isinstance(model, CountingDenoiser) else CountingDenoiser(model)


def _labels(dataset: Any, rows: torch.Tensor, num_classes: int, label_dropout: float,
            generator: torch.Generator) -> torch.Tensor | None:
    """The labels of dataset ``rows`` for a class-conditional model, replaced by the null label ``num_classes``
    with probability ``label_dropout`` (PeRFlow's CFG-sync: teacher and student see the same dropped label)."""
    if num_classes <= 0 or getattr(dataset, "labels", None) is None:
        return None
    labels = dataset.labels[rows].long()
    return drop_labels(labels, label_dropout, num_classes, generator) if label_dropout > 0 else labels


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


# ---------------------------------------------------------------------- time windows
# ---------------------------------------------------------------------- (a) global pairs
def teacher_global_solver(teacher: Denoiser, schedule: VPSchedule, solver: str = "dpm++2m", steps: int = 25,
                          guidance: float = 1.0, spacing: str = "trailing") -> GlobalSolve:
    """``solve(noise, cond) -> sample``: the teacher's probability-flow ODE from ``t = T-1`` to data."""
    require(solver in PAIR_SOLVERS, f"unknown pair solver {solver!r}; expected one of {', '.join(PAIR_SOLVERS)}")
    fn = get_sampler(solver)
    grid = make_timesteps(steps, schedule.num_train_timesteps, spacing)
    guided = with_guidance(teacher, guidance)

    def solve(noise: torch.Tensor, cond: Condition) -> torch.Tensor:
        return fn(guided, noise, grid, schedule, cond)

    return solve


def global_pairs(
    solve: GlobalSolve, counter: Denoiser, dataset: Any, num_pairs: int, *, num_classes: int = 0,
    label_dropout: float = 0.0, seed: int = 0, cache: str | Path | None = None, meta: dict[str, Any] | None = None,
    batch_size: int = 1024, shard_size: int = 4096, device: torch.device | str = "cpu", accelerator: Any = None,
    progress: bool = False, desc: str = "pairs",
) -> Pairs:
    """(a) ``num_pairs`` pairs ``noise -> sample`` (keys ``noise``, ``sample``, ``labels`` when conditional, ``nfe``).

    ``solve`` is :func:`teacher_global_solver` (or a student's sampler); ``counter`` is the
    :class:`~rayflow.models.counting.CountingDenoiser` it evaluates (the cost per item is measured through it).
    Labels are those of random rows of ``dataset`` (its class frequencies), dropped to the null label with
    probability ``label_dropout``.
    """
    require(num_pairs >= 1, f"num_pairs must be >= 1, got {num_pairs}")
    counter = _counted(counter)
    shape = tuple(dataset.x.shape[1:])
    device = torch.device(device)

    def make_shard(index: int, start: int, count: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        noise = torch.randn(count, *shape, generator=g)
        rows = torch.randint(0, len(dataset), (count,), generator=g)
        labels = _labels(dataset, rows, num_classes, label_dropout, g)
        before = counter.evaluations
        out = []
        for sl in _chunks(count, batch_size):
            cond = None if labels is None else labels[sl].to(device)
            out.append(solve(noise[sl].to(device), cond).float().cpu())
        shard = {"noise": noise, "sample": torch.cat(out), "nfe": _per_item_nfe(counter.evaluations - before, count)}
        if labels is not None:
            shard["labels"] = labels
        return shard

    full_meta = {"kind": "global-pairs", "data": getattr(dataset, "spec", ""), "sample_shape": list(shape),
                 "num_classes": num_classes, "label_dropout": label_dropout, "seed": seed, **(meta or {})}
    return _build(None if cache is None else Path(cache), full_meta, num_pairs, make_shard, seed=seed,
                  shard_size=shard_size, progress=progress, desc=desc, accelerator=accelerator, counter=counter)


# ---------------------------------------------------------------------- (b), (c) window pairs
def teacher_window_solver(teacher: Denoiser, schedule: VPSchedule, solver: str = "ddim", steps: int = 8,
                          guidance: float = 1.0) -> WindowSolve:
    """``solve(z_s, t_s, t_e, cond) -> z_e``: the teacher ODE over per-sample windows, ``steps`` steps linear in t.

    PeRFlow's ``PFODESolver`` is DDIM with ``solving_steps`` steps per window [CODE]; any sampler of
    :mod:`rayflow.samplers` works because they all accept per-sample grids.
    """
    require(solver in PAIR_SOLVERS, f"unknown pair solver {solver!r}; expected one of {', '.join(PAIR_SOLVERS)}")
    require(steps >= 1, f"window solver steps must be >= 1, got {steps}")
    fn = get_sampler(solver)
    guided = with_guidance(teacher, guidance)

    def solve(z: torch.Tensor, t_start: torch.Tensor, t_end: torch.Tensor, cond: Condition) -> torch.Tensor:
        return fn(guided, z, window_timesteps(t_start, t_end, steps), schedule, cond)

    return solve


def window_pairs(
    solve: WindowSolve, counter: Denoiser, dataset: Any, schedule: VPSchedule, boundaries: torch.Tensor,
    num_pairs: int, *, num_classes: int = 0, label_dropout: float = 0.0, seed: int = 0,
    cache: str | Path | None = None, meta: dict[str, Any] | None = None, batch_size: int = 1024,
    shard_size: int = 4096, device: torch.device | str = "cpu", accelerator: Any = None, progress: bool = False,
    desc: str = "window pairs",
) -> Pairs:
    """(b)/(c) ``num_pairs`` window pairs: keys ``window`` (index ``k``), ``z_start``, ``z_end``, ``labels``, ``nfe``.

    Each item draws a real sample ``x0`` (a random row of ``dataset``), noise ``eps`` and a window ``k``
    uniformly (the windows are equal, so this is PeRFlow's uniform ``t``), sets
    ``z_start = a_{b_k} x0 + s_{b_k} eps`` and ``z_end = solve(z_start, b_k, b_{k+1})``.
    """
    require(num_pairs >= 1, f"num_pairs must be >= 1, got {num_pairs}")
    counter = _counted(counter)
    shape = tuple(dataset.x.shape[1:])
    device = torch.device(device)
    K = boundaries.numel() - 1

    def make_shard(index: int, start: int, count: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        rows = torch.randint(0, len(dataset), (count,), generator=g)
        noise = torch.randn(count, *shape, generator=g)
        k = torch.randint(0, K, (count,), generator=g)
        labels = _labels(dataset, rows, num_classes, label_dropout, g)
        t_s, t_e = boundaries[k], boundaries[k + 1]
        z_s = schedule.add_noise(dataset.x[rows].float(), noise, t_s)
        before = counter.evaluations
        out = []
        for sl in _chunks(count, batch_size):
            cond = None if labels is None else labels[sl].to(device)
            out.append(solve(z_s[sl].to(device), t_s[sl], t_e[sl], cond).float().cpu())
        shard = {"window": k, "z_start": z_s, "z_end": torch.cat(out),
                 "nfe": _per_item_nfe(counter.evaluations - before, count)}
        if labels is not None:
            shard["labels"] = labels
        return shard

    full_meta = {"kind": "window-pairs", "data": getattr(dataset, "spec", ""), "sample_shape": list(shape),
                 "boundaries": boundaries.tolist(), "schedule": schedule.config, "num_classes": num_classes,
                 "label_dropout": label_dropout, "seed": seed, **(meta or {})}
    return _build(None if cache is None else Path(cache), full_meta, num_pairs, make_shard, seed=seed,
                  shard_size=shard_size, progress=progress, desc=desc, accelerator=accelerator, counter=counter)


def teacher_meta(teacher: Denoiser, **extra: Any) -> dict[str, Any]:
    """The cache description of pairs made by ``teacher``: its fingerprint and the solver settings."""
    inner = teacher.model if isinstance(teacher, CountingDenoiser) else teacher
    return {"source": "teacher", "teacher": model_fingerprint(inner), **extra}


def student_meta(student: Denoiser, **extra: Any) -> dict[str, Any]:
    """The cache description of pairs made by a previous stage's ``student``."""
    inner = student.model if isinstance(student, CountingDenoiser) else student
    return {"source": "student", "student": model_fingerprint(inner), **extra}


__all__ = [
    "PAIR_SOLVERS", "Pairs", "check_stage_windows", "distributed", "global_pairs", "merge_windows",
    "student_meta", "subwindow_grid", "teacher_global_solver", "teacher_meta", "teacher_window_solver",
    "window_boundaries", "window_index", "window_pairs",
]
