r"""RayFlow (Shao et al., CVPR 2025, arXiv 2503.07699): instance-aware rays from data to a teacher-chosen noise.

The paper's method section could not be obtained; ``../shared/research/rayflow-paper.md`` reconstructs it and
tags every piece. Tags below: [RECOVERED] = the paper's wording or formula as recovered, [INFERRED] = the
reconstruction's derivation, [OURS] = a choice made here (by measurement where possible; see docs/rayflow.md).

Notation (paper's kernel notation = DDPM's square roots, reconstruction §1): ``a_t = sqrt(alpha_bar_t)``,
``s_t = sqrt(1 - alpha_bar_t)``; integer timesteps ``0 .. T-1`` (large = noise), ``t = -1`` is clean data.

Algorithm 1 - training (:class:`~.objective.RayFlowObjective`)::

    instance (x0, c, eps):  eps ~ N(0, I); x0 from data [RECOVERED: real data] or the teacher's ODE from eps [OURS]
    eps_mu = 1/K sum_k eps_phi(a_k x0 + s_k eps, t_k, c)     unified noise expectation  [RECOVERED: E_t[E[eps_t]];
                                                                                            recipe INFERRED §2.3]
    t ~ T_theta (Time Sampler) or a fixed sampler;  w = p(t) / q(t)                        [RECOVERED q* ∝ xi_t p(t)]
    x_t = a_t x0 + (1 - a_t) eps_mu + sigma s_t z             the ray process   [RECOVERED kernel, closed form
                                                                                 INFERRED: barred a_t, sigma on z]
    L = w * lambda(t) * || pred_theta(x_t, t, c) - target ||^2
        epsilon form: pred = eps_mu estimate, target eps_mu                 [INFERRED §2.7, the paper's eps-form]
        velocity form: pred = v estimate, target v = x0 - eps_mu            [OURS: x0 = x_t + (1 - a_t) v]

Algorithm 2/3 - sampling (:func:`~.ray.ray_sample`)::

    x = N(0, I) [* start_std]                                          [INFERRED A3; variance-matched: OURS]
    for t > t' on the grid:  x0_hat = (x - (1 - a_t) eps_hat) / a_t;  x = a_t' x0_hat + (1 - a_t') eps_hat
    (one step: x0 = (x_T - (1 - a_T) eps_hat) / a_T                                  [RECOVERED §2.9])

In velocity form the same step is ``x' = x + (a_t' - a_t) v_hat``: Euler in ``a`` along the ray, no division.

Student = teacher network behind an exact change of variables (:class:`RayParameterization`): a ray point
``x = a x0 + (1-a) eps_mu`` is the VP point ``c x = a' x0 + s' eps_mu`` with ``c = 1/sqrt(a^2 + (1-a)^2)``,
``a' = c a``, ``s' = c (1-a)`` (same SNR, unit variance), at the fractional timestep ``t'`` whose
``alpha_bar = a'^2``. The network is called there, on the diffusers timestep scale, and its prediction (of any
type) converts exactly to the ray's ``(x0, eps_mu)``; so an epsilon teacher initialises either form exactly
(``network_prediction=epsilon``). The default velocity student instead reads the teacher's weights as a flow
head (InstaFlow's move) [OURS, measured: docs/rayflow.md §3.3].

Where each piece lives::

    config.py        the options, in sections (targets, ray, time, sampling); validation
    ray.py           the ray algebra, the VP-matched change of variables, the student wrapper, the ray sampler
    targets.py       eps_mu, teacher x0, the instance source and its cached pools
    time_sampler.py  the Time Sampler built from its config section, and its log
    readings.py      issue #14's readings of eps_mu (trajectory, start-consistent) and the consistency loss
    objective.py     Algorithm 1, one student update
    method.py        the Method: wiring of the above into distil / sample
"""

from __future__ import annotations

from rayflow.methods.rayflow.config import (
    RayConfig,
    RayFlowConfig,
    SamplingConfig,
    TargetConfig,
    TimeSamplerConfig,
    parse_timestep_list,
    validate_config,
)
from rayflow.methods.rayflow.method import RayFlow, epsilon_teacher
from rayflow.methods.rayflow.objective import RayFlowObjective, snr_weight_table
from rayflow.methods.rayflow.ray import (
    RayParameterization,
    RayStudent,
    check_grid,
    ray_point,
    ray_sample,
    ray_target,
    ray_x0_eps,
    vp_matched,
)
from rayflow.methods.rayflow.readings import (
    EPS_MU_READINGS,
    Trajectory,
    TrajectoryRecorder,
    consistency_residual,
    ray_time_of_vp,
    start_consistent_eps_mu,
    teacher_trajectory,
)
from rayflow.methods.rayflow.targets import (
    InstanceSource,
    _noise_from_seeds,
    eps_mu_timesteps,
    instance_features,
    teacher_x0,
    unified_noise_expectation,
)

__all__ = ["EPS_MU_READINGS", "Trajectory", "TrajectoryRecorder", "consistency_residual", "ray_time_of_vp",
           "start_consistent_eps_mu", "teacher_trajectory",
           "InstanceSource", "RayConfig", "RayFlow", "RayFlowConfig", "RayFlowObjective", "RayParameterization",
           "RayStudent", "SamplingConfig", "TargetConfig", "TimeSamplerConfig", "check_grid", "eps_mu_timesteps",
           "epsilon_teacher", "instance_features", "parse_timestep_list", "ray_point", "ray_sample", "ray_target",
           "ray_x0_eps", "snr_weight_table", "teacher_x0", "unified_noise_expectation", "validate_config",
           "vp_matched", "_noise_from_seeds"]
