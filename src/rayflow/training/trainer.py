"""The :class:`Trainer`: the one training loop (see the package docstring, :mod:`rayflow.training`)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch

from rayflow.checkpoint import save_model_dir, unwrap_denoiser
from rayflow.errors import RayflowError, require
from rayflow.models.base import Denoiser
from rayflow.models.speed import (
    allow_recompiles,
    compile_network,
    has_convolutions,
    resolve_channels_last,
    to_channels_last,
)
from rayflow.training.config import (
    _CUDA_GRAPH_MODES,
    TrainConfig,
    micro_seed,
    resolve_compile,
    resolve_mixed_precision,
)
from rayflow.training.ema import EMA
from rayflow.training.launch import (
    _jsonl_tracker,
    _make_accelerator,
    _tensorboard_tracker,
    check_launch,
    distributed_state,
)
from rayflow.training.objectives import Objective
from rayflow.training.resume import CHECKPOINTS, TENSORBOARD_DIR, TRAIN_LOG, CheckpointMixin, _normalise, _notice
from rayflow.training.step_graph import StepGraph, step_graph_blocker


# ---------------------------------------------------------------------- the trainer
class TrainingStopped(RayflowError):
    """The run diverged (a non-finite loss, gradient or weight, or a loss blow-up) and was stopped; nothing was
    written for the bad interval, so the newest checkpoint is a good one."""


def _to_float(value: Any) -> float:
    return float(value.detach().float()) if isinstance(value, torch.Tensor) else float(value)


def _accumulate(sums: dict[str, tuple[Any, int]], logs: dict[str, Any]) -> None:
    """Add one step's logs to the interval's sums: tensors stay on their device (no host read), numbers as they
    are; a value that is neither (a string ...) is not averaged."""
    for key, value in logs.items():
        if torch.is_tensor(value) and value.numel() == 1:
            value = value.detach().float().reshape(())
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        total, count = sums.get(key, (0.0, 0))
        sums[key] = (total + value, count + 1)


def _interval_sums(trace: torch.Tensor, first: int, never: float) -> torch.Tensor:
    """``[loss sum, first step with a non-finite loss, first with a non-finite gradient norm]`` of an interval
    from its ``trace`` (``[steps, 2]``: each step's loss and gradient norm; ``first``: the interval's first step);
    ``never`` where every value is finite."""
    steps = torch.arange(trace.shape[0], device=trace.device, dtype=trace.dtype).unsqueeze(1) + first
    first_bad = torch.where(torch.isfinite(trace), never, steps).amin(dim=0)
    return torch.cat([trace[:, 0].sum().reshape(1), first_bad])


class Trainer(CheckpointMixin):
    """Train ``model`` on ``objective`` with accelerate; see the package docstring for files and guarantees.

    ``run_config`` (JSON-serialisable) describes the run: it is stored in checkpoints and in the final
    ``config.json`` and must match on resume (the lr, warm-up and clipping may change, with a notice). When it
    has no ``"model"`` entry and the model carries a :class:`~rayflow.models.ModelConfig` as ``model.config``,
    that is added so the output loads with :func:`rayflow.checkpoint.load_model_dir`.

    ``Trainer.callbacks`` (class-wide, for tools that cannot reach where a method builds its trainer, such as
    benchmarks and profilers): callables ``callback(trainer, event, step)`` with ``event`` one of ``"start"``
    (``step`` = the first step to run), ``"step"`` (after each optimizer step; ``step`` = steps done) and
    ``"end"``.
    """

    callbacks: ClassVar[list[Callable[[Trainer, str, int], None]]] = []

    def __init__(
        self,
        model: Denoiser,
        objective: Objective,
        config: TrainConfig,
        out_dir: str | Path,
        run_config: dict,
        accelerator: Any | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.objective = objective
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / CHECKPOINTS
        if accelerator is None:
            accelerator = _make_accelerator(resolve_mixed_precision(config, distributed_state().device))
        self.accelerator = accelerator
        self.device = accelerator.device
        check_launch(accelerator.num_processes)

        run_config = dict(run_config)
        model_cfg = getattr(model, "config", None)
        if "model" not in run_config and hasattr(model_cfg, "to_dict") and hasattr(model_cfg, "kind"):
            run_config["model"] = model_cfg.to_dict()
        try:
            self.run_config = _normalise(run_config)
        except (TypeError, ValueError) as exc:
            raise RayflowError(f"run_config must be JSON-serialisable: {exc}") from exc
        self.full_config = {**self.run_config, "train": _normalise(config.to_dict())}
        self._check_ranks_agree()

        model.to(self.device)
        self.channels_last = resolve_channels_last(config.channels_last, model, self.device)
        if self.channels_last:
            to_channels_last(model)
        self.ema = EMA(model, config.ema_decay) if config.ema_decay > 0 else None
        params = [p for p in model.parameters() if p.requires_grad]
        require(len(params) > 0, "the model has no trainable parameters")
        self.compiled = resolve_compile(config, self.device)
        mode = config.compile_mode
        mixed_precision = str(accelerator.mixed_precision)
        #: the whole step is captured as one CUDA graph (TrainConfig.step_graph; rayflow.training.step_graph)
        self.step_graph = False
        if config.step_graph != "no":
            blocker = step_graph_blocker(device=self.device, num_processes=accelerator.num_processes,
                                         accumulation=config.gradient_accumulation_steps,
                                         mixed_precision=mixed_precision, objective=objective)
            wanted = config.step_graph == "yes" or (self.compiled and mode in _CUDA_GRAPH_MODES)
            if wanted and blocker is None:
                self.step_graph = True
            elif config.step_graph == "yes":
                _notice(f"step_graph=yes cannot capture this step ({blocker}): the step runs eagerly")
        # fused AdamW: one kernel for all parameters instead of a dozen per tensor; CUDA only (on a CPU the
        # default single-tensor loop is kept, which also keeps CPU runs bit-identical to earlier versions).
        # A captured step's AdamW is capturable: its step counts stay on the device
        fused = all(p.device.type == "cuda" for p in params)
        optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay,
                                      **({"fused": True} if fused else {}),
                                      **({"capturable": True} if self.step_graph else {}))
        # not prepared: accelerate's scheduler wrapper steps num_processes times per step
        self.lr_scheduler = self._make_lr_scheduler(optimizer)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self._prepared = self.model  # the DDP module (before compile), for no_sync
        # accelerate's own optimizer wrapper, on one device or under DDP, adds nothing to a step but the loss
        # scaler's work (checked per step); the trainer syncs gradients itself (no accelerator.accumulate). Other
        # backends (XLA, DeepSpeed, FSDP ...) and other wrappers keep accelerate's step.
        from accelerate.optimizer import AcceleratedOptimizer
        from accelerate.utils import DistributedType

        self._plain_optimizer_step = type(self.optimizer) is AcceleratedOptimizer and getattr(
            accelerator, "distributed_type", None) in (DistributedType.NO, DistributedType.MULTI_GPU,
                                                       DistributedType.MULTI_CPU)
        self._params = params
        if self.step_graph and mode in _CUDA_GRAPH_MODES:  # the step's graph holds the network's kernels
            mode = "max-autotune-no-cudagraphs" if mode == "max-autotune" else "default"
        if self.compiled and mode in _CUDA_GRAPH_MODES and self.device.type != "cuda":
            _notice(f"compile_mode={mode} replays CUDA graphs, which need a GPU: compiling without them")
            mode = "max-autotune-no-cudagraphs" if mode == "max-autotune" else "default"
        if self.compiled and mode in _CUDA_GRAPH_MODES and config.gradient_accumulation_steps > 1:
            # the micro-batches' gradients accumulate into graph outputs that the next replay would overwrite
            _notice(f"compile_mode={mode} does not combine with gradient_accumulation_steps > 1: compiling "
                    "without CUDA graphs")
            mode = "max-autotune-no-cudagraphs" if mode == "max-autotune" else "default"
        if config.kernel_tuning != "none" and self.device.type != "cuda":
            _notice(f"kernel_tuning={config.kernel_tuning} tunes Inductor's GPU kernels: ignored on "
                    f"{self.device.type}")
        #: the step is replayed from CUDA graphs: each step must tell torch that a new iteration begins
        self.cuda_graphs = self.compiled and mode in _CUDA_GRAPH_MODES
        #: inductor's layout optimisation forced (TrainConfig.layout_optimization): CUDA convolutional networks
        self.force_layout = (self.compiled and config.layout_optimization == "force" and self.device.type == "cuda"
                             and has_convolutions(model))
        if self.compiled:
            allow_recompiles()  # a new Trainer of an already compiled network class must not find torch's limit spent
            self.model = compile_network(self.model, mode, force_layout=self.force_layout,
                                         kernel_tuning=config.kernel_tuning if self.device.type == "cuda" else "none")
        self.mixed_precision = mixed_precision
        self._graph: StepGraph | None = None  # made by train(), after a resume has loaded the state
        self.loss_history: list[float] = []  # interval mean losses, for the divergence check
        self.stats: dict[str, float] = {}  # filled by train(): steps, samples, seconds of the last run

    def _make_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """diffusers' ``get_scheduler``: linear warm-up from 0 over ``warmup_steps``, then constant, linear or
        cosine (to 0 at ``max_steps``)."""
        from diffusers.optimization import get_scheduler

        cfg = self.config
        name = cfg.lr_schedule
        if name == "constant" and cfg.warmup_steps > 0:
            name = "constant_with_warmup"
        return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=max(cfg.max_steps, cfg.warmup_steps + 1))

    def _check_ranks_agree(self) -> None:
        """Every process must run the same configuration (one rank launched with other options would silently
        train on other targets and write the same checkpoints)."""
        acc = self.accelerator
        if acc.num_processes <= 1:
            return
        digest = hashlib.blake2b(json.dumps(self.full_config, sort_keys=True).encode(), digest_size=7).digest()
        mine = torch.tensor([int.from_bytes(digest, "little")], dtype=torch.int64, device=self.device)
        every = acc.gather(mine)
        require(bool((every == every[0]).all()),
                f"the {acc.num_processes} processes of this launch were given different configurations; "
                "launch every rank with the same command")

    # ------------------------------------------------------------------ properties
    @property
    def raw_model(self) -> Denoiser:
        """The trained network, without DDP / compile wrappers (its forward may still autocast)."""
        return unwrap_denoiser(self.model)

    def _final_model(self) -> Denoiser:
        if self.ema is not None:
            model = self.ema.module.eval()
        else:
            model = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False,
                                                  keep_torch_compile=False).eval()
        if self.channels_last:  # hand back the ordinary layout: callers may .view() its outputs' inputs
            model.to(memory_format=torch.contiguous_format)
        return model

    def _write_final(self, steps_done: int) -> Denoiser:
        model = self._final_model()
        if self.accelerator.is_main_process:
            save_model_dir(self.out_dir, model, {**self.run_config, "train": self.config.to_dict(),
                                                 "steps_done": steps_done})
        self.accelerator.wait_for_everyone()
        return model

    # ------------------------------------------------------------------ the loop
    def progress_label(self) -> str:
        """The progress bar's name: the method (and stage) from the run config, so parallel bars tell apart."""
        method = self.run_config.get("method")
        name = method.get("name") if isinstance(method, dict) else None
        stage = self.run_config.get("stage")
        label = " ".join(str(p) for p in (name, None if stage is None else f"stage {stage}") if p)
        return f"{label}: train" if label else "train"

    def _start_trackers(self) -> list[Any]:
        """The JSONL tracker (train_log.jsonl) and, when installed, TensorBoard, added to the accelerator's own
        trackers for this run, so ``accelerator.log`` reaches them and any the caller configured."""
        if not (self.accelerator.is_main_process and self.config.log_every):
            return []
        mine = [_jsonl_tracker(self.out_dir / TRAIN_LOG)]
        tb = _tensorboard_tracker(self.out_dir / TENSORBOARD_DIR)
        if tb is not None:
            mine.append(tb)
        self.accelerator.trackers.extend(mine)
        return mine

    def _stop_trackers(self, mine: list[Any]) -> None:
        for tracker in mine:
            if tracker in self.accelerator.trackers:
                self.accelerator.trackers.remove(tracker)
            try:
                tracker.finish()
            except Exception:  # noqa: BLE001 - closing a log writer must not hide the run's own outcome
                pass

    def _micro_step(self, step: int, micro: int, n: int) -> tuple[torch.Tensor, dict[str, Any], torch.Generator]:
        """One forward/backward of micro-batch ``micro`` of ``n``; returns the loss (detached, on the device), the
        objective's logs and the generator it drew from."""
        acc, cfg = self.accelerator, self.config
        seed = micro_seed(cfg.seed, step, acc.process_index, micro)
        self._seed_global(seed)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        if self.cuda_graphs:  # the previous step's graph outputs (loss, logs) are dead or already read
            torch.compiler.cudagraph_mark_step_begin()
        # gradients are all-reduced once per step, on the last micro-batch
        sync = micro == n - 1 or acc.num_processes == 1
        with nullcontext() if sync else acc.no_sync(self._prepared):
            with acc.autocast():
                out = self.objective(self.model, step, generator)
            acc.backward(out.loss / n if n > 1 else out.loss)
        return out.loss.detach().float().reshape(()), out.logs, generator

    def _graph_body(self, step: int, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """The step that :class:`StepGraph` captures: the objective, backward, clipping, AdamW with the lr read
        from ``self._graph.lr``, and the EMA with its weight read from ``self._graph.ema_weight``; returns the
        loss, the gradient norm (None without clipping) and the objective's logs."""
        cfg, graph = self.config, self._graph
        assert graph is not None
        with self.accelerator.autocast():
            out = self.objective(self.model, step, generator)
        out.loss.backward()
        grad_norm = (torch.nn.utils.clip_grad_norm_(self._params, cfg.grad_clip)
                     if cfg.grad_clip > 0 else None)
        optimizer = self.optimizer.optimizer if self._plain_optimizer_step else self.optimizer
        groups = optimizer.param_groups
        host_lrs = [group["lr"] for group in groups]
        try:  # the kernel reads the lr tensor; the groups keep their float lr for the schedule and checkpoints
            for group in groups:
                group["lr"] = graph.lr
            optimizer.step()
        finally:
            for group, lr in zip(groups, host_lrs):
                group["lr"] = lr
        if self.ema is not None:
            self.ema.update_with(self.raw_model, graph.ema_weight)
        return out.loss.detach().float().reshape(()), grad_norm, out.logs

    def _make_graph(self, capture: bool) -> StepGraph:
        """The step graph of this run; ``capture=False`` runs the same body eagerly (a CPU)."""
        require(len(self.optimizer.param_groups) == 1, "step_graph supports one optimizer parameter group")
        return StepGraph(self._graph_body, self.device, lr=self._next_lr(), ema_weight=self._next_ema_weight(),
                         before_capture=lambda: self.optimizer.zero_grad(set_to_none=True), capture=capture)

    def _next_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _next_ema_weight(self) -> float:
        return 1.0 - self.ema.current_decay() if self.ema is not None else 0.0

    def _graph_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any], torch.Generator]:
        """One step through :class:`StepGraph` (eager warm-up, then one capture, then replays)."""
        graph = self._graph
        assert graph is not None
        seed = micro_seed(self.config.seed, step, self.accelerator.process_index, 0)
        self._seed_global(seed)
        graph.set_values(self._next_lr(), self._next_ema_weight())
        was_captured, failed = graph.captured, graph.failed
        loss, grad_norm, logs = graph(step, seed)
        if not graph.captured:  # eager warm-up (or after a failed capture): gradients are not the graph's
            self.optimizer.zero_grad(set_to_none=True)
        if graph.failed is not None and failed is None:
            _notice(f"step_graph: capturing the step failed ({graph.failed}): the run goes on eagerly")
            self.stats["step_graph_failed"] = graph.failed
            self.stats["step_graph_failed_traceback"] = graph.failed_traceback
        elif graph.captured and not was_captured:
            self.stats["step_graph_captured_at"] = step
        if self.ema is not None:
            self.ema.step += 1
        return loss, grad_norm, logs, graph.generator

    def _seed_global(self, seed: int) -> None:
        """Seed the global generators a step can reach (anything drawing without the step's generator, such as
        dropout): the CPU's and the training device's. ``torch.manual_seed`` would also queue seeds for every
        lazily initialised backend (XPU, MTIA), formatting a stack trace for each, every step."""
        if self.device.type not in ("cpu", "cuda"):  # other backends (MPS ...): every generator, as torch seeds
            torch.manual_seed(seed)
            return
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)

    def _optimizer_step(self) -> None:
        """The optimizer step. On one device or under DDP without a loss scaler (fp16), accelerate's wrapper only
        forwards it, after looking for an optional package on disk twice (accelerate 1.15): the wrapped optimizer
        is stepped directly then."""
        if self._plain_optimizer_step and self.optimizer.scaler is None:
            self.optimizer.optimizer.step()
        else:
            self.optimizer.step()

    def _check(self, sums: torch.Tensor, steps: int, first: int, last: int) -> float:
        """Read the device-side accumulators (the one host synchronisation of an interval) and stop a diverged
        run. ``sums = [loss sum, first step with a non-finite loss, first with a non-finite gradient norm]`` on
        this process; returns the interval's mean loss over all processes."""
        acc, cfg = self.accelerator, self.config
        weights_ok = torch.stack([torch.isfinite(n) for n in torch._foreach_norm(self._params)]).all()
        local = torch.cat([sums.double(), weights_ok.double().reshape(1)]).reshape(1, -1)
        every = (acc.gather(local) if acc.num_processes > 1 else local).cpu()
        mean = float(every[:, 0].sum()) / (steps * every.shape[0])
        bad_loss, bad_grad = int(every[:, 1].min()), int(every[:, 2].min())
        where = self._checkpoint_note  # listed only when the run is stopped
        if bad_loss <= last:
            raise TrainingStopped(f"step {bad_loss}: the loss is {'nan' if math.isnan(mean) else 'inf'} "
                                  f"(diverged); {where()}")
        if bad_grad <= last:
            raise TrainingStopped(f"step {bad_grad}: the gradient norm is not finite (diverged); {where()}")
        if not bool(every[:, 3].all()):
            raise TrainingStopped(f"steps {first}-{last}: the weights are no longer finite (diverged); {where()}")
        if cfg.divergence_factor and self.loss_history:
            median = statistics.median(self.loss_history)
            if mean > cfg.divergence_factor * median:
                raise TrainingStopped(
                    f"steps {first}-{last}: the mean loss {mean:.4g} is over {cfg.divergence_factor:g}x the run's "
                    f"median so far ({median:.4g}): diverged; {where()}")
        self.loss_history.append(mean)
        return mean

    def _checkpoint_note(self) -> str:
        found = self._list_checkpoints()
        remedy = "a lower lr, more warmup_steps or grad_clip > 0 (these may change on resume)"
        if not found:
            return f"no checkpoint was written yet: start again with {remedy}"
        return f"the newest checkpoint, {found[-1][1].name}, is intact: resume from it with {remedy}"

    def train(self) -> Denoiser:
        """Train to ``config.max_steps``, resuming from ``out_dir/checkpoints`` if present; returns the EMA model
        (or the raw model if EMA is off), unwrapped, in eval mode.

        At the end writes ``out_dir/model.safetensors`` + ``out_dir/config.json`` via
        :func:`~rayflow.checkpoint.save_model_dir` (weights = EMA), with ``run_config`` as the config plus
        ``"train"`` and ``"steps_done"``. A diverged run (see the module docstring) raises
        :class:`TrainingStopped`, naming the step, before anything is written for the interval.
        """
        from rayflow.progress import tqdm

        acc, cfg = self.accelerator, self.config
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.ckpt_dir.is_dir():
                for stale in self.ckpt_dir.glob(".tmp-step-*"):  # debris of a crash mid-checkpoint
                    shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()

        start = 0
        ckpt = self.find_checkpoint()
        if ckpt is not None:
            start = self._load_checkpoint(ckpt)
            if acc.is_main_process:
                self._trim_log(start)
        if start >= cfg.max_steps:
            return self._write_final(start)

        self.model.train()
        self.stats = {}
        # made after a resume has loaded the optimizer, so the capture sees the state it will update
        self._graph = self._make_graph(capture=self.device.type == "cuda") if self.step_graph else None
        n = cfg.gradient_accumulation_steps
        per_step = cfg.batch_size * n * acc.num_processes
        big = float(cfg.max_steps + 1)
        # each step's loss and gradient norm, on the device: one small copy per value and step; an interval's
        # sums and first non-finite steps are reduced from it at the interval's one host read (_interval_sums)
        trace = torch.zeros(cfg.check_every, 2, device=self.device)
        log_sums: dict[str, tuple[Any, int]] = {}  # the objective's logs summed over the interval (on the device)
        clip = cfg.grad_clip > 0
        check_grad = clip and self.mixed_precision != "fp16"  # fp16 skips inf steps on purpose
        trackers = self._start_trackers()
        bar = tqdm(total=cfg.max_steps, initial=start, desc=self.progress_label(), dynamic_ncols=True,
                   disable=not (cfg.progress and acc.is_main_process))
        for callback in list(Trainer.callbacks):
            callback(self, "start", start)
        t0 = time.time()
        t_interval, interval_first = t0, start
        try:
            for step in range(start, cfg.max_steps):
                if self._graph is not None:
                    loss, grad_norm, logs, generator = self._graph_step(step)
                    self.lr_scheduler.step()
                else:
                    loss = None
                    for micro in range(n):
                        micro_loss, logs, generator = self._micro_step(step, micro, n)
                        loss = micro_loss if loss is None else loss + micro_loss
                    if n > 1:
                        loss = loss / n
                    grad_norm = acc.clip_grad_norm_(self._params, cfg.grad_clip) if clip else None
                    self._optimizer_step()
                    if not acc.optimizer_step_was_skipped:
                        self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.ema is not None:
                        self.ema.update(self.raw_model)
                if hasattr(self.objective, "after_step"):
                    logs = {**logs, **(self.objective.after_step(self.model, step, generator) or {})}
                _accumulate(log_sums, logs)
                # no host synchronisation: the checks below read these once per interval
                row = step - interval_first
                trace[row, 0].copy_(loss)
                if check_grad and torch.is_tensor(grad_norm):
                    trace[row, 1].copy_(grad_norm)
                steps_done = step + 1
                bar.update(1)
                for callback in list(Trainer.callbacks):
                    callback(self, "step", steps_done)
                log_now = bool(cfg.log_every) and (steps_done % cfg.log_every == 0 or steps_done == cfg.max_steps)
                save_now = steps_done == cfg.max_steps or bool(
                    cfg.checkpoint_every and steps_done % cfg.checkpoint_every == 0)
                if log_now or save_now or steps_done % cfg.check_every == 0:
                    sums = _interval_sums(trace[:steps_done - interval_first], interval_first, big)
                    mean = self._check(sums, steps_done - interval_first, interval_first, step)
                    now = time.time()
                    if log_now:
                        values = {k: _to_float(v) for k, v in logs.items()}
                        means = {k: _to_float(total) / count for k, (total, count) in log_sums.items()}
                        record = {"step": steps_done, "loss": _to_float(loss), "loss_mean": mean, "logs": values,
                                  "logs_mean": means,
                                  "lr": float(self.lr_scheduler.get_last_lr()[0]), "time": round(now - t0, 3),
                                  "samples_per_s": round(per_step * (steps_done - interval_first)
                                                         / max(now - t_interval, 1e-9), 1)}
                        if grad_norm is not None:
                            record["grad_norm"] = _to_float(grad_norm)
                        if acc.is_main_process:
                            acc.log(record, step=steps_done)
                        bar.set_postfix({"loss": f"{record['loss']:.4g}",
                                         **{k: f"{v:.4g}" for k, v in values.items()}}, refresh=False)
                    log_sums = {}  # (trace needs no reset: each step of the next interval writes its own row)
                    t_interval, interval_first = now, steps_done
                if save_now:
                    self._save_checkpoint(steps_done)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.time() - t0
            self.stats.update({"steps": cfg.max_steps - start, "samples": (cfg.max_steps - start) * per_step,
                               "seconds": seconds})
            for callback in list(Trainer.callbacks):
                callback(self, "end", cfg.max_steps)
        finally:
            if self._graph is not None:  # the graph's gradients and memory pool go with it
                self.optimizer.zero_grad(set_to_none=True)
                self._graph = None
            bar.close()
            self._stop_trackers(trackers)
        return self._write_final(cfg.max_steps)
