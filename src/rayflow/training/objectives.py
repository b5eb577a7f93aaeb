"""What a method hands the trainer: the :class:`Objective` protocol, its :class:`LossOutput`, and the teacher's
:class:`EpsilonObjective`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from rayflow.checkpoint import unwrap_denoiser
from rayflow.devices import DeviceCache
from rayflow.errors import require
from rayflow.models.base import Denoiser, drop_labels
from rayflow.schedules import VPSchedule, convert_prediction, expand_like


# ---------------------------------------------------------------------- objectives
@dataclass
class LossOutput:
    """What an objective returns: the loss and logs.

    ``logs`` values may be floats or 0-d tensors; tensors are preferred, because the trainer reads them only at
    log steps, so a step needs no host synchronisation (``float(t)`` in an objective forces one every step).
    """

    loss: torch.Tensor  # scalar, differentiable
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class Objective(Protocol):
    """``objective(model, step, generator) -> LossOutput``.

    ``model`` is the accelerate-prepared (possibly DDP-wrapped / compiled) network: call it, but read
    attributes such as ``prediction_type`` from :func:`unwrap_denoiser` ``(model)``. Draw all randomness from
    ``generator`` (on the training device). With ``gradient_accumulation_steps = n`` it is called ``n`` times
    per step (same ``step``, a fresh generator each). Optional methods, called when present:

    * ``after_step(model, step, generator) -> dict[str, float | Tensor]`` after the optimizer step (e.g. a
      time-sampler update); the returned logs are merged into the step's logs.
    * ``capturable`` (attribute, default False): True promises that a call draws only from ``generator``, reads
      nothing back to the host, does not depend on ``step`` and keeps its shapes, so the trainer may capture the
      whole step as one CUDA graph (``TrainConfig.step_graph``, :mod:`rayflow.training.step_graph`).
    * ``state_dict() -> dict`` / ``load_state_dict(d)``: state that must survive a resume. Tensors (nested
      dicts/lists of tensors and JSON scalars, e.g. ``{"net": net.state_dict(), "opt": opt.state_dict()}``,
      are fine) are saved as ``objective.safetensors`` + ``objective.json``, never pickled.
    """

    def __call__(self, model: Denoiser, step: int, generator: torch.Generator) -> LossOutput: ...


class EpsilonObjective:
    r"""The standard teacher (DDPM) loss, with label dropout for classifier-free guidance::

        L(theta) = E_{i, t ~ U{0..T-1}, eps ~ N(0, I)} || eps_theta(a_t x0_i + s_t eps, t, c~_i) - eps ||^2

    ``x0_i`` is a random row of ``dataset_x`` (``a_t = sqrt(alpha_bar_t)``, ``s_t = sqrt(1 - alpha_bar_t)``),
    ``c~_i = labels_i``, replaced by the null label ``num_classes`` with probability ``label_dropout`` (no
    condition when ``labels`` is None). A model that predicts another type (``sample``, ``v_prediction``,
    ``flow``) has its output converted to epsilon at ``x_t`` first, so the loss is always the epsilon MSE
    (mean over batch and dimensions).
    """

    def __init__(
        self,
        dataset_x: torch.Tensor,
        labels: torch.Tensor | None,
        schedule: VPSchedule,
        batch_size: int,
        label_dropout: float = 0.1,
        num_classes: int = 0,
    ) -> None:
        require(dataset_x.ndim >= 2 and dataset_x.shape[0] >= 1,
                f"dataset_x must be [N, ...] with N >= 1, got shape {tuple(dataset_x.shape)}")
        require(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        require(0 <= label_dropout <= 1, f"label_dropout must be in [0, 1], got {label_dropout}")
        if labels is not None:
            labels = torch.as_tensor(labels).long().reshape(-1)
            require(labels.shape[0] == dataset_x.shape[0],
                    f"{labels.shape[0]} labels for {dataset_x.shape[0]} samples")
            require(num_classes >= 1, "labels were given but num_classes is 0")
            require(bool(((labels >= 0) & (labels < num_classes)).all()),
                    f"labels must lie in 0..{num_classes - 1}")
        self.dataset_x = dataset_x.float()
        self.labels = labels
        self.schedule = schedule
        self.batch_size = int(batch_size)
        self.label_dropout = float(label_dropout)
        self.num_classes = int(num_classes)
        self._cache: DeviceCache[tuple[torch.Tensor, torch.Tensor | None]] = DeviceCache()

    @property
    def capturable(self) -> bool:
        """A step can be captured when the data set lives on the device (it does up to 1 GiB)."""
        return self._fits_device()

    def _fits_device(self) -> bool:
        return self.dataset_x.numel() * self.dataset_x.element_size() <= (1 << 30)

    def _data_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._cache.get(device, self._copy_to)

    def _copy_to(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.dataset_x
        x = x.to(device) if self._fits_device() else x  # keep big data sets where they are
        return x, self.labels.to(x.device) if self.labels is not None else None

    def __call__(self, model: Denoiser, step: int, generator: torch.Generator) -> LossOutput:
        dev = generator.device
        data, labels = self._data_on(dev)
        b, n, T = self.batch_size, data.shape[0], self.schedule.num_train_timesteps
        idx = torch.randint(0, n, (b,), generator=generator, device=dev)
        x0 = data[idx.to(data.device)].to(dev)
        t = torch.randint(0, T, (b,), generator=generator, device=dev)
        eps = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
        a, s = expand_like(self.schedule.a(t), x0), expand_like(self.schedule.s(t), x0)
        x_t = a * x0 + s * eps
        cond = None
        if labels is not None:
            cond = labels[idx.to(labels.device)].to(dev)
            if self.label_dropout > 0:
                cond = drop_labels(cond, self.label_dropout, self.num_classes, generator)
        pred = model(x_t, t.float(), cond)
        ptype = unwrap_denoiser(model).prediction_type
        if ptype != "epsilon":
            pred = convert_prediction(pred.float(), ptype, "epsilon", x_t, a, s)
        loss = F.mse_loss(pred.float(), eps.float())
        return LossOutput(loss, {})
