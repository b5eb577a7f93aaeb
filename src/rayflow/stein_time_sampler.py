"""RayFlow's learned Time Sampler ``T_theta`` (our reading of the paper; the reasoning and tags are in
:mod:`rayflow.timestep_dists`' module doc): a mixture of logit-normal components on fixed centres, fitted by
kernelized Stein discrepancy to ``q*(t) ∝ xi_t p(t)``, with ``xi_t`` a ridge-regression model of the student's
per-sample losses.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from rayflow.errors import require
from rayflow.timestep_dists import TimestepDistribution, _cpu_generator, _logit, _normal_cdf


# ---------------------------------------------------------------------- the learned (Stein) Time Sampler
class _ErrorModel:
    """``log xi(u, f) = sum_j beta_j(f) phi_j(u)``: exponentially forgetting ridge regression of the log loss.

    ``phi`` = a constant plus ``num_basis`` Gaussian bumps on ``u`` (width = their spacing); with ``F`` features
    the design is ``phi(u) ⊗ [1, f]``, so the profile over ``t`` may tilt with the instance. The sufficient
    statistics decay by ``decay`` per update, so the estimate tracks the student as it learns. [INFERRED]
    """

    def __init__(self, num_basis: int, num_features: int, decay: float, ridge: float) -> None:
        self.J, self.F = int(num_basis), int(num_features)
        self.centres = (torch.arange(self.J, dtype=torch.float64) + 0.5) / self.J
        self.width = 1.0 / self.J
        self.decay, self.ridge = float(decay), float(ridge)
        dim = (self.J + 1) * (self.F + 1)
        self.A = torch.zeros(dim, dim, dtype=torch.float64)
        self.b = torch.zeros(dim, dtype=torch.float64)
        self.n = torch.zeros((), dtype=torch.float64)
        self.beta = torch.zeros(dim, dtype=torch.float64)

    def _phi(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Basis ``[..., J+1]`` and its derivative in ``u``."""
        z = (u[..., None] - self.centres) / self.width
        bump = torch.exp(-0.5 * z * z)
        dbump = -z / self.width * bump
        one = torch.ones_like(u)[..., None]
        return torch.cat([one, bump], -1), torch.cat([torch.zeros_like(one), dbump], -1)

    def _design(self, basis: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        if self.F == 0:
            return basis
        f1 = torch.cat([torch.ones_like(features[..., :1]), features], -1)  # [..., F+1]
        return (basis[..., :, None] * f1[..., None, :]).flatten(-2)

    def fit(self, u: torch.Tensor, log_loss: torch.Tensor, features: torch.Tensor | None,
            basis: torch.Tensor | None = None) -> None:
        """Add one batch (``basis``: ``phi(u)`` if the caller has it, e.g. from a table over the timestep grid)."""
        basis = self._phi(u.double())[0] if basis is None else basis
        X = self._design(basis, None if features is None else features.double())
        self.A = self.decay * self.A + X.T @ X
        self.b = self.decay * self.b + X.T @ log_loss.double()
        self.n = self.decay * self.n + u.numel()
        scale = float(self.A.diagonal().mean().clamp(min=1e-12))
        eye = torch.eye(self.A.shape[0], dtype=torch.float64)
        self.beta = torch.linalg.solve(self.A + self.ridge * scale * eye, self.b)

    def log_xi_and_score(self, u: torch.Tensor, features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``log xi(u, f)`` and ``d log xi / du`` (differentiable in ``u``); ``features`` broadcasts on ``u``."""
        basis, dbasis = self._phi(u)
        beta = self.beta.to(u.dtype)
        if self.F == 0:
            return basis @ beta, dbasis @ beta
        B = beta.reshape(self.J + 1, self.F + 1)
        coef = torch.cat([torch.ones_like(features[..., :1]), features], -1).to(u.dtype) @ B.T  # [..., J+1]
        return (basis * coef).sum(-1), (dbasis * coef).sum(-1)

    def state_dict(self) -> dict[str, Any]:
        return {"A": self.A.clone(), "b": self.b.clone(), "n": self.n.clone(), "beta": self.beta.clone()}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.A, self.b, self.n, self.beta = (s[k].double().clone() for k in ("A", "b", "n", "beta"))


class _WeightNet(nn.Module):
    """``f -> log pi`` over the ``G`` fixed components; a plain parameter vector when global (``F = 0``).

    Initialised (features or not) to ``pi_k ∝ u_k (1 - u_k)`` at the component centres: the logistic density
    in ``y``, i.e. (close to) uniform ``u``.
    """

    def __init__(self, centres: torch.Tensor, num_features: int, hidden: int = 32) -> None:
        super().__init__()
        self.F = int(num_features)
        u = torch.sigmoid(centres)
        init = torch.log(u * (1 - u))
        self.trunk = nn.Sequential(nn.Linear(self.F, hidden), nn.SiLU()).double() if self.F > 0 else None
        self.head = nn.Linear(hidden if self.F > 0 else 1, centres.numel(), dtype=torch.float64)
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():
            self.head.bias.copy_(init - init.max())

    def forward(self, features: torch.Tensor | None, n: int) -> torch.Tensor:
        if self.trunk is None:
            h = torch.ones(n, 1, dtype=torch.float64)
        else:
            h = self.trunk(torch.zeros(n, self.F, dtype=torch.float64) if features is None else features.double())
        return torch.log_softmax(self.head(h), -1)


def _score_in_y(dlog_xi: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``d/dy log q*`` at ``y = logit(u)`` from ``d log xi / du``: ``xi'(u)/xi(u) * u(1-u) + 1 - 2u``."""
    return dlog_xi * u * (1 - u) + (1 - 2 * u)


def _rbf_stein_kernel(y: torch.Tensor, s: torch.Tensor, h: float) -> torch.Tensor:
    """Langevin-Stein kernel ``k_p(y, y')`` for ``k = exp(-(y - y')^2 / (2 h^2))``; ``y, s`` of shape ``[..., N]``.

    ``k_p = s s' k + s d_{y'} k + s' d_y k + d_y d_{y'} k`` with ``d_y k = -(y - y')/h^2 k``,
    ``d_{y'} k = (y - y')/h^2 k``, ``d_y d_{y'} k = (1/h^2 - (y - y')^2/h^4) k``.
    """
    d = y[..., :, None] - y[..., None, :]
    k = torch.exp(-0.5 * d * d / (h * h))
    si, sj = s[..., :, None], s[..., None, :]
    return k * (si * sj + si * d / (h * h) - sj * d / (h * h) + 1.0 / (h * h) - d * d / (h**4))


class SteinSampler(TimestepDistribution):
    """RayFlow's Time Sampler ``T_theta``: a logit-normal mixture fitted to ``q* ∝ xi_t p(t)`` by KSD descent.

    ``T_theta(y) = sum_k pi_k(f) N(y; c_k, w^2)`` in ``y = logit(u)``: ``G`` components on a fixed grid
    ``c_k`` spanning the timestep range, width ``w`` = the grid spacing, weights ``pi(f)`` from a small MLP on
    the instance features (a free vector when global). Each :meth:`update` first feeds the batch's losses to
    the error model (the estimate of ``xi``), then, after ``warmup`` updates, takes ``ksd_steps`` Adam steps
    on ``KSD^2(T_theta || q*)``.

    Why fixed centres [INFERRED, measured]: with free means and widths (e.g. the five components Fig. 2 might
    suggest) KSD descent stalled at stationary points and left the mass off the planted error peak - KSD is
    famously blind to mixing proportions along such paths. With the centres fixed, ``KSD^2 = pi^T K_p pi``
    (``K_p`` the Stein kernel integrated over each pair of components) is a convex quadratic in the weights
    - black-box importance weights (Liu & Lee 2017) made amortised - and the fit is reliable. Component
    integrals use ``quadrature`` Gauss-Hermite nodes, so the objective is deterministic given ``xi``; its
    stochasticity is that of ``xi``, estimated from minibatch losses (the "stochastic" Stein discrepancy).

    Args:
        num_features: instance features the density is conditioned on (0: one global density).
        components: grid size ``G``.
        bandwidth: RBF bandwidth ``h`` of the Stein kernel, in logit units.
        uniform_mix: fraction of uniform draws (defensive importance sampling).
        instances: instances per KSD step when conditioned on features.
    """

    name = "learned"

    def __init__(self, num_timesteps: int, num_features: int = 0, components: int = 48, bandwidth: float = 0.5,
                 lr: float = 0.05, ksd_steps: int = 1, warmup: int = 50, uniform_mix: float = 0.1,
                 num_basis: int = 16, decay: float = 0.98, ridge: float = 1e-3, weight_clip: float = 10.0,
                 hidden: int = 32, instances: int = 16, quadrature: int = 6) -> None:
        super().__init__(num_timesteps, weight_clip)
        require(components >= 2, f"learned time sampler: components must be >= 2, got {components}")
        require(bandwidth > 0, f"learned time sampler: bandwidth must be > 0, got {bandwidth}")
        require(0 <= uniform_mix < 1, f"learned time sampler: uniform_mix must be in [0, 1), got {uniform_mix}")
        require(0 < decay <= 1, f"learned time sampler: decay must be in (0, 1], got {decay}")
        require(ksd_steps >= 1 and warmup >= 0, "learned time sampler: ksd_steps >= 1 and warmup >= 0 required")
        require(quadrature >= 1, f"learned time sampler: quadrature must be >= 1, got {quadrature}")
        self.F, self.G = int(num_features), int(components)
        self.h, self.ksd_steps = float(bandwidth), int(ksd_steps)
        self.warmup, self.uniform_mix, self.instances = int(warmup), float(uniform_mix), int(instances)
        y_max = math.log(self.T - 0.5) - math.log(0.5)  # logit of the last bin centre
        self.centres = torch.linspace(-y_max, y_max, self.G, dtype=torch.float64)
        self.width = float(self.centres[1] - self.centres[0])
        import numpy as np

        x, wq = np.polynomial.hermite.hermgauss(quadrature)
        self._nodes = (self.centres[:, None] + self.width * math.sqrt(2) * torch.tensor(x)).reshape(-1)
        self._node_w = torch.tensor(wq / math.sqrt(math.pi))  # [Q]
        self.net = _WeightNet(self.centres, self.F, hidden)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.error = _ErrorModel(num_basis, self.F, decay, ridge)
        self.updates = 0
        self._edges = _logit(torch.linspace(0, 1, self.T + 1, dtype=torch.float64))  # -inf .. inf
        # Tables of what never changes, so the global sampler's per-step host work (an update and a draw every
        # training step) is a few small matrix products (BENCHMARKS §6.5):
        # - each component's mass in each timestep bin: the mixture's bin masses are then pi @ bin_mass
        z = (self._edges[None, :] - self.centres[:, None]) / self.width
        cdf = _normal_cdf(z)
        self._bin_mass = cdf[:, 1:] - cdf[:, :-1]  # [G, T]
        # - the error model's basis at every timestep's u = (t + 1/2) / T
        self._basis_t = self.error._phi((torch.arange(self.T, dtype=torch.float64) + 0.5) / self.T)[0]
        # - u and the basis' derivative at the quadrature nodes (where the target score is needed)
        u = torch.sigmoid(self._nodes)
        self._node_u, self._node_dbasis = u, self.error._phi(u)[1]

    @property
    def active(self) -> bool:
        return self.updates >= self.warmup

    def _check_features(self, features: torch.Tensor | None, n: int) -> torch.Tensor | None:
        if self.F == 0:
            return None
        require(features is not None and tuple(features.shape) == (n, self.F),
                f"learned time sampler: expected features of shape [{n}, {self.F}]")
        return features.detach().double().cpu()

    def _with_uniform(self, mass: torch.Tensor) -> torch.Tensor:
        return (1 - self.uniform_mix) * mass.clamp(min=0) + self.uniform_mix / self.T

    @torch.no_grad()
    def probs(self, features=None):
        if not self.active:
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        if self.F == 0:
            return self._global_probs()
        n = 1 if features is None else features.shape[0]
        feats = None if self.F == 0 or features is None else features.detach().double().cpu()
        return self._with_uniform(self.net(feats, n).exp() @ self._bin_mass).mean(0)

    def _global_probs(self) -> torch.Tensor:
        # the global density changes only in update(): computed once per update, not per draw or snapshot
        if getattr(self, "_probs_cache", None) is None:
            self._probs_cache = self._with_uniform(self.net(None, 1)[0].exp() @ self._bin_mass)
        return self._probs_cache

    @torch.no_grad()
    def sample(self, n, generator=None, features=None):
        g = _cpu_generator(generator)
        feats = self._check_features(features, n)
        if not self.active:
            return torch.randint(0, self.T, (n,), generator=g), torch.ones(n)
        if self.F == 0:
            # one global density: draw the timesteps straight from their bin masses. That is the same law as
            # drawing y from the mixture, taking its bin and mixing in uniform draws, at a tenth of the host
            # time, which matters once the GPU step is replayed from CUDA graphs (BENCHMARKS §6.3)
            probs = self._global_probs()
            t = torch.multinomial(probs, n, replacement=True, generator=g)
            return t, self._weights(probs[t])
        log_pi = self.net(feats, n).expand(n, -1)
        comp = torch.multinomial(log_pi.exp(), 1, replacement=True, generator=g)[:, 0]
        y = self.centres[comp] + self.width * torch.randn(n, generator=g, dtype=torch.float64)
        t = self._to_timesteps(torch.sigmoid(y))
        uniform = torch.rand(n, generator=g) < self.uniform_mix
        t = torch.where(uniform, torch.randint(0, self.T, (n,), generator=g), t)
        return t, self._weights(self._with_uniform((log_pi.exp() * self._bin_mass[:, t].T).sum(-1)))

    def target_score(self, y: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """``d/dy log q*(y)`` for ``q*(u) ∝ xi(u) p(u)`` (``p`` uniform) pushed to ``y = logit(u)``.

        ``log q*_y(y) = log xi(u) + log u(1 - u) + const``, so ``score = xi'(u)/xi(u) * u(1-u) + 1 - 2u``.
        """
        u = torch.sigmoid(y)
        return _score_in_y(self.error.log_xi_and_score(u, features)[1], u)

    def ksd2(self, features: torch.Tensor | None = None) -> torch.Tensor:
        """``KSD^2(T_theta || q*) = E_{y, y' ~ T_theta} k_p(y, y')``, by quadrature; averaged over instances.

        With the nodes fixed, ``k``, ``d_y d_{y'} k`` and ``d_{y'} k`` are constant matrices, so
        ``w^T K_p w = (w s)^T k (w s) + 2 (w s)^T B w + w^T A w`` (``B`` antisymmetric) needs only the
        target score ``s`` at the nodes - no ``[n, N, N]`` kernel per instance.
        """
        n = 1 if features is None else features.shape[0]
        log_pi = self.net(features, n)  # [n, G]
        w = (log_pi.exp()[..., None] * self._node_w).reshape(n, -1)  # [n, N]
        y = self._nodes
        with torch.no_grad():  # the centres are fixed: only the weights carry gradient
            if features is None:
                score = self.target_score(y, None)[None]
            else:
                score = self.target_score(y.expand(n, -1), features[:, None, :].expand(-1, y.numel(), -1))
        k, B, A = self._kernel_parts()
        ws = w * score
        return ((ws @ k) * ws + 2 * (ws @ B) * w + (w @ A) * w).sum(-1).mean()

    def _ksd2_and_grad_global(self) -> torch.Tensor:
        """:meth:`ksd2` of the global density, with the gradient of its logits set in closed form (no autograd).

        ``KSD^2 = (s∘w)^T k (s∘w) + 2 (s∘w)^T B w + w^T A w`` with ``w = pi ⊗ v`` (``v`` the quadrature weights,
        ``s`` the target score at the nodes; ``k``, ``A`` symmetric), so
        ``dKSD^2/dw = 2 s∘(k (s∘w)) + 2 s∘(B w) + 2 B^T (s∘w) + 2 A w``; then ``d/dpi_g = sum_q v_q (d/dw)_{g,q}``
        and, through ``pi = softmax(l)``, ``d/dl = pi ∘ (d/dpi - <pi, d/dpi>)``. The head's weight and bias both
        receive ``d/dl`` (its input is 1).
        """
        head = self.net.head
        with torch.no_grad():
            pi = torch.softmax(head.weight[:, 0] + head.bias, 0)
            w = (pi[:, None] * self._node_w).reshape(-1)
            # target_score(nodes) from the tables: d log xi/du = dphi(u) @ beta
            s = _score_in_y(self._node_dbasis @ self.error.beta, self._node_u)
            k, B, A = self._kernel_parts()
            ws = s * w
            k_ws, B_w, A_w = k @ ws, B @ w, A @ w
            loss = ws @ k_ws + 2 * (ws @ B_w) + w @ A_w
            grad_w = 2 * (s * k_ws + s * B_w + B.T @ ws + A_w)
            grad_pi = (grad_w.reshape(self.G, -1) * self._node_w).sum(1)
            grad_logits = pi * (grad_pi - (pi * grad_pi).sum())
            head.weight.grad = grad_logits[:, None].clone()
            head.bias.grad = grad_logits.clone()
            return loss

    def _kernel_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if getattr(self, "_parts", None) is None:
            d = self._nodes[:, None] - self._nodes[None, :]
            h2 = self.h * self.h
            k = torch.exp(-0.5 * d * d / h2)
            self._parts = (k, k * d / h2, k * (1.0 / h2 - d * d / (h2 * h2)))
        return self._parts

    def update(self, t, losses, features=None, generator=None):
        g = _cpu_generator(generator)
        t = t.detach().cpu().long()
        feats = self._check_features(features, t.shape[0])
        u = (t.double() + 0.5) / self.T
        self.error.fit(u, torch.log(losses.detach().double().cpu().clamp(min=1e-12)), feats, self._basis_t[t])
        self.updates += 1
        self._probs_cache = None
        if not self.active:
            return {}
        sub = feats
        if feats is not None and feats.shape[0] > self.instances:
            sub = feats[torch.randperm(feats.shape[0], generator=g)[: self.instances]]
        for _ in range(self.ksd_steps):
            self.opt.zero_grad(set_to_none=True)
            if self.F == 0:
                loss = self._ksd2_and_grad_global()  # closed form: this runs on the host every training step
            else:
                loss = self.ksd2(sub)
                loss.backward()
            self.opt.step()
        return {"ts_ksd": loss.detach()}  # a tensor: the trainer reads logs once per log interval

    @torch.no_grad()
    def target_probs(self, features: torch.Tensor | None = None) -> torch.Tensor:
        """The current estimate of ``q*(t) ∝ xi_t p(t)`` on the timestep grid (averaged over ``features`` rows)."""
        u = (torch.arange(self.T, dtype=torch.float64) + 0.5) / self.T
        if self.F == 0:
            return torch.softmax(self.error.log_xi_and_score(u, None)[0], 0)
        rows = torch.zeros(1, self.F, dtype=torch.float64) if features is None else features.detach().double().cpu()
        qs = [torch.softmax(self.error.log_xi_and_score(u, f.expand(self.T, -1))[0], 0) for f in rows]
        return torch.stack(qs).mean(0)

    def state_dict(self):
        # copies: torch's optimizer state_dict aliases the live moment buffers, which later updates would change
        return {"net": copy.deepcopy(self.net.state_dict()), "opt": copy.deepcopy(self.opt.state_dict()),
                "error": self.error.state_dict(), "updates": self.updates}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(copy.deepcopy(state["opt"]))
        self.error.load_state_dict(state["error"])
        self.updates = int(state["updates"])
        self._probs_cache = None


__all__ = ["SteinSampler"]
