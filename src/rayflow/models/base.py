"""The one calling convention for every network in rayflow: ``model(x_t, t, cond) -> prediction``.

``t`` is a float tensor ``[B]`` of timesteps on the diffusers scale (0..T-1, large = noise; fractional values
allowed). ``cond`` is ``None``, a ``LongTensor [B]`` of class labels (``num_classes`` is the null label used
for classifier-free guidance), or a float tensor ``[B, L, D]`` of text embeddings. The kind of output is
declared by ``prediction_type`` (see :mod:`rayflow.schedules`).
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from rayflow.errors import require
from rayflow.schedules import PREDICTION_TYPES, VPSchedule, expand_like, to_x0_eps

Condition = Union[torch.Tensor, None]


class Denoiser(nn.Module):
    """Base class: subclasses implement :meth:`forward` and set :attr:`prediction_type` and :attr:`num_classes`."""

    prediction_type: str = "epsilon"
    #: number of real classes for class-conditional models (label ``num_classes`` means "no label"); 0 otherwise
    num_classes: int = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def null_condition(self, batch_size: int, device: torch.device) -> Condition:
        """The "unconditional" condition used by classifier-free guidance."""
        if self.num_classes > 0:
            return torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)
        return None


def drop_labels(labels: torch.Tensor, probability: float, null_label: int,
                generator: torch.Generator) -> torch.Tensor:
    """Class labels replaced by the null label ``null_label`` (= ``num_classes``) with probability ``probability``:
    the label dropout that trains a model for classifier-free guidance.

    One draw ``torch.rand(B)`` on ``generator``'s device per call (so a caller's random stream is the same
    whichever objective or pair builder uses it); the mask then moves to the labels' device.
    """
    drop = torch.rand(labels.shape[0], generator=generator, device=generator.device) < probability
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_label), labels)


def broadcast_timesteps(t: Union[torch.Tensor, float, int], batch_size: int, device: torch.device) -> torch.Tensor:
    """Timesteps as a float tensor ``[B]`` (a scalar is repeated)."""
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    if t.ndim == 0:
        t = t.expand(batch_size)
    require(t.shape == (batch_size,), f"timesteps must be a scalar or have shape [{batch_size}], got {tuple(t.shape)}")
    return t


class ClassifierFreeGuidance(Denoiser):
    """``pred = pred(x, t, null) + w * (pred(x, t, c) - pred(x, t, null))`` in one batched call.

    Valid for every prediction type that is linear in the score (epsilon, sample, v and flow all are).
    ``scale = 1`` returns the conditional prediction without the extra pass.
    """

    def __init__(self, model: Denoiser, scale: float) -> None:
        super().__init__()
        self.model = model
        self.scale = float(scale)
        self.prediction_type = model.prediction_type
        self.num_classes = model.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition = None) -> torch.Tensor:
        if cond is None or self.scale == 1.0:
            return self.model(x, t, cond)
        t = broadcast_timesteps(t, x.shape[0], x.device)
        null = self.model.null_condition(x.shape[0], x.device)
        if null is None:  # text embeddings: the null prompt is the zero embedding
            null = torch.zeros_like(cond)
        both = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]))
        c, u = both.chunk(2)
        return u + self.scale * (c - u)


def with_guidance(model: Denoiser, scale: float) -> Denoiser:
    """Wrap ``model`` in :class:`ClassifierFreeGuidance` unless ``scale == 1``."""
    return model if float(scale) == 1.0 else ClassifierFreeGuidance(model, scale)


def check_prediction_type(prediction_type: str) -> str:
    require(prediction_type in PREDICTION_TYPES,
            f"unknown prediction type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    return prediction_type


class EpsilonView(Denoiser):
    """Present any teacher as an epsilon-predictor: ``eps = to_x0_eps(pred, type, x, a_t, s_t)[1]``.

    Exact algebra on the VP path, so a v-, x0- or flow-prediction teacher is converted rather than refused.
    """

    prediction_type = "epsilon"

    def __init__(self, model: Denoiser, schedule: VPSchedule) -> None:
        super().__init__()
        self.model, self.schedule = model, schedule
        self.num_classes = model.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition = None) -> torch.Tensor:
        tt = torch.as_tensor(t, dtype=torch.float64).flatten().expand(x.shape[0]).cpu()
        a, s = expand_like(self.schedule.a(tt), x), expand_like(self.schedule.s(tt), x)
        return to_x0_eps(self.model(x, t, cond), self.model.prediction_type, x, a, s)[1]

    def null_condition(self, batch_size: int, device: torch.device) -> Condition:
        return self.model.null_condition(batch_size, device)


def as_epsilon(model: Denoiser, schedule: VPSchedule) -> Denoiser:
    """``model`` itself if it predicts epsilon, an :class:`EpsilonView` of it otherwise; unknown types refused."""
    ptype = getattr(model, "prediction_type", None)
    if ptype == "epsilon":
        return model
    require(ptype in PREDICTION_TYPES,
            f"the teacher predicts {ptype!r}, which cannot be converted to epsilon "
            f"(supported: {', '.join(PREDICTION_TYPES)})")
    return EpsilonView(model, schedule)
