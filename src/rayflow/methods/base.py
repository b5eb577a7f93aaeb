"""What every distillation method shares: the context it is run in and the interface it implements.

A method is one file under ``rayflow/methods/`` with a :class:`Method` subclass and its config dataclass,
registered in ``rayflow/methods/__init__.py``. It builds its targets (pairs, eps_mu ...) with the shared
caches and samplers, trains with the shared :class:`~rayflow.training.Trainer`, and samples with its own
few-step sampler. Nothing else in the package changes when a method is added.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers import SchedulerMixin

from rayflow.errors import RayflowError, require
from rayflow.models import Condition, Denoiser, ModelConfig, build_model
from rayflow.models.counting import CountingDenoiser
from rayflow.schedulers import run_scheduler
from rayflow.schedules import VPSchedule

if TYPE_CHECKING:  # typing only: importing accelerate, the data and the trainer modules costs start-up time
    from accelerate import Accelerator

    from rayflow.data import Dataset
    from rayflow.training import Objective, TrainConfig


@dataclass
class DistillContext:
    """Everything a method needs to distil a teacher; built by :func:`rayflow.distillation.distill`.

    It also keeps the run's teacher-NFE account (:attr:`teacher_nfe`): every teacher evaluation made through it
    counts, except those spent building a pool, which count as the whole pool's recorded cost instead
    (:meth:`pool_cost`) - so a pool read back from a cache costs what it cost to make, and an interrupted and
    resumed run reports what an uninterrupted one does.
    """

    teacher: CountingDenoiser  # frozen, in eval mode, on ``device``
    schedule: VPSchedule
    dataset: Dataset
    train: TrainConfig  # student updates, batch size, lr ... shared by all methods
    out_dir: Path
    student_config: ModelConfig  # the network the student uses (the teacher's, or a fresh one for exact teachers)
    student_init: dict[str, torch.Tensor] | None  # teacher weights to initialise from (None: fresh init)
    guidance: float = 1.0  # teacher CFG scale used when making targets and pairs
    cache_dir: Path | None = None  # where pair / target caches live (None: computed in memory)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    accelerator: Accelerator | None = None
    progress: bool = True
    base_config: dict[str, Any] = field(default_factory=dict)  # schedule, data, teacher ... for config.json
    # rows per pool-building batch (pair solves; the frozen teacher's static batch): 0 = each pool's own default
    gen_batch: int = 0
    _charged: int = field(default=0, init=False, repr=False)  # pool costs, as recorded
    _in_pools: int = field(default=0, init=False, repr=False)  # evaluations made while building those pools
    _start: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self._start = int(getattr(self.teacher, "evaluations", 0))

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    # ------------------------------------------------------------------ the teacher-NFE account
    @property
    def teacher_nfe(self) -> int:
        """Per-sample teacher evaluations this distillation costs: its pools' recorded costs plus every other
        teacher evaluation made since the context was built (online targets, measurements)."""
        live = int(getattr(self.teacher, "evaluations", 0)) - self._start - self._in_pools
        return self._charged + live

    def charge(self, nfe: int) -> None:
        """Add teacher evaluations spent outside this run (e.g. by earlier stages reused from disk)."""
        self._charged += int(nfe)

    @contextmanager
    def pool_cost(self, nfe: int | None = None) -> Iterator[list[int]]:
        """Count the block's teacher evaluations as a pool's recorded cost, not live: ``with ctx.pool_cost() as
        cost: ...; cost.append(pool.nfe)`` (or ``pool_cost(nfe)`` when the cost is known up front)."""
        before = int(getattr(self.teacher, "evaluations", 0))
        cost: list[int] = [] if nfe is None else [int(nfe)]
        yield cost
        self._in_pools += int(getattr(self.teacher, "evaluations", 0)) - before
        self._charged += sum(cost)

    # ------------------------------------------------------------------ students and stages
    def build_student(self, config: ModelConfig | None = None, init: Denoiser | None = None) -> Denoiser:
        """The student every method starts from: ``config`` (default: the teacher's architecture) initialised from
        the run's seed alone, then given ``init``'s weights (an earlier stage) or the teacher's (``student_init``).

        Seeding a forked RNG makes two runs of one configuration the same run, and a resumed run match an
        uninterrupted one, whatever the global RNG holds.
        """
        from rayflow.checkpoint import unwrap_denoiser

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.train.seed))
            net = build_model(config or self.student_config)
        if init is not None:
            net.load_state_dict(unwrap_denoiser(init).state_dict())
        elif self.student_init is not None:
            net.load_state_dict({k: v.clone() for k, v in self.student_init.items()})
        return net.to(self.device)

    def train_stage(self, method: Method, network: Denoiser, objective: Objective, steps: int, out_dir: Path,
                    run_extra: dict[str, Any] | None = None) -> Denoiser:
        """Train ``network`` on ``objective`` for ``steps`` updates into ``out_dir`` with the shared trainer;
        ``run_extra`` is added to (and may override keys of) the run's ``config.json``.

        The stage that writes the run's own directory (``out_dir == ctx.out_dir``) is the student: its record is
        completed here (:meth:`record_student`), once, by the process that writes files.
        """
        from rayflow.training import Trainer

        train = dataclasses.replace(self.train, max_steps=int(steps))
        run_config = {**self.run_config(method), **(run_extra or {})}
        trained = Trainer(network, objective, train, out_dir, run_config, accelerator=self.accelerator).train()
        if Path(out_dir) == Path(self.out_dir):
            self.record_student(method, trained)
        return trained

    def record_student(self, method: Method, network: Denoiser) -> None:
        """Complete the student directory: the teacher NFEs spent (known only once training has run, as online
        targets are counted live) in ``config.json``, and the diffusers scheduler that samples the student in
        ``scheduler/scheduler_config.json`` (so any diffusers-style loop can drive it)."""
        from rayflow.checkpoint import read_json, write_json_atomic

        if not self.is_main:
            return
        path = Path(self.out_dir) / "config.json"
        if path.is_file():
            # not part of the trainer's run config: that must match on resume, and online costs grow in training
            write_json_atomic({**read_json(path), "teacher_nfe": self.teacher_nfe}, path)
        method.make_scheduler(self.schedule, method.raw_network(network)).save_config(
            str(Path(self.out_dir) / "scheduler"))

    def run_config(self, method: Method, **extra: Any) -> dict[str, Any]:
        """The ``config.json`` of a student directory: enough to rebuild and sample it."""
        return {
            **self.base_config,
            "kind": "student",
            "model": self.student_config.to_dict(),
            "method": {"name": method.name, "config": dataclasses.asdict(method.config)},
            **extra,
        }

    def cache_path(self, name: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / name


@dataclass
class DistillResult:
    student: Denoiser  # ready to sample with ``method.sample`` (already wrapped by ``wrap_student``)
    teacher_nfe: int  # per-sample teacher evaluations spent, pair generation included
    logs: dict[str, Any] = field(default_factory=dict)
    #: the method as it trained the student: its config with every "auto" value resolved (what config.json holds);
    #: sample the student with this one
    method: Method | None = None


class Method:
    """Base class of a distillation method. Subclasses set ``name`` and ``config_class``."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    #: which NFEs the method's sampler supports well (the demo and benchmark evaluate these)
    nfes: ClassVar[tuple[int, ...]] = (1, 2, 4, 8)
    #: the name tables and plots show (the paper's)
    display_name: ClassVar[str] = ""
    #: options of ``rayflow demo`` (pools sized for its few hundred student steps; defaults are for real runs)
    demo_options: ClassVar[dict[str, str]] = {"pool_size": "4096"}
    #: options of a CPU dry run (``benchmarks/fashion_mnist.py --tiny``, tests): the smallest pools that work
    tiny_options: ClassVar[dict[str, str]] = {"pool_size": "64"}
    #: benchmark rows of this method: row name -> options (ablations are opt-in rows of the method's own)
    benchmark_variants: ClassVar[dict[str, dict[str, str]] | None] = None
    #: renamed option values: option -> {old value: new value}; ``--option`` takes the old value with a
    #: deprecation warning (for one release), an older ``config.json`` silently
    value_aliases: ClassVar[dict[str, dict[str, str]]] = {}

    @classmethod
    def variants(cls) -> dict[str, dict[str, str]]:
        """The benchmark rows of this method (by default one, named after it, with its default options)."""
        return dict(cls.benchmark_variants) if cls.benchmark_variants is not None else {cls.name: {}}

    @classmethod
    def title(cls) -> str:
        return cls.display_name or cls.name

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.config_class()
        self.validate()

    def validate(self) -> None:
        """Check the config (never change it); raise :class:`RayflowError` with a one-line message on bad values."""

    # ------------------------------------------------------------------ resolution of "auto" values
    def resolve(self, ctx: DistillContext) -> Any:
        """The config with every value that depends on the run (``"auto"``) decided for ``ctx``: a new object,
        ``self.config`` is left as it is. What is saved with the student, so loading one needs no resolution."""
        return self.config

    def resolved(self, ctx: DistillContext) -> Method:
        """A new method of this kind with :meth:`resolve`'s config (the one :func:`~rayflow.distillation.distill`
        runs)."""
        return type(self)(self.resolve(ctx))

    def unresolved(self) -> list[str]:
        """Options still waiting for :meth:`resolve` (by default: those whose value is ``"auto"``)."""
        flat = config_fields(self.config_class)
        return sorted(name for name, path in flat.items() if _get_path(self.config, path) == "auto")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Method:
        """Build from ``--option key=value`` pairs (strings are converted to the field types).

        Keys are flat even when the config nests its options in sections (:func:`config_fields`).
        """
        fields = config_fields(cls.config_class)
        default = cls.config_class()
        kwargs: dict[str, Any] = {}
        for key, value in options.items():
            key = key.replace("-", "_")
            if key in DEPRECATED_OPTIONS and key not in fields and DEPRECATED_OPTIONS[key] in fields:
                print(f"rayflow: warning: --option {key} is deprecated, use {DEPRECATED_OPTIONS[key]} "
                      f"(or --pool-size); the old name goes in the next release", file=sys.stderr)
                key = DEPRECATED_OPTIONS[key]
            require(key in fields, f"--method {cls.name}: unknown option {key!r}; valid: {', '.join(sorted(fields))}")
            new = cls.value_aliases.get(key, {}).get(value) if isinstance(value, str) else None
            if new is not None:
                print(f"rayflow: warning: --option {key}={value} is deprecated, use {key}={new}; the old value "
                      f"goes in the next release", file=sys.stderr)
                value = new
            kwargs[key] = _coerce(value, _get_path(default, fields[key]), f"--method {cls.name}: option {key}")
        return cls(config_from_dict(cls.config_class, kwargs))

    @classmethod
    def config_from_dict(cls, mapping: dict[str, Any]) -> Any:
        """The config saved in a student's ``config.json`` (nested by section, or flat as older runs wrote it;
        renamed option names and values read silently)."""
        return config_from_dict(cls.config_class, mapping, cls.value_aliases)

    def distill(self, ctx: DistillContext) -> DistillResult:  # pragma: no cover - abstract
        """Distil ``ctx.teacher``; called on a resolved method (:meth:`resolved`)."""
        raise NotImplementedError

    def nfe_for_steps(self, steps: int) -> int:
        """Network evaluations of a ``steps``-step sample: one per step for every sampler here (a method whose
        sampler evaluates more overrides this)."""
        return int(steps)

    def wrap_student(self, network: Denoiser, schedule: VPSchedule) -> Denoiser:
        """Turn the trained network into the model :meth:`sample` expects (identity unless reparameterised)."""
        return network

    def raw_network(self, student: Denoiser) -> Denoiser:
        """The network inside :meth:`wrap_student`'s wrapper: what is saved on disk and what a scheduler drives."""
        return student

    def make_scheduler(self, schedule: VPSchedule, network: Denoiser | None = None) -> SchedulerMixin:
        """The diffusers scheduler that samples a trained student of this method (:mod:`rayflow.schedulers`).

        ``network`` (the raw student) is consulted only where the config does not say what the network outputs.
        """
        raise NotImplementedError(f"{type(self).__name__} has no scheduler")  # pragma: no cover - abstract

    def sample(self, student: Denoiser, noise: torch.Tensor, schedule: VPSchedule, steps: int,
               cond: Condition = None, guidance: float = 1.0) -> torch.Tensor:
        """``steps``-step samples from ``noise``: the one loop over this method's scheduler (CFG inside)."""
        require(int(steps) >= 1, f"{self.name}: steps must be >= 1, got {steps}")
        check_resolved(self)
        network = self.raw_network(student)
        return run_scheduler(network, self.make_scheduler(schedule, network), noise, int(steps), cond, guidance)


def check_resolved(method: Method) -> None:
    """Refuse to sample with a config whose run-dependent values were never decided (a method built by hand and
    not distilled); a distilled or loaded student's method is always resolved."""
    left = method.unresolved()
    require(not left, f"{method.name}: {', '.join(left)} still 'auto'; these are decided when distilling "
            f"(use the DistillResult's method, or load the student directory)")


def _section_class(f: dataclasses.Field) -> type | None:
    """The dataclass of a config section (a field whose default factory is a dataclass), else None."""
    factory = f.default_factory
    return factory if isinstance(factory, type) and dataclasses.is_dataclass(factory) else None


def config_fields(config_class: type) -> dict[str, tuple[str, ...]]:
    """Flat option name -> attribute path, through nested sections: ``{"sigma": ("ray", "sigma"), ...}``.

    Option names stay flat (``--option sigma=0.1``) whatever the nesting, so they must be unique across sections.
    """
    out: dict[str, tuple[str, ...]] = {}
    for f in dataclasses.fields(config_class):
        sub = _section_class(f)
        if sub is None:
            out[f.name] = (f.name,)
            continue
        for name, path in config_fields(sub).items():
            if name in out:
                raise TypeError(f"{config_class.__name__}: option {name!r} appears in two sections")
            out[name] = (f.name, *path)
    return out


def _get_path(obj: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        obj = getattr(obj, name)
    return obj


def config_from_dict(config_class: type, mapping: dict[str, Any],
                     value_aliases: dict[str, dict[str, str]] | None = None) -> Any:
    """Build a (possibly nested) config from flat option names, nested section dicts, or a mix of the two.

    Renamed options (:data:`DEPRECATED_OPTIONS`) and renamed values (``value_aliases``: option -> {old: new}) are
    read under their new names. Unknown names raise ``TypeError`` (as the dataclass constructor would).
    """
    fields = config_fields(config_class)
    sections = {f.name: _section_class(f) for f in dataclasses.fields(config_class)}
    flat: dict[str, Any] = {}
    for key, value in _renamed(mapping, fields).items():
        if sections.get(key) is not None and isinstance(value, dict):
            for sub_key, sub_value in _renamed(value, fields).items():  # a section as dataclasses.asdict writes it
                if sub_key not in fields or fields[sub_key][0] != key:
                    raise TypeError(f"unexpected option {sub_key!r} in section {key!r}")
                flat[sub_key] = sub_value
        elif key in fields:
            flat[key] = value
        else:
            raise TypeError(f"unexpected option {key!r}")
    for key, renames in (value_aliases or {}).items():
        if isinstance(flat.get(key), str):
            flat[key] = renames.get(flat[key], flat[key])
    return _build(config_class, flat)


#: old option names -> the one name every method now uses (old config.json files are read silently)
DEPRECATED_OPTIONS = {"num_pairs": "pool_size", "cache_size": "pool_size"}


def _renamed(mapping: dict[str, Any], fields: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    return {DEPRECATED_OPTIONS[k] if (k in DEPRECATED_OPTIONS and k not in fields and DEPRECATED_OPTIONS[k] in fields)
            else k: v for k, v in mapping.items()}


def _build(config_class: type, flat: dict[str, Any]) -> Any:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(config_class):
        sub = _section_class(f)
        if sub is not None:
            kwargs[f.name] = _build(sub, flat)
        elif f.name in flat:
            value = flat[f.name]
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value  # JSON wrote a tuple as a list
    return config_class(**kwargs)


def _coerce(value: Any, default: Any, what: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        if isinstance(default, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            return tuple(type(default[0])(v) if default else int(v) for v in value.replace("/", ",").split(",") if v)
    except ValueError as exc:
        raise RayflowError(f"{what}: cannot read {value!r} as {type(default).__name__}") from exc
    return value
