"""A teacher wrapper that counts its evaluations: the teacher-NFE accounting of every method and pair cache."""

from __future__ import annotations

import torch

from rayflow.models.base import Condition, Denoiser


class CountingDenoiser(Denoiser):
    """Wraps a frozen teacher and counts its per-sample evaluations (rows of every batch it sees).

    Classifier-free guidance doubles the count, as it doubles the cost. The count is what methods report as
    ``teacher_nfe``: pair generation, eps_mu estimation and in-loop teacher solves all included.
    """

    def __init__(self, model: Denoiser) -> None:
        super().__init__()
        self.model = model
        self.prediction_type = model.prediction_type
        self.num_classes = model.num_classes
        self.evaluations = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition = None) -> torch.Tensor:
        self.evaluations += x.shape[0]
        return self.model(x, t, cond)

    def null_condition(self, batch_size: int, device: torch.device) -> Condition:
        return self.model.null_condition(batch_size, device)


__all__ = ["CountingDenoiser"]
