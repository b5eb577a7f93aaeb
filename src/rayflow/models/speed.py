"""Device-side speed settings for networks: channels-last layout and the frozen-teacher preparation.

Nothing here changes what a network computes beyond rounding: channels-last is a memory layout, and a bf16
teacher computes in the precision autocast would have used for its matrix products anyway (its norms and
the sampler's state stay in float32 outside the network), and the layout fixes of :func:`keep_channels_last`
compute the same values in other layouts. Every setting applies to CUDA only unless asked
for; on a CPU the network is returned as it was, so CPU runs (and their caches' fingerprints) do not change.
"""

from __future__ import annotations

import gc
import sys

import torch
from torch import nn

from rayflow.errors import require
from rayflow.models.base import Condition, Denoiser

CHANNELS_LAST_CHOICES = ("auto", "yes", "no")
#: Inductor's tuning of the kernels it generates (TrainConfig.kernel_tuning): none, or coordinate descent over each
#: kernel's launch configuration (minutes more compilation; BENCHMARKS §6.5)
KERNEL_TUNING_CHOICES = ("none", "coordinate-descent")


def _notice(message: str) -> None:
    print(f"rayflow: note: {message}", file=sys.stderr, flush=True)


def has_convolutions(model: nn.Module) -> bool:
    """Whether ``model`` holds 2-d convolutions (the only layers channels-last helps)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def resolve_channels_last(setting: str, model: nn.Module, device: str | torch.device) -> bool:
    """``"auto"``: channels-last on CUDA for convolutional networks (cuDNN's bf16 kernels are NHWC, so an NCHW
    network pays a layout conversion around every convolution); ``"yes"`` / ``"no"`` force it."""
    require(setting in CHANNELS_LAST_CHOICES,
            f"channels_last must be one of {', '.join(CHANNELS_LAST_CHOICES)}, got {setting!r}")
    if setting == "auto":
        return torch.device(device).type == "cuda" and has_convolutions(model)
    return setting == "yes"


def to_channels_last(model: nn.Module) -> nn.Module:
    """Put every 4-d parameter and buffer of ``model`` in channels-last layout, in place (``Module.to`` keeps the
    parameter objects, so an optimizer built before or after sees the same tensors), and keep the activations
    and their gradients channels-last where two layers would otherwise hand back NCHW (:func:`keep_channels_last`).
    """
    keep_channels_last(model)
    return model.to(memory_format=torch.channels_last)


class _ChannelsLastGrad(torch.autograd.Function):
    """The identity, whose backward hands its gradient on channels-last (a no-op when it already is)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


def _grad_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x``, whose gradient is handed back channels-last (``x`` itself when no gradient flows)."""
    return _ChannelsLastGrad.apply(x) if x.requires_grad else x


def _group_norm_input_hook(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    if isinstance(x, torch.Tensor) and x.ndim == 4 and x.requires_grad:
        return (_grad_channels_last(x), *args[1:])
    return None


def nearest_upsample_2x(x: torch.Tensor) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=2, mode="nearest")`` for ``x [B, C, H, W]``, written as a broadcast:
    ``y[b, c, 2i + p, 2j + q] = x[b, c, i, j]`` for ``p, q in {0, 1}``. The same values; its gradient is a
    2x2 block sum, where the interpolation's (decomposed by torch.compile into an index) is a scatter-add."""
    b, c, h, w = x.shape
    return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)


def _upsample_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    x, rest = args[0], args[1:]
    output_size = rest[0] if rest else kwargs.get("output_size")
    x = _grad_channels_last(x)  # the block sum's gradient would come back NCHW too (the layers before would copy it)
    if output_size is None:
        x = nearest_upsample_2x(x)
    else:  # an explicit size (diffusers' odd-sized inputs): the interpolation diffusers itself would run
        x = nn.functional.interpolate(x, size=output_size, mode="nearest")
    return (x, *rest), kwargs


def keep_channels_last(model: nn.Module) -> int:
    """Two layout fixes for a channels-last convolutional network, in place; returns how many layers changed.
    Neither changes a value the network computes (the gradients' sums may round differently).

    * ``nn.GroupNorm`` hands its input's gradient back in NCHW under torch.compile (Inductor lowers its backward
      through a ``[N, G, C/G, HW]`` reshape), so cuDNN copies it to NHWC before each convolution backward
      reading it: 17 copies, 0.69 of the 10.86 ms of kernel time in a batch-256 step of the Fashion-MNIST UNet
      on an H200 (BENCHMARKS §6.6). A pre-hook makes that gradient channels-last, which Inductor then writes
      directly from the kernel computing it.
    * diffusers' ``Upsample2D`` (nearest, no transposed convolution, no norm) makes its input NCHW at batch
      64 and over and interpolates, whose compiled backward is an atomic scatter-add (0.43 ms of that step).
      A pre-hook upsamples first with :func:`nearest_upsample_2x` (a block-sum backward, its input's gradient
      handed back channels-last too) and the module's own interpolation is switched off
      (``interpolate = False``); an explicit ``output_size`` interpolates as diffusers would.

    Together they took that step from 11.04 to 10.02 ms.

    Idempotent (a layer changed once is left alone); a deep copy keeps the hooks.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "_rayflow_layout_hook", False):
            continue
        if isinstance(module, nn.GroupNorm):
            module.register_forward_pre_hook(_group_norm_input_hook)
        elif (type(module).__name__ == "Upsample2D" and type(module).__module__.startswith("diffusers")
              and getattr(module, "interpolate", False) and not getattr(module, "use_conv_transpose", True)
              and getattr(module, "norm", None) is None):
            module.register_forward_pre_hook(_upsample_hook, with_kwargs=True)
            module.interpolate = False
        else:
            continue
        module._rayflow_layout_hook = True
        changed += 1
    return changed


#: the frozen teacher's static batch on CUDA when it is compiled (``static_batch="auto"``): the batch at which the
#: Fashion-MNIST teacher's compiled 1-NFE rate was measured (119 000 images/s on an H200, BENCHMARKS.md section 6)
GEN_BATCH = 2048
#: a call's last chunk is padded to the smallest of ``S, S/2, S/4, S/8`` that holds it: at most four compiled shapes
#: (one compile and one CUDA graph each), and a short chunk pays at most twice its rows (or ``S/8``)
STATIC_BATCH_LEVELS = 4


def static_batch_sizes(static_batch: int) -> tuple[int, ...]:
    """The batch sizes a teacher with ``static_batch = S`` is ever called at: ``S, S/2, S/4, S/8`` (distinct, >= 1)."""
    return tuple(sorted({max(1, int(static_batch) >> k) for k in range(STATIC_BATCH_LEVELS)}, reverse=True))


def _bucket(rows: int, sizes: tuple[int, ...]) -> int:
    """The smallest of ``sizes`` (descending) that holds ``rows`` (``rows <= sizes[0]``)."""
    return next(size for size in reversed(sizes) if size >= rows)


def _rows_of(value: torch.Tensor | None, start: int, count: int, size: int, batch: int) -> torch.Tensor | None:
    """Rows ``start .. start + count`` of a per-row tensor (first dimension ``batch``), padded to ``size`` rows by
    repeating its first row (a valid input, so the padding computes nothing undefined); anything else (a 0-d
    timestep, ``None``) is returned as it is."""
    if not torch.is_tensor(value) or value.ndim == 0 or value.shape[0] != batch:
        return value
    chunk = value[start:start + count]
    if size == count:
        return chunk
    return torch.cat([chunk, chunk[:1].expand(size - count, *chunk.shape[1:])])


class FrozenTeacher(Denoiser):
    """A frozen network stored in ``dtype`` (bf16) that takes and returns float32: inputs are cast on the way
    in, the prediction back to float32 on the way out, so samplers and losses keep float32 state.

    ``forward`` calls ``fn`` (the network itself, or its ``torch.compile``\\ d version); the network's own
    attributes (``prediction_type``, ``num_classes``, ``null_condition``) are its.

    ``static_batch = S > 0``: every call is cut into chunks of ``S`` rows and its last chunk padded (its first row
    repeated) to the smallest of :func:`static_batch_sizes` that holds it; the padding rows' outputs are dropped.
    A network compiled with static shapes (and CUDA graphs) then sees at most four batch shapes whatever its
    callers' batches (a pool's last shard, a sampler's remainder, the ``K x B`` rows of eps_mu), instead of a
    compilation and a graph capture per new shape. Rows do not interact in a frozen network (eval mode: no batch
    statistics), so the outputs are those of unpadded calls up to kernel rounding.
    """

    def __init__(self, model: Denoiser, dtype: torch.dtype, fn: nn.Module | None = None,
                 cuda_graphs: bool = False, static_batch: int = 0) -> None:
        super().__init__()
        require(int(static_batch) >= 0, f"static_batch must be >= 0 (0 = the callers' batches), got {static_batch}")
        self.model = model
        self.dtype = dtype
        self.prediction_type = model.prediction_type
        self.num_classes = model.num_classes
        self._fn = fn if fn is not None else model
        self.cuda_graphs = bool(cuda_graphs)
        self.static_batch = int(static_batch)

    @property
    def compiled(self) -> bool:
        """Whether calls go through the compiled forward (False after a compile failure fell back to eager)."""
        return self._fn is not self.model

    def batch_sizes(self) -> tuple[int, ...]:
        """The batch shapes the network is called at (empty: whatever the callers pass)."""
        return static_batch_sizes(self.static_batch) if self.static_batch else ()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition = None) -> torch.Tensor:
        if not self.static_batch or x.shape[0] == 0:  # no rows: the network's own behaviour, nothing to pad
            return self._call(x, t, cond, x.shape[0])
        n, size = x.shape[0], self.static_batch
        sizes = self.batch_sizes()
        outs = []
        for start in range(0, n, size):
            count = min(size, n - start)
            padded = _bucket(count, sizes)
            outs.append(self._call(_rows_of(x, start, count, padded, n), _rows_of(t, start, count, padded, n),
                                   _rows_of(cond, start, count, padded, n), count))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _call(self, x: torch.Tensor, t: torch.Tensor, cond: Condition, rows: int) -> torch.Tensor:
        """The network on one (padded) batch; its first ``rows`` outputs as a float32 tensor of their own."""
        if torch.is_tensor(cond) and cond.is_floating_point():
            cond = cond.to(self.dtype)
        x = x.to(self.dtype)
        if not self.compiled:
            return self.model(x, t, cond)[:rows].float()
        try:
            out = self._fn(x, t, cond)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager network computes the same
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            _notice(f"the frozen teacher could not be compiled ({type(exc).__name__}: {first}); it runs eagerly")
            self._fn = self.model
            return self.model(x, t, cond)[:rows].float()
        out = out[:rows]
        if self.cuda_graphs and out.dtype == torch.float32:
            # a CUDA graph's output buffer is overwritten by its next replay: hand back a copy (bf16 outputs are
            # copied by the cast below anyway)
            return out.clone()
        return out.float()

    def null_condition(self, batch_size: int, device: torch.device) -> Condition:
        return self.model.null_condition(batch_size, device)


#: compiled graphs allowed per code object: torch's default (8) is spent by one process that compiles the same
#: network class several times (a teacher per batch shape, a student per ProReflow stage, a benchmark's bare loop),
#: after which torch silently runs that code eagerly again
RECOMPILE_LIMIT = 64


def allow_recompiles(limit: int = RECOMPILE_LIMIT) -> None:
    """Raise torch.compile's per-code-object recompile limit to at least ``limit`` (never lowers it)."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # the new name, and the old one on older torch
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(int(getattr(dynamo_config, name)), limit))
            break


def compile_network(model: nn.Module, mode: str = "default", force_layout: bool = False,
                    dynamic: bool | None = None, kernel_tuning: str = "none") -> nn.Module:
    """``torch.compile(model, mode=mode, dynamic=dynamic)``; ``force_layout``: with inductor's layout optimisation
    forced on; ``kernel_tuning="coordinate-descent"``: with inductor's coordinate-descent tuning of its generated
    kernels (their block sizes chosen by timing neighbouring configurations on the device).

    Inductor lays every convolution's activations out channels-last through the forward and the backward graph
    only when a heuristic finds the network worth it; it skips networks with few or narrow convolutions, and
    then each convolution pays layout copies (the Fashion-MNIST UNet: 3.1 ms of its 13.4 ms GPU step in 52
    strided copies; forced, 10.8 ms). The option goes to this model's compilation only (``options=``), not to
    the process's inductor config; so does the tuning.
    """
    mode = mode or "default"
    require(kernel_tuning in KERNEL_TUNING_CHOICES,
            f"kernel_tuning must be one of {', '.join(KERNEL_TUNING_CHOICES)}, got {kernel_tuning!r}")
    extra = {**({"force_layout_optimization": True} if force_layout else {}),
             **({"coordinate_descent_tuning": True} if kernel_tuning == "coordinate-descent" else {})}
    if not extra:
        return torch.compile(model, mode=None if mode == "default" else mode, dynamic=dynamic)
    from torch._inductor import list_mode_options

    return torch.compile(model, options={**list_mode_options(mode), **extra}, dynamic=dynamic)  # default: {}


def release_compiled_state() -> None:
    """Free what a finished compiled run leaves behind in this process: torch.compile's in-memory caches with
    their CUDA-graph memory pools (``torch.compiler.reset``), then the allocator's cached blocks.

    For a process that trains and then samples while other processes share its GPU: the training's graphs
    (student step, static-batch teacher) otherwise stay reserved through the sampling. Seven Fashion-MNIST
    benchmark workers on one H200 held about 20 GiB each that way and the last to sample ran out of memory.
    Anything compiled afterwards compiles again; the on-disk Inductor cache makes that quick.
    """
    gc.collect()  # the trainer and teacher modules must be unreachable before their graphs can be dropped
    torch.compiler.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _resolve_switch(value: bool | str, cuda: bool, name: str) -> bool:
    """``True``/``"yes"``, ``False``/``"no"``, or ``"auto"`` (= on CUDA)."""
    require(value in (True, False, "yes", "no", "auto"), f"{name} must be yes, no or auto, got {value!r}")
    return cuda if value == "auto" else value in (True, "yes")


def prepare_frozen_teacher(
    model: Denoiser,
    device: str | torch.device,
    dtype: torch.dtype | None = None,
    compile: bool | str = False,
    cuda_graphs: bool | str = False,
    channels_last: str = "auto",
    static_batch: int | str = "auto",
    force_layout: bool = False,
    kernel_tuning: str = "none",
) -> Denoiser:
    """Make ``model`` a frozen teacher on ``device``: eval mode, no gradients, and on CUDA its speed settings.

    * ``dtype`` (e.g. ``torch.bfloat16``): store the weights in it once, instead of autocast re-casting them
      every call; inputs and outputs stay float32 (:class:`FrozenTeacher`). Ignored on a CPU (with a notice
      when asked for), where bf16 matrix products are slower than float32.
    * ``channels_last``: see :func:`resolve_channels_last`.
    * ``compile`` / ``cuda_graphs``: ``torch.compile`` the forward with static shapes (``dynamic=False``; with
      ``cuda_graphs`` ``mode="reduce-overhead"``, one CUDA graph per batch shape). CUDA only; on a CPU they are
      skipped with a one-line notice, and a compiled call that fails (a compiler error) falls back to the eager
      network for the rest of the run, with a one-line notice. ``"auto"`` (for either) means on CUDA, off
      elsewhere, without a notice.
    * ``force_layout``: compile with inductor's layout optimisation forced on (:func:`compile_network`), for
      convolutional networks; ``kernel_tuning``: see :func:`compile_network`.

    The network is modified in place (moved, cast); take any copy of its weights (a student's initialisation)
    before calling this. Returns ``model`` itself when nothing but eval/no-grad/device applies.
    """
    device = torch.device(device)
    model.eval().requires_grad_(False).to(device)
    cuda = device.type == "cuda"
    compile, cuda_graphs = (_resolve_switch(v, cuda, name) for v, name in ((compile, "compile"),
                                                                          (cuda_graphs, "cuda_graphs")))
    if (compile or cuda_graphs) and not cuda:
        _notice("the frozen teacher is not compiled on a CPU (torch.compile and CUDA graphs are GPU settings here)")
        compile = cuda_graphs = False
    if dtype is not None and dtype != torch.float32 and not cuda:
        dtype = None  # float32 on CPUs: bf16 matmuls are emulated there and slower
    if not any(p.is_floating_point() for p in model.parameters()):
        # no weights (an exact, analytic teacher): nothing to store in bf16 or to compile, precision to lose
        dtype = None
        compile = cuda_graphs = False
    if resolve_channels_last(channels_last, model, device):
        to_channels_last(model)
    if static_batch == "auto":
        static_batch = GEN_BATCH if (compile or cuda_graphs) else 0
    require(isinstance(static_batch, int) and not isinstance(static_batch, bool) and static_batch >= 0,
            f"static_batch must be auto or an integer >= 0, got {static_batch!r}")
    if dtype is None and not (compile or cuda_graphs) and not static_batch:
        return model
    if dtype is not None:
        model.to(dtype)
    fn: nn.Module | None = None
    if compile or cuda_graphs:
        allow_recompiles()
        fn = compile_network(model, "reduce-overhead" if cuda_graphs else "default",
                             force_layout=force_layout and has_convolutions(model), dynamic=False,
                             kernel_tuning=kernel_tuning)
    return FrozenTeacher(model, dtype or torch.float32, fn, cuda_graphs=cuda_graphs, static_batch=static_batch)


__all__ = ["GEN_BATCH", "FrozenTeacher", "allow_recompiles", "compile_network", "has_convolutions",
           "keep_channels_last", "nearest_upsample_2x", "prepare_frozen_teacher", "resolve_channels_last",
           "static_batch_sizes", "to_channels_last"]
