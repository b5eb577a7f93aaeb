"""The whole training step as one CUDA graph (``TrainConfig.step_graph``).

A step of the Fashion-MNIST student needs about 10 ms of GPU time, and the host work of an ordinary step (the
objective's small operations, two graph replays of the compiled network, clipping, the optimizer, the EMA) comes
close to that on the leased H200 hosts, so the rate followed the host's speed (BENCHMARKS §6.7). Captured whole,
a step costs the host a reseed and one replay, and runs at the GPU's pace::

    seed the step's generator (and the global ones)         host: a hash and two seeds
    replay:  loss = objective(model, step, generator)        draws from the registered generator
             backward
             g = clip(grads, grad_clip)                      foreach, no host read
             AdamW (fused, capturable; lr read from a tensor the host refills when the schedule moves it)
             ema += (1 - d_n) (params - ema)                 d_n read from a tensor likewise
    host:    the trace row, the interval's log sums, the lr schedule and EMA counters

The first ``WARMUP_STEPS`` steps of a run (or of a resumed run) run eagerly on a side stream (compilation, the
optimizer's state and the objective's device tables are made there, as a capture needs), then the next step is
captured and replayed; every step is a real training step with the same draws as the eager loop's, since the
generator's seed and offset are read at each replay. A capture that fails leaves the weights untouched (a capture
runs nothing) and the run continues eagerly with a one-line notice.

Which steps can be captured: one process, no gradient accumulation, no fp16 loss scaler, on CUDA, and an
objective that declares ``capturable = True`` (its call draws only from the generator it is given, reads nothing
back to the host, does not depend on ``step`` and keeps its shapes). :func:`step_graph_blocker` says why not.
"""

from __future__ import annotations

import contextlib
import gc
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch

#: eager steps on a side stream before the capture (torch's CUDA-graph guide: warm up first)
WARMUP_STEPS = 3


@contextlib.contextmanager
def _no_autocast_cache() -> Iterator[None]:
    """Autocast's weight-cast cache off (torch's guide for captured autocast regions). Every call of the body runs
    under it, warm-up included: torch.compile guards on this flag, so flipping it for the capture alone would
    recompile the network inside the capture."""
    before = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(before)


def step_graph_blocker(*, device: torch.device, num_processes: int, accumulation: int, mixed_precision: str,
                       objective: Any) -> str | None:
    """Why the whole step cannot be captured here, or None when it can."""
    if device.type != "cuda":
        return f"CUDA graphs need a GPU (the device is {device.type})"
    if num_processes > 1:
        return "the step of a multi-process run all-reduces its gradients outside a graph"
    if accumulation > 1:
        return "gradient_accumulation_steps > 1"
    if mixed_precision == "fp16":
        return "fp16's loss scaler skips steps on the host"
    if not getattr(objective, "capturable", False):
        return f"the objective {type(objective).__name__} is not capturable (it draws or reads on the host)"
    return None


class StepGraph:
    """One training step, run eagerly for the first :data:`WARMUP_STEPS` calls, then captured and replayed.

    ``body(step, generator) -> (loss, grad_norm, logs)`` is the step with the optimizer's lr and the EMA's weight
    read from :attr:`lr` and :attr:`ema_weight` (device tensors); ``before_capture`` runs once just before the
    capture (the trainer lets go of its gradients there); ``capture=False`` never captures (a CPU test of the
    same body). ``__call__`` returns the step's outputs: after a replay they are the graph's static tensors, valid
    until the next call.
    """

    def __init__(self, body: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor | None, dict]],
                 device: torch.device, lr: float, ema_weight: float, before_capture: Callable[[], None],
                 capture: bool = True, warmup: int = WARMUP_STEPS) -> None:
        self.body, self.device = body, device
        self.before_capture = before_capture
        self.capture = capture
        self.warmup = int(warmup)
        # the values the graph reads; refilled from the host only when they change (a fill is a launch)
        self.lr = torch.tensor(float(lr), device=device)
        self.ema_weight = torch.tensor(float(ema_weight), device=device)
        self._host_values = [float(lr), float(ema_weight)]
        self.generator = torch.Generator(device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._static: tuple[torch.Tensor, torch.Tensor | None, dict] | None = None
        self._eager_steps = 0
        #: why capturing failed (the run went on eagerly), else None; the traceback's last lines with it
        self.failed: str | None = None
        self.failed_traceback: str | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def set_values(self, lr: float, ema_weight: float) -> None:
        """The lr and EMA weight of the next step (a fill each, only when they changed)."""
        if lr != self._host_values[0]:
            self.lr.fill_(lr)
            self._host_values[0] = lr
        if ema_weight != self._host_values[1]:
            self.ema_weight.fill_(ema_weight)
            self._host_values[1] = ema_weight

    def __call__(self, step: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        if self.graph is not None:
            self.generator.manual_seed(seed)
            self.graph.replay()
            assert self._static is not None
            return self._static
        if self.capture and self.failed is None and self._eager_steps >= self.warmup:
            out = self._capture(step, seed)
            if out is not None:
                return out
        self._eager_steps += 1
        self.generator.manual_seed(seed)
        if not self.capture or self.failed is not None:
            with _no_autocast_cache():
                return self.body(step, self.generator)
        side = torch.cuda.Stream(self.device)  # a capture wants its warm-up off the default stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), _no_autocast_cache():
            out = self.body(step, self.generator)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out

    def _capture(self, step: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None, dict] | None:
        """Capture the step (which runs nothing), then replay it for ``step``; None after a failed capture."""
        torch.cuda.synchronize(self.device)
        self.before_capture()
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.generator)  # each replay reads the seed and offset set before it
        self.generator.manual_seed(seed)
        try:
            with _no_autocast_cache(), torch.cuda.graph(graph):
                static = self.body(step, self.generator)
        except Exception as exc:  # noqa: BLE001 - reported in one line; the run goes on eagerly
            self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            self.failed_traceback = "".join(traceback.format_exception(exc)[-6:])[-3000:]
            del exc, graph
            gc.collect()  # the failed graph, with its hold on the generators, goes now
            # a generator once registered with a graph refuses eager draws: the eager steps get a fresh one
            self.generator = torch.Generator(device=self.device)
            torch.cuda.synchronize(self.device)
            self.before_capture()  # drop gradients the failed capture may have left
            return None
        self.graph, self._static = graph, static
        self.generator.manual_seed(seed)
        graph.replay()
        return static
