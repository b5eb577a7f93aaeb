"""The pipelines behind the command line: train a teacher, distil it with a method, load any generator.

Every model directory is self-describing: ``config.json`` says whether it holds a teacher or a student, the
network, the schedule, the data spec it was trained on and, for students, the method (with its config) whose
sampler it needs. :func:`load_generator` turns any such directory - or the exact mixture teacher - into a
:class:`FewStepModel` with one ``generate(noise, steps, cond)`` call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rayflow import __version__
from rayflow.checkpoint import RunDirectory, load_model_dir, read_json
from rayflow.data import Dataset, load_dataset
from rayflow.errors import RayflowError, require
from rayflow.gmm import ExactTeacher
from rayflow.methods import CountingDenoiser, DistillContext, DistillResult, Method, get_method
from rayflow.models import (
    Condition,
    Denoiser,
    ModelConfig,
    as_epsilon,
    build_model,
    default_model_config,
    prepare_frozen_teacher,
)
from rayflow.samplers import get_sampler, sampler_nfe
from rayflow.samplers import sample as solve_teacher
from rayflow.schedules import VPSchedule
from rayflow.training import EpsilonObjective, TrainConfig, Trainer, resolve_mixed_precision
from rayflow.validate import same_or_inside

#: the teacher's default sampler and steps when a directory is sampled without --sampler/--steps
TEACHER_SAMPLER = {"name": "dpm++2m", "steps": 25}


# ---------------------------------------------------------------------- teachers
def train_teacher(
    data: str | Dataset, out_dir: str | Path, train: TrainConfig, model: ModelConfig | None = None,
    schedule: VPSchedule | None = None, conditional: bool = True, label_dropout: float = 0.1,
    accelerator: Any = None, init_from: str | Path | None = None,
) -> Denoiser:
    """Train an epsilon-prediction teacher on ``data`` into ``out_dir`` (resuming if interrupted).

    Class-conditional (with label dropout for classifier-free guidance) when the data has labels and
    ``conditional`` is set. ``init_from`` (a saved teacher directory) starts from its network and weights instead
    of a fresh one: fine-tuning, e.g. onto another noise ``schedule`` (benchmarks/rayflow_readings.py's second
    teacher); ``model`` must then be None.
    """
    dataset = load_dataset(data) if isinstance(data, str) else data
    schedule = schedule or VPSchedule.linear()
    require(0 <= label_dropout < 1, f"label dropout must be in [0, 1), got {label_dropout}")
    num_classes = dataset.num_classes if (conditional and dataset.labels is not None) else 0
    model_cfg = model or default_model_config(dataset.sample_shape, num_classes)
    require(tuple(model_cfg.sample_shape) == tuple(dataset.sample_shape),
            f"the model is built for samples of shape {tuple(model_cfg.sample_shape)} but {dataset.spec} has "
            f"{tuple(dataset.sample_shape)}")
    model_cfg.num_classes = num_classes
    if init_from is not None:
        require(model is None, "train_teacher: give model or init_from, not both (init_from brings its network)")
        net, init_cfg = load_model_dir(init_from)
        model_cfg = ModelConfig.from_dict(init_cfg["model"])
        require(tuple(model_cfg.sample_shape) == tuple(dataset.sample_shape) and model_cfg.num_classes == num_classes,
                f"{init_from}: its network is for samples {tuple(model_cfg.sample_shape)} with "
                f"{model_cfg.num_classes} classes, but {dataset.spec} has {tuple(dataset.sample_shape)} and "
                f"{num_classes}")
        net.train()
    else:
        net = seeded_build(model_cfg, train.seed)
    objective = EpsilonObjective(dataset.x, dataset.labels if num_classes else None, schedule, train.batch_size,
                                 label_dropout=label_dropout, num_classes=num_classes)
    run_config = {
        "kind": "teacher", "model": model_cfg.to_dict(), "schedule": schedule.config, "data": dataset.spec,
        "label_dropout": label_dropout, "sampler": TEACHER_SAMPLER, "rayflow_version": __version__,
        **({"init_from": str(init_from)} if init_from is not None else {}),
    }
    with RunDirectory(out_dir, is_main=accelerator is None or accelerator.is_main_process):
        return Trainer(net, objective, train, out_dir, run_config, accelerator=accelerator).train()


def seeded_build(config: ModelConfig, seed: int) -> Denoiser:
    """:func:`build_model` with its initial weights drawn from ``seed`` (the global RNG is left as it was).

    Two runs with one ``--seed`` start from the same weights, and a run killed before its first checkpoint
    restarts from the same initialisation.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(config)


def _schedule_of(config: dict, where: str) -> VPSchedule:
    """The schedule a model directory's ``config.json`` records, with one-line errors for a malformed one."""
    cfg = config.get("schedule")
    require(isinstance(cfg, dict), f"{where}: no \"schedule\" section (a JSON object) describing the noise schedule")
    try:
        return VPSchedule.from_config(cfg)
    except RayflowError as exc:
        raise RayflowError(f"{where}: {exc}") from exc
    except (TypeError, ValueError, KeyError) as exc:
        raise RayflowError(f"{where}: invalid \"schedule\" section: {exc}") from exc


def _teacher_sampler_of(config: dict, where: str) -> tuple[str, int]:
    """A teacher's default ``(sampler name, steps)`` from ``config.json``, checked."""
    sampler = config.get("sampler", TEACHER_SAMPLER)
    require(isinstance(sampler, dict) and isinstance(sampler.get("name"), str),
            f"{where}: \"sampler\" must be an object with a \"name\" and \"steps\"")
    steps = sampler.get("steps")
    require(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1,
            f"{where}: \"sampler\" needs an integer \"steps\" >= 1, got {steps!r}")
    return sampler["name"], steps


def load_teacher(teacher: str, dataset: Dataset, schedule_name: str = "linear") -> tuple[Denoiser, VPSchedule, dict]:
    """``teacher`` is a teacher directory or ``"exact"`` (the mixture's exact epsilon, for ``mog`` data)."""
    if teacher == "exact":
        require(dataset.mixture is not None,
                f"--teacher exact needs Gaussian-mixture data (mog:...), not {dataset.spec}")
        schedule = VPSchedule.from_name(schedule_name)
        model = ExactTeacher(dataset.mixture, schedule, conditional=dataset.num_classes > 0)
        return model, schedule, {"teacher": "exact", "schedule": schedule.config}
    model, config = load_model_dir(teacher)
    require(config.get("kind") == "teacher",
            f"{teacher}: holds a {config.get('kind', 'unknown')} model, not a teacher")
    schedule = _schedule_of(config, f"{teacher}/config.json")
    shape = tuple(net_shape(model))
    require(shape == tuple(dataset.sample_shape),
            f"{teacher}: the teacher was trained on samples of shape {shape} but {dataset.spec} has "
            f"{tuple(dataset.sample_shape)}")
    return model.eval(), schedule, {"teacher": str(teacher), "schedule": schedule.config}


# ---------------------------------------------------------------------- distillation
def distill(
    method: Method, teacher: str, data: str | Dataset, out_dir: str | Path, train: TrainConfig,
    guidance: float = 1.0, cache_dir: str | Path | None = None, schedule_name: str = "linear",
    student_model: ModelConfig | None = None, progress: bool = True, accelerator: Any = None,
    teacher_compile: str = "auto", gen_batch: int | str = "auto",
) -> DistillResult:
    """Distil ``teacher`` (a directory or ``"exact"``) with ``method`` into ``out_dir``.

    The student starts from the teacher's weights when the teacher is a network, and from a fresh network
    (``student_model`` or the default for the data's shape) for the exact teacher. ``method`` itself is not
    changed: its "auto" values are resolved into a new method (``result.method``, what ``config.json`` records
    with the teacher NFEs spent).

    ``teacher_compile``: ``"auto"`` compiles the frozen teacher (static shapes, CUDA graphs) on CUDA for its
    pairs, eps_mu and x0 solves; ``"no"`` keeps it eager; ``"yes"`` asks for it anywhere (a CPU skips it with a
    notice). It changes the teacher's outputs only in the last bits.

    ``gen_batch``: the batch of the teacher's pool work (see :func:`distill_context`).
    """
    ctx = distill_context(teacher, data, out_dir, train, guidance=guidance, cache_dir=cache_dir,
                          schedule_name=schedule_name, student_model=student_model, progress=progress,
                          accelerator=accelerator, teacher_compile=teacher_compile, gen_batch=gen_batch)
    return run_method(method, ctx)


def distill_context(
    teacher: str, data: str | Dataset, out_dir: str | Path, train: TrainConfig, guidance: float = 1.0,
    cache_dir: str | Path | None = None, schedule_name: str = "linear", student_model: ModelConfig | None = None,
    progress: bool = True, accelerator: Any = None, teacher_compile: str = "auto", gen_batch: int | str = "auto",
) -> DistillContext:
    """The :class:`DistillContext` :func:`distill` hands its method: the data, the frozen teacher prepared for
    the device (and counted), the student's initialisation, the run's settings.

    ``gen_batch``: the batch the teacher's pool work is done at. ``"auto"``: on CUDA with a compiled teacher
    :data:`rayflow.models.speed.GEN_BATCH` rows per teacher call (calls are cut and padded to a few static shapes,
    so the compiled CUDA graphs replay instead of being captured for every new batch) and as many per pair-solver
    batch; elsewhere each pool's own batch (unchanged results). An integer asks for that batch; pools hold the
    same values whatever the batch (the randomness is drawn per shard, not per batch), up to kernel rounding.
    """
    require(math.isfinite(guidance) and (guidance >= 1.0 or guidance == 0.0),
            f"--guidance must be >= 1 (1 = no guidance) or 0, got {guidance}")
    require(gen_batch == "auto" or (isinstance(gen_batch, int) and not isinstance(gen_batch, bool) and gen_batch >= 1),
            f"gen_batch must be auto or an integer >= 1, got {gen_batch!r}")
    if teacher != "exact":
        require(not same_or_inside(out_dir, teacher),
                f"--out {out_dir} is the teacher's folder {teacher} or inside it; refusing to write over the teacher")
    dataset = load_dataset(data) if isinstance(data, str) else data
    net, schedule, info = load_teacher(teacher, dataset, schedule_name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if accelerator is not None:
        device = accelerator.device
    if isinstance(net, ExactTeacher):
        student_cfg = student_model or default_model_config(dataset.sample_shape, dataset.num_classes)
        # the student net is built by the method; its fresh weights then come from the seeded global RNG
        torch.manual_seed(train.seed)
        init = None
    else:
        student_cfg = ModelConfig.from_dict(net.config.to_dict())
        init = {k: v.detach().clone() for k, v in net.state_dict().items()}  # before the teacher is cast
    # the one place the frozen teacher is prepared (eval, no grad, bf16 weights and channels-last on CUDA)
    teacher_dtype = torch.bfloat16 if resolve_mixed_precision(train, device) == "bf16" else None
    frozen = prepare_frozen_teacher(net, device, dtype=teacher_dtype, compile=teacher_compile,
                                    cuda_graphs=teacher_compile, static_batch=gen_batch,
                                    force_layout=train.layout_optimization == "force",
                                    kernel_tuning=train.kernel_tuning)
    eps_teacher = as_epsilon(frozen, schedule)
    counting = CountingDenoiser(eps_teacher)
    out_dir = Path(out_dir)
    base = {"schedule": schedule.config, "data": dataset.spec, "teacher": info["teacher"],
            "guidance": guidance, "rayflow_version": __version__}
    return DistillContext(
        teacher=counting, schedule=schedule, dataset=dataset, train=train, out_dir=out_dir,
        student_config=student_cfg, student_init=init, guidance=guidance,
        cache_dir=Path(cache_dir) if cache_dir is not None else None, device=device, accelerator=accelerator,
        progress=progress, base_config=base, gen_batch=int(getattr(frozen, "static_batch", 0) or 0),
    )


def run_method(method: Method, ctx: DistillContext) -> DistillResult:
    """Resolve ``method``'s "auto" values for ``ctx`` (a new method; the caller's is left as it was), distil, and
    return the result with the method that trained it (the kit records the student directory as it trains)."""
    resolved = method.resolved(ctx)
    with RunDirectory(ctx.out_dir, is_main=ctx.is_main):
        result = resolved.distill(ctx)
    if result.method is None:
        result.method = resolved
    return result


def net_shape(model: Denoiser) -> tuple[int, ...]:
    """The sample shape a loaded network was built for (from its :class:`ModelConfig`)."""
    return tuple(model.config.sample_shape)


# ---------------------------------------------------------------------- generators
@dataclass
class FewStepModel:
    """A teacher (solved with a training-free sampler) or a distilled student (its method's sampler)."""

    model: Denoiser
    schedule: VPSchedule
    sample_shape: tuple[int, ...]
    num_classes: int
    data: str
    method: Method | None = None  # None for teachers
    default_sampler: str = "dpm++2m"
    default_steps: int = 25

    @property
    def name(self) -> str:
        return self.method.name if self.method is not None else "teacher"

    def nfe(self, steps: int, sampler: str | None = None) -> int:
        if self.method is not None:
            return self.method.nfe_for_steps(steps)
        return sampler_nfe(sampler or self.default_sampler, steps)

    @torch.no_grad()
    def generate(self, noise: torch.Tensor, steps: int | None = None, cond: Condition = None,
                 guidance: float = 1.0, sampler: str | None = None, batch_size: int | None = None) -> torch.Tensor:
        """Map ``noise`` (standard normal, shape ``[N, *sample_shape]``) to samples in model space."""
        require(tuple(noise.shape[1:]) == tuple(self.sample_shape),
                f"noise of shape {tuple(noise.shape[1:])} does not fit samples of shape {self.sample_shape}")
        steps = steps or self.default_steps
        require(steps >= 1, f"steps must be >= 1, got {steps}")
        require(self.method is None or sampler is None,
                f"{self.name} students use their own sampler; drop --sampler")
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        bs = batch_size or noise.shape[0]
        out = []
        for start in range(0, noise.shape[0], bs):
            x = noise[start:start + bs].to(device)
            c = None if cond is None else cond[start:start + bs].to(device)
            if self.method is None:
                y = solve_teacher(self.model, x, self.schedule, sampler or self.default_sampler, steps, cond=c,
                                  guidance=guidance)
            else:
                y = self.method.sample(self.model, x, self.schedule, steps, c, guidance)
            out.append(y.cpu())
        return torch.cat(out)


def load_generator(model: str | None = None, teacher: str | None = None, data: str | None = None,
                   schedule_name: str = "linear", device: str | torch.device = "cpu") -> FewStepModel:
    """``model=DIR`` (teacher or student directory), or ``teacher="exact"`` with ``data="mog:..."``."""
    if model is None:
        require(teacher == "exact" and data is not None, "give --model DIR, or --teacher exact with --data SPEC")
        dataset = load_dataset(data)
        net, schedule, _ = load_teacher("exact", dataset, schedule_name)
        return FewStepModel(net, schedule, tuple(dataset.sample_shape), dataset.num_classes, dataset.spec)
    require(teacher is None, f"give either --model or --teacher, not both (--model {model}, --teacher {teacher})")
    require(data is None, "--data applies to --teacher exact only; a --model directory records its own data")
    where = f"{model}/config.json"
    config = read_json(Path(model) / "config.json")
    kind = config.get("kind")
    require(kind in ("teacher", "student"), f"{where}: unknown model kind {kind!r}")
    network, config = load_model_dir(model, device=device)
    schedule = _schedule_of(config, where)
    shape = tuple(net_shape(network))
    if kind == "teacher":
        sampler_name, sampler_steps = _teacher_sampler_of(config, where)
        return FewStepModel(network.eval(), schedule, shape, network.num_classes, str(config.get("data", "")),
                            default_sampler=sampler_name, default_steps=sampler_steps)
    method_info = config.get("method")
    require(isinstance(method_info, dict) and isinstance(method_info.get("name"), str)
            and isinstance(method_info.get("config", {}), dict),
            f"{where}: a student needs a \"method\" object with a \"name\" and a \"config\" object")
    method_cls = get_method(method_info["name"])
    try:
        method = method_cls(method_cls.config_from_dict(method_info.get("config", {})))
    except (TypeError, ValueError) as exc:
        raise RayflowError(f"{model}/config.json: method config does not fit {method_cls.name}: {exc}") from exc
    student = method.wrap_student(network.eval(), schedule)
    return FewStepModel(student, schedule, shape, network.num_classes, config.get("data", ""), method=method,
                     default_steps=4)


#: the old name (it collided with ``torch.Generator``); kept for one release
Generator = FewStepModel

__all__ = ["FewStepModel", "Generator", "distill", "distill_context", "get_sampler", "load_generator", "load_teacher",
           "run_method", "train_teacher"]
