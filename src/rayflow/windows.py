r"""Time windows: the piecewise maths shared by PeRFlow, ProReflow and phased Rectified Diffusion (no method owns it).

``K`` equal windows of the integer timesteps ``T-1 .. -1`` have boundaries ``b_0 = T-1 > b_1 > ... > b_K = -1``
(flow time ``tau = (t + 1) / T``: ``1, (K-1)/K, ..., 0``). Inside a window ``[t_s, t_e)`` a straight student
moves along the chord ``z_t = z_s + (z_e - z_s) (tau - tau_s) / (tau_e - tau_s)``; its network output is read as
the window velocity ``v = dz/dtau`` directly (``flow``, the flow-time convention's ``dx/dtau``) or through PeRFlow's
epsilon coefficients ``z_e = lambda_s z_s + eta_s eps`` (``window_epsilon``, PeRFlow's ``diff_eps``: the
forward-process noise ``e -> s``; ``epsilon``, PeRFlow's ``ddim_eps``: diffusers' epsilon, one DDIM step ``s -> e``).
Derivations: rayflow.methods.perflow's module doc and reflow-peers.md §B.2.3.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from rayflow.errors import require
from rayflow.schedules import VPSchedule, expand_like, timestep_to_flow_time


# ---------------------------------------------------------------------- window grids
def window_boundaries(num_windows: int, num_train_timesteps: int) -> torch.Tensor:
    """The ``K + 1`` boundaries ``T-1 = b_0 > b_1 > ... > b_K = -1`` of ``K`` equal windows (float64).

    In flow time ``tau = (t + 1) / T`` these are ``1, (K-1)/K, ..., 0``: PeRFlow's ``Time_Windows`` [CODE] and
    Rectified Diffusion-Phased's phase ends 999/749/499/249 for ``K = 4`` [CODE]. ``K`` must divide ``T`` so the
    boundaries are integer timesteps.
    """
    T = int(num_train_timesteps)
    require(isinstance(num_windows, int) and num_windows >= 1, f"the window count must be >= 1, got {num_windows}")
    require(num_windows <= T, f"{num_windows} windows exceed the schedule's {T} timesteps")
    require(T % num_windows == 0,
            f"{num_windows} windows do not divide the schedule's {T} timesteps; use a divisor of {T}")
    width = T // num_windows
    return torch.tensor([T - 1 - k * width for k in range(num_windows)] + [-1], dtype=torch.float64)


def check_stage_windows(stages: Sequence[int], num_train_timesteps: int) -> list[torch.Tensor]:
    """Boundaries of every stage of a progressive schedule (e.g. ``8 -> 4 -> 2``), checking that each count
    divides ``T`` and the previous stage's count (so every new window is a union of previous windows)."""
    stages = [int(k) for k in stages]
    require(len(stages) >= 1, "the window schedule needs at least one stage")
    out = []
    for i, k in enumerate(stages):
        out.append(window_boundaries(k, num_train_timesteps))
        if i > 0:
            prev = stages[i - 1]
            require(k < prev and prev % k == 0,
                    f"stage {i + 1} has {k} windows, which does not divide stage {i}'s {prev} windows; each stage "
                    f"must merge whole windows of the previous one (e.g. 8,4,2)")
    return out


def merge_windows(boundaries: torch.Tensor, factor: int) -> torch.Tensor:
    """Merge every ``factor`` adjacent windows: keep every ``factor``-th boundary."""
    k = boundaries.numel() - 1
    require(factor >= 1 and k % factor == 0, f"cannot merge {k} windows in groups of {factor}")
    return boundaries[::factor].clone()


def window_index(t: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """Index ``k`` of the window ``(b_{k+1}, b_k]`` that contains each timestep ``t`` (``t = -1`` -> last)."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
    inner = boundaries[1:-1].to(t.device).reshape(1, -1)
    return (inner >= t - 1e-9).sum(1).clamp(max=boundaries.numel() - 2)


def subwindow_grid(t_start: torch.Tensor, t_end: torch.Tensor, boundaries: torch.Tensor,
                   steps_per_window: int) -> torch.Tensor:
    """Per-sample grids ``[B, N+1]`` from ``t_start`` to ``t_end`` that stop at every boundary in between and take
    ``steps_per_window`` equal steps inside each window (all rows must span the same number of windows)."""
    t_start = torch.as_tensor(t_start, dtype=torch.float64).flatten()
    t_end = torch.as_tensor(t_end, dtype=torch.float64).flatten()
    rows = []
    for ts, te in zip(t_start.tolist(), t_end.tolist()):
        inside = [b for b in boundaries.tolist() if te < b < ts]
        points = [ts, *inside, te]
        row = []
        for a, b in zip(points[:-1], points[1:]):
            row += torch.linspace(a, b, steps_per_window + 1, dtype=torch.float64)[:-1].tolist()
        rows.append(row + [te])
    lengths = {len(r) for r in rows}
    require(len(lengths) == 1, "subwindow_grid: every row must cross the same number of windows")
    return torch.tensor(rows, dtype=torch.float64)


def piecewise_timesteps(num_steps: int, boundaries: torch.Tensor) -> torch.Tensor:
    """The sampler's grid ``[N+1]``: ``N`` steps spread over the windows, the noisiest ones taking the remainder."""
    require(num_steps >= 1, f"steps must be >= 1, got {num_steps}")
    K = boundaries.numel() - 1
    if num_steps < K:  # [INFERRED] a step spans K/N windows
        idx = torch.linspace(0, K, num_steps + 1).round().long()
        return boundaries[idx].clone()
    base, rem = divmod(num_steps, K)
    points: list[float] = []
    for k in range(K):
        n = base + (1 if k < rem else 0)
        seg = torch.linspace(float(boundaries[k]), float(boundaries[k + 1]), n + 1, dtype=torch.float64)
        points += seg[:-1].tolist()
    return torch.tensor(points + [float(boundaries[-1])], dtype=torch.float64)


# ---------------------------------------------------------------------- the window parameterisations
#: what a window student's network outputs (one vocabulary with the rest of the package)
WINDOW_PARAMETERIZATIONS = ("window_epsilon", "epsilon", "flow")
#: PeRFlow's own names, as older student directories and scheduler configs record them
LEGACY_WINDOW_PARAMETERIZATIONS = {"diff_eps": "window_epsilon", "ddim_eps": "epsilon", "velocity": "flow"}


def window_parameterization(name: str) -> str:
    """The canonical name of a window parameterisation (PeRFlow's old names map silently); unknown -> ValueError."""
    name = LEGACY_WINDOW_PARAMETERIZATIONS.get(name, name)
    if name not in WINDOW_PARAMETERIZATIONS:
        raise ValueError(f"unknown window parameterization {name!r}; expected {', '.join(WINDOW_PARAMETERIZATIONS)}")
    return name


def window_coefficients(schedule: VPSchedule, t_start: torch.Tensor, t_end: torch.Tensor,
                        parameterization: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lambda_s, eta_s)`` (float64 ``[B]``) with ``z_e = lambda_s z_s + eta_s eps`` for the epsilon modes."""
    parameterization = window_parameterization(parameterization)
    ab_s, ab_e = schedule.alpha_bar(t_start), schedule.alpha_bar(t_end)
    if parameterization == "window_epsilon":
        gamma = (ab_s / ab_e).sqrt()
        return 1.0 / gamma, -(1.0 - gamma**2).clamp(min=0).sqrt() / gamma
    if parameterization == "epsilon":
        return (ab_e / ab_s).sqrt(), (1.0 - ab_e).sqrt() - (ab_e * (1.0 - ab_s) / ab_s).sqrt()
    raise ValueError(f"no epsilon coefficients for parameterization {parameterization!r}")


def point_coefficients(lam_s: torch.Tensor, eta_s: torch.Tensor, tau_s: torch.Tensor, tau_e: torch.Tensor,
                       tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lambda_t, eta_t)`` at flow time ``tau`` inside the window (PeRFlow's scheduler, see module doc)."""
    d = lam_s * (tau - tau_s) + (tau_e - tau)
    return lam_s * (tau_e - tau_s) / d, eta_s * (tau_e - tau) / d


def epsilon_target(z_start: torch.Tensor, z_end: torch.Tensor, lam_s: torch.Tensor,
                   eta_s: torch.Tensor) -> torch.Tensor:
    """``eps* = (z_e - lambda_s z_s) / eta_s``: the epsilon that makes the whole window one straight chord."""
    return (z_end - expand_like(lam_s, z_end) * z_start) / expand_like(eta_s, z_end)


@dataclass
class WindowPoint:
    """Where a batch sits: timestep ``t``, its window ``(t_s, t_e)`` and the flow times of the three (float64).

    The flow times are computed once per point (a training step reads each several times), and a caller that
    already knows the window coefficients of its batch (a training objective gathers them from a per-window table)
    passes them as ``known_coefficients = (parameterization, lambda_s, eta_s)``: :meth:`coefficients` returns them
    for that parameterisation instead of reading the schedule again.
    """

    t: torch.Tensor
    t_start: torch.Tensor
    t_end: torch.Tensor
    T: int
    known_coefficients: tuple[str, torch.Tensor, torch.Tensor] | None = None

    @cached_property
    def tau(self) -> torch.Tensor:
        return timestep_to_flow_time(self.t, self.T)

    @cached_property
    def tau_start(self) -> torch.Tensor:
        return timestep_to_flow_time(self.t_start, self.T)

    @cached_property
    def tau_end(self) -> torch.Tensor:
        return timestep_to_flow_time(self.t_end, self.T)

    def coefficients(self, schedule: VPSchedule, parameterization: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lambda_s, eta_s)`` of this point's windows (:func:`window_coefficients`)."""
        parameterization = window_parameterization(parameterization)
        known = self.known_coefficients
        if known is not None and known[0] == parameterization:
            return known[1], known[2]
        return window_coefficients(schedule, self.t_start, self.t_end, parameterization)


def window_end_prediction(pred: torch.Tensor, z: torch.Tensor, where: WindowPoint, schedule: VPSchedule,
                          parameterization: str) -> torch.Tensor:
    """The network output at ``z`` turned into the predicted window end ``z_e_hat``."""
    if window_parameterization(parameterization) == "flow":
        return z + expand_like(where.tau_end - where.tau, z) * pred
    lam_s, eta_s = where.coefficients(schedule, parameterization)
    lam_t, eta_t = point_coefficients(lam_s, eta_s, where.tau_start, where.tau_end, where.tau)
    return expand_like(lam_t, z) * z + expand_like(eta_t, z) * pred


def window_velocity(pred: torch.Tensor, z: torch.Tensor, where: WindowPoint, schedule: VPSchedule,
                    parameterization: str) -> torch.Tensor:
    """The network output converted to the window velocity ``v = (z_e_hat - z) / (tau_e - tau)`` (``dz/dtau``)."""
    if window_parameterization(parameterization) == "flow":
        return pred
    z_end = window_end_prediction(pred, z, where, schedule, parameterization)
    return (z_end - z) / expand_like(where.tau_end - where.tau, z)


def native_target(z_start: torch.Tensor, z_end: torch.Tensor, where: WindowPoint, schedule: VPSchedule,
                  parameterization: str) -> torch.Tensor:
    """The regression target in the network's own output space (epsilon* or the chord velocity)."""
    if window_parameterization(parameterization) == "flow":
        return (z_end - z_start) / expand_like(where.tau_end - where.tau_start, z_end)
    lam_s, eta_s = where.coefficients(schedule, parameterization)
    return epsilon_target(z_start, z_end, lam_s, eta_s)


__all__ = ["LEGACY_WINDOW_PARAMETERIZATIONS", "WINDOW_PARAMETERIZATIONS", "WindowPoint", "check_stage_windows",
           "epsilon_target", "merge_windows", "native_target", "piecewise_timesteps", "point_coefficients",
           "subwindow_grid", "window_boundaries", "window_coefficients", "window_end_prediction", "window_index",
           "window_parameterization", "window_velocity"]
