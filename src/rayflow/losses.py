"""Losses shared by the reflow family (2-RF / InstaFlow, PeRFlow, Rectified Diffusion, ProReflow).

Every function returns a **per-sample** loss ``[B]`` (a mean over the non-batch dimensions), so a method can
weight samples before averaging over the batch.

* :func:`mse` - ``mean_d (pred - target)^2``; the loss of RF, InstaFlow and PeRFlow [CODE].
* :func:`pseudo_huber` - ``mean_d (sqrt((pred - target)^2 + c^2) - c)``, elementwise as in Rectified Diffusion's
  ``train.py`` (``c = 0.001`` on SD latents) [CODE].
* :func:`aligned_velocity_loss` - ProReflow's aligned v-prediction::

      L = ||v* - v_hat||^2 / d  +  alpha * (1 - cos(v_hat, v*)),   cos = <v_hat, v*> / (||v_hat|| ||v*||)

  The form "MSE + alpha (1 - cos)" is [SECONDARY] (papernotes.org); that the MSE is a mean over dimensions (so
  ``alpha`` weighs a per-coordinate error against a dimensionless cosine, independent of the data size) and
  that the cosine is taken per sample over the flattened tensor are [INFERRED]. The paper's ``alpha`` is NOT
  FOUND. The cosine and the norm ratio ``||v_hat|| / ||v*||`` are returned as diagnostics (magnitude matching
  is what the paper argues matters less than direction).
"""

from __future__ import annotations

import torch

from rayflow.errors import RayflowError, require

#: denominators below this are clamped (a zero velocity has no direction)
COS_EPS = 1e-12


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error ``[B]``."""
    require(pred.shape == target.shape, f"mse: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    return _flat(pred - target).square().mean(1)


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample pseudo-Huber ``mean_d (sqrt((pred - target)^2 + c^2) - c)`` ``[B]``, elementwise in ``c``.

    Quadratic (``(pred - target)^2 / 2c``) for errors well below ``c``, absolute (``|pred - target|``) above.
    """
    require(c > 0, f"pseudo-Huber: c must be > 0, got {c}")
    require(pred.shape == target.shape, f"pseudo-Huber: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    d = _flat(pred - target)
    return (d.square() + c * c).sqrt().sub(c).mean(1)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine between flattened ``a`` and ``b`` ``[B]`` (0 when either is zero)."""
    a, b = _flat(a), _flat(b)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=COS_EPS)


def norm_ratio(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||pred|| / ||target||`` ``[B]``."""
    return _flat(pred).norm(dim=1) / _flat(target).norm(dim=1).clamp(min=COS_EPS)


def aligned_velocity_loss(
    v_pred: torch.Tensor, v_target: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ProReflow's aligned v-prediction loss per sample, ``mse + alpha * (1 - cos)`` ``[B]`` (see module doc).

    Returns ``(loss [B], diagnostics)``; the diagnostics (detached, per sample) are ``mse``, ``cos`` and
    ``norm_ratio``.
    """
    require(alpha >= 0, f"aligned loss: alpha must be >= 0, got {alpha}")
    m = mse(v_pred, v_target)
    cos = cosine_similarity(v_pred, v_target)
    loss = m + alpha * (1.0 - cos) if alpha > 0 else m
    diag = {"mse": m.detach(), "cos": cos.detach(), "norm_ratio": norm_ratio(v_pred, v_target).detach()}
    return loss, diag


LOSSES = ("mse", "huber")


def regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, huber_c: float = 1e-3) -> torch.Tensor:
    """``kind`` = ``"mse"`` | ``"huber"`` (pseudo-Huber with ``huber_c``), per sample ``[B]``."""
    if kind == "mse":
        return mse(pred, target)
    if kind == "huber":
        return pseudo_huber(pred, target, huber_c)
    raise RayflowError(f"unknown loss {kind!r}; expected one of {', '.join(LOSSES)}")
