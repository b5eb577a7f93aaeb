"""The method kit's pair pools: one typed :class:`PairSpec` and one :func:`make_pairs` for every reflow-family
method (2-Rectified Flow, PeRFlow, Rectified Diffusion, ProReflow), instead of a dozen keywords per call of
:func:`rayflow.pairs.global_pairs` / :func:`rayflow.pairs.window_pairs`.

A spec says *what* the pool is (who solves, how, over which windows, how large, from which seed); the
context supplies *where* (data, device, cache directory, accelerate processes, progress) and keeps the teacher-NFE
account: a pool the teacher makes is charged its recorded cost (:meth:`DistillContext.pool_cost`), whether it was
computed now or read back from the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rayflow import pairs as P
from rayflow.errors import require
from rayflow.methods.base import DistillContext
from rayflow.models.counting import CountingDenoiser


@dataclass(frozen=True)
class PairSpec:
    """One pool of pairs.

    ``windows`` (boundaries ``[K+1]``) makes window pairs ``(z_start, z_end)`` of real data noised to a window start
    (:func:`rayflow.pairs.window_pairs`); ``None`` makes global pairs ``noise -> sample``
    (:func:`rayflow.pairs.global_pairs`). The teacher solves with ``solver``/``steps`` (``spacing`` on the global
    grid) and the run's CFG, unless ``solve`` is given: a previous stage's own sampler, evaluating ``counter``
    (the pool's cost is measured through it and is not the teacher's), described in the cache by ``meta``.
    """

    cache: str  # the pool's name under the run's cache directory
    size: int  # items in the pool
    seed: int  # offset from the run's seed: each pool of a method has its own stream
    desc: str  # the progress bar's label: method and stage
    solver: str = "dpm++2m"
    steps: int = 25
    spacing: str | None = "trailing"  # global pairs' grid; None for window pairs (per-sample grids)
    windows: torch.Tensor | None = None
    label_dropout: float = 0.0  # CFG-sync: the pair is solved with the label the student will see
    meta: dict[str, Any] = field(default_factory=dict)  # further cache description (stage, ...)
    solve: Callable[..., torch.Tensor] | None = None  # a student's solver instead of the teacher's
    counter: CountingDenoiser | None = None  # what ``solve`` evaluates (required with ``solve``)


def make_pairs(ctx: DistillContext, spec: PairSpec) -> P.Pairs:
    """The pool ``spec`` describes, built (or read from ``ctx``'s cache) with the run's data, device and processes."""
    require(spec.size >= 1, f"{spec.desc}: the pool size must be >= 1, got {spec.size}")
    by_teacher = spec.solve is None
    if by_teacher:
        counter = ctx.teacher
        solver_meta = {"solver": spec.solver, "steps": spec.steps}
        if spec.spacing is not None:
            solver_meta["spacing"] = spec.spacing
        meta = P.teacher_meta(ctx.teacher, **solver_meta, guidance=ctx.guidance, **spec.meta)
        if spec.windows is None:
            solve = P.teacher_global_solver(ctx.teacher, ctx.schedule, spec.solver, spec.steps, ctx.guidance,
                                            spec.spacing or "trailing")
        else:
            solve = P.teacher_window_solver(ctx.teacher, ctx.schedule, spec.solver, spec.steps, ctx.guidance)
    else:
        require(spec.counter is not None, f"{spec.desc}: a pool made by a student's solver needs its counter")
        counter, solve, meta = spec.counter, spec.solve, dict(spec.meta)
    common: dict[str, Any] = dict(num_classes=ctx.teacher.num_classes, label_dropout=spec.label_dropout,
                                  seed=ctx.train.seed + spec.seed, cache=ctx.cache_path(spec.cache), meta=meta,
                                  device=ctx.device, accelerator=ctx.accelerator, progress=ctx.progress,
                                  desc=spec.desc)
    if ctx.gen_batch:  # the solver's batch: one static teacher batch per solver step (else the pools' 1024)
        common["batch_size"] = ctx.gen_batch
    with ctx.pool_cost() as cost:
        if spec.windows is None:
            pool = P.global_pairs(solve, counter, ctx.dataset, spec.size, **common)
        else:
            pool = P.window_pairs(solve, counter, ctx.dataset, ctx.schedule, spec.windows, spec.size, **common)
        if by_teacher:
            cost.append(pool.nfe)
    return pool


__all__ = ["PairSpec", "make_pairs"]
