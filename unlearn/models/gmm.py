"""Gaussian mixtures: exact densities, exact noisy denoisers, and the unlearning oracle.

Everything here is closed form (or a quadrature on a grid), so tests and metrics can compare
learned models, samplers and estimators against exact answers.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..schedule import NoiseSchedule
from .base import ScoreModel


def formulation_class(formulation):
    from ..formulations.base import formulation_class as lookup  # lazy: the formulations import the models

    return lookup(formulation)


class GaussianMixture:
    """Isotropic Gaussian mixture ``sum_k w_k N(m_k, s_k^2 I)`` in ``dim`` dimensions."""

    def __init__(self, means, stds, weights):
        self.means = torch.as_tensor(np.asarray(means, dtype=np.float64))
        self.stds = torch.as_tensor(np.asarray(stds, dtype=np.float64))
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        self.weights = w / w.sum()
        if self.means.ndim != 2:
            raise ValueError("means must be a list of points")
        if not (len(self.means) == len(self.stds) == len(self.weights)):
            raise ValueError("means, stds and weights must have the same length")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return len(self.weights)

    def subset(self, idx: Sequence[int]) -> "GaussianMixture":
        idx = list(idx)
        return GaussianMixture(self.means[idx], self.stds[idx], self.weights[idx])

    def noisy(self, abar: float) -> "GaussianMixture":
        """The marginal of ``x_t = sqrt(abar) x_0 + sqrt(1-abar) e``."""
        var = abar * self.stds**2 + (1.0 - abar)
        return GaussianMixture(math.sqrt(abar) * self.means, var.sqrt(), self.weights)

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log w_k + log N(x; m_k, s_k^2 I)``, shape (N, K)."""
        x = x.to(torch.float64)
        d = self.dim
        sq = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)
        var = self.stds**2
        return (torch.log(self.weights) - 0.5 * d * torch.log(2 * math.pi * var))[None] - sq / (2 * var[None])

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self.component_log_prob(x), dim=1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        x64 = x.to(torch.float64)
        r = torch.softmax(self.component_log_prob(x64), dim=1)  # responsibilities (N, K)
        var = self.stds**2
        per = -(x64[:, None, :] - self.means[None]) / var[None, :, None]
        return (r[:, :, None] * per).sum(1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * z).float()

    def nearest_component(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x.to(torch.float64), self.means).argmin(1)


def draw_mixture(seed: int, components=(3, 5), box: float = 4.0, stds=(0.3, 0.8), weights=(0.5, 2.0),
                 num_unlearn=(1, 2), kl_range=(20.0, 200.0), max_tries: int = 10_000) -> dict:
    """A random 2-D mixture for property tests: ``components`` (inclusive range) isotropic Gaussians
    with means uniform in ``[-box, box]^2`` (centres at least ``2 (s_a + s_b) + 0.5`` apart), widths
    and unnormalised weights uniform in their ranges, ``num_unlearn`` of them unlearned, redrawn until
    every pretrained ``KL(p_pre || q_i)`` (exact, on the oracle's grid) lies in ``kl_range`` nats.
    Returns the ``model.*`` keys (``means``, ``stds``, ``weights``, ``unlearn``) and ``kl_pre``."""
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        k = int(rng.integers(components[0], components[1] + 1))
        means = rng.uniform(-box, box, size=(k, 2))
        s = rng.uniform(*stds, size=k)
        gap = np.linalg.norm(means[:, None] - means[None], axis=-1) - 2 * (s[:, None] + s[None]) - 0.5
        if (gap + np.eye(k) * 1e9).min() < 0:
            continue
        w = rng.uniform(*weights, size=k)
        m = int(rng.integers(num_unlearn[0], num_unlearn[1] + 1))
        unlearn = sorted(int(i) for i in rng.choice(k, size=m, replace=False))
        gmm = GaussianMixture(means, s, w)
        o = GMMOracle(gmm, unlearn)
        grid = o.grid()
        logp = grid.normalize_log(o.log_pre(grid.points))
        kl = -grid.expect(logp, o.log_l(grid.points)).numpy()  # KL(p_pre || q_i) = -E_pre[llr_i]
        if kl.min() < kl_range[0] or kl.max() > kl_range[1]:
            continue
        return {"means": np.round(means, 3).tolist(), "stds": np.round(s, 3).tolist(),
                "weights": np.round(w / w.sum(), 3).tolist(), "unlearn": unlearn, "kl_pre": kl.round(2).tolist()}
    raise RuntimeError(f"no mixture with pretrained KLs in {kl_range} after {max_tries} draws")


class ExactGMMScore(ScoreModel):
    """The exact noise prediction of a Gaussian mixture at every timestep of a schedule."""

    def __init__(self, gmm: GaussianMixture, schedule: NoiseSchedule):
        super().__init__()
        self.gmm = gmm
        self.schedule = schedule
        self.sample_shape = (gmm.dim,)

    def eps(self, x, t, cond=None):
        t = self._timesteps(t, x)
        abar = self.schedule.abar.to(torch.float64)[t.cpu()].to(x.device)  # (N,)
        x64 = x.to(torch.float64)
        m = self.gmm.means.to(x.device)
        var = abar[:, None] * (self.gmm.stds.to(x.device) ** 2)[None] + (1 - abar[:, None])  # (N, K)
        mean = abar.sqrt()[:, None, None] * m[None]  # (N, K, d)
        sq = ((x64[:, None, :] - mean) ** 2).sum(-1)
        logc = torch.log(self.gmm.weights.to(x.device))[None] - 0.5 * self.gmm.dim * torch.log(var) - sq / (2 * var)
        r = torch.softmax(logc, dim=1)
        score = (r[:, :, None] * (-(x64[:, None, :] - mean) / var[:, :, None])).sum(1)
        return (-(1 - abar).sqrt()[:, None] * score).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Grid quadrature
# ----------------------------------------------------------------------------------------------
@dataclass
class Grid:
    """A regular grid in 1-D or 2-D with cell volume ``dv``."""

    axes: list[np.ndarray]

    @classmethod
    def around(cls, centers: np.ndarray, margin: float, n: int = 256) -> "Grid":
        lo = centers.min(0) - margin
        hi = centers.max(0) + margin
        return cls([np.linspace(lo[j], hi[j], n) for j in range(centers.shape[1])])

    @property
    def dim(self) -> int:
        return len(self.axes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(a) for a in self.axes)

    @property
    def dv(self) -> float:
        return float(np.prod([a[1] - a[0] for a in self.axes]))

    @functools.cached_property
    def points(self) -> torch.Tensor:
        """The grid's points, (N, dim), built once (treat as read-only)."""
        mesh = np.meshgrid(*self.axes, indexing="ij")
        return torch.as_tensor(np.stack([m.ravel() for m in mesh], 1))

    def normalize_log(self, logp: torch.Tensor) -> torch.Tensor:
        """Normalise an unnormalised log-density on the grid to integrate to 1."""
        return logp - torch.logsumexp(logp, 0) - math.log(self.dv)

    def expect(self, logp: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(logp, 0)
        return (w[:, None] * f.reshape(len(w), -1)).sum(0)

    def kl(self, logp: torch.Tensor, logq: torch.Tensor) -> float:
        """KL(p || q) of two normalised grid log-densities."""
        p = torch.exp(logp) * self.dv
        mask = p > 1e-300
        return float((p[mask] * (logp[mask] - logq[mask])).sum())

    def smooth(self, density: np.ndarray, bandwidth: float) -> np.ndarray:
        """Convolve a grid density with an isotropic Gaussian kernel (separable)."""
        out = density.reshape(self.shape)
        for j, a in enumerate(self.axes):
            h = a[1] - a[0]
            half = int(math.ceil(4 * bandwidth / h))
            k = np.exp(-0.5 * (np.arange(-half, half + 1) * h / bandwidth) ** 2)
            k /= k.sum()
            out = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), j, out)
        return out.ravel()

    def kde_log_density(self, samples: np.ndarray, bandwidth: float) -> torch.Tensor:
        """Histogram of samples on the grid smoothed by a Gaussian kernel, as a log-density."""
        edges = [np.concatenate([a - (a[1] - a[0]) / 2, [a[-1] + (a[1] - a[0]) / 2]]) for a in self.axes]
        hist, _ = np.histogramdd(samples.reshape(len(samples), -1), bins=edges)
        dens = self.smooth(hist.ravel().astype(np.float64), bandwidth)
        dens = np.maximum(dens, 1e-300)
        return self.normalize_log(torch.as_tensor(np.log(dens)))


# ----------------------------------------------------------------------------------------------
# Oracle: exact targets, constraint values and optimal multipliers
# ----------------------------------------------------------------------------------------------
class GMMOracle:
    """Exact side of the GMM problems (formulas.md section 1), by quadrature on a grid.

    ``p_pre`` is the mixture, ``q_i`` the component ``unlearn[i]``, ``l_i = q_i / p_pre``.
    """

    def __init__(self, gmm: GaussianMixture, unlearn: Sequence[int], grid_size: int = 256,
                 ru_cap: float | None = None):
        if gmm.dim > 2:
            raise ValueError("the grid oracle supports dim 1 or 2")
        self.gmm = gmm
        self.unlearn = list(unlearn)
        self.retain = [k for k in range(gmm.num_components) if k not in self.unlearn]
        self.concepts = [gmm.subset([i]) for i in self.unlearn]
        self.retained = gmm.subset(self.retain) if self.retain else None
        self.grid_size = grid_size
        self._grids: dict = {}
        if ru_cap is not None and not float(ru_cap) > 0:
            raise ValueError(f"ru_cap must be > 0 or None (got {ru_cap})")
        self.ru_cap = None if ru_cap is None else float(ru_cap)

    # -- grids -------------------------------------------------------------------------------
    def grid(self, spread: float = 1.0) -> Grid:
        """A grid covering the mixture; ``spread`` > 1 widens it (RU targets move modes out)."""
        key = round(spread, 3)
        if key not in self._grids:
            m = self.gmm.means.numpy()
            c = m.mean(0)
            centers = c + spread * (m - c)
            margin = 7.0 * float(self.gmm.stds.max())
            n = int(min(self.grid_size * math.sqrt(spread), 3 * self.grid_size))
            self._grids[key] = Grid.around(centers, margin, n)
        return self._grids[key]

    def _ru_spread(self, mu) -> float:
        mu_bar = float(np.asarray(mu, dtype=np.float64).sum())
        return min(1.0 + 2.0 * mu_bar / max(1.0 - mu_bar, 1e-3), 8.0)

    # -- basic quantities on a grid ----------------------------------------------------------
    def _on_grid(self, name: str, x, fn):
        """``fn(x)``, computed once per oracle grid when ``x`` is the points of one (the dual solvers
        evaluate the same densities on the same grid many times); other inputs are not cached."""
        for g in self._grids.values():
            if g.__dict__.get("points") is x:
                cache = g.__dict__.setdefault("_oracle_cache", {})
                if name not in cache:
                    cache[name] = fn(x)
                return cache[name]
        return fn(x)

    def log_pre(self, x):
        return self._on_grid("log_pre", x, self.gmm.log_prob)

    def log_q(self, x):
        return self._on_grid("log_q", x, lambda y: torch.stack([q.log_prob(y) for q in self.concepts], 1))

    def log_l(self, x):
        """``log l_i(x) = log q_i(x) - log p_pre(x)``, shape (N, m)."""
        return self.log_q(x) - self.log_pre(x)[:, None]

    def likelihood(self, x):
        return torch.exp(self.log_l(x))

    def ru_log_ratio(self, x):
        """RU's per-point log-ratios ``log q_i - log p_pre``, floored at ``-ru_cap`` when capped
        (capped separation: ``KL(p || p_pre) + E_p[min(log p_pre / q_i, cap)]``)."""
        llr = self.log_l(x)
        return llr if self.ru_cap is None else llr.clamp(min=-self.ru_cap)

    def _ru_log_target(self, x, mu: torch.Tensor):
        """Unnormalised log of the RU target ``p_pre exp(-sum_j c_j llr_j)``, ``c = mu / (1 - mu_bar)``."""
        return self.log_pre(x) - (self.ru_log_ratio(x) * (mu / (1 - float(mu.sum())))[None]).sum(1)

    # -- per-formulation primitives (each formulation states its exact problem with these) --------
    def _multipliers(self, multipliers) -> torch.Tensor:
        mu = torch.as_tensor(np.asarray(multipliers, dtype=np.float64)).reshape(-1)
        if len(mu) != len(self.unlearn):
            raise ValueError(f"expected {len(self.unlearn)} multipliers, got {len(mu)}")
        return mu

    def ru_grid(self, multipliers) -> Grid:
        """The grid RU's target at ``multipliers`` needs (it moves the retained modes outwards)."""
        return self.grid(self._ru_spread(multipliers))

    def ru_target(self, multipliers, grid: Grid | None = None):
        """RU (Corollary 1): ``p_pre exp(-sum_j c_j llr_j)``, ``c = mu / (1 - mu_bar)``; returns (grid, logp)."""
        mu = self._multipliers(multipliers)
        mu_bar = float(mu.sum())
        if mu_bar >= 1:
            raise ValueError(f"RU target needs sum of multipliers < 1 (got {mu_bar})")
        grid = grid or self.ru_grid(mu)
        return grid, grid.normalize_log(self._ru_log_target(grid.points, mu))

    def lu_target(self, multipliers, grid: Grid | None = None):
        """LU: ``p_pre exp(-sum_i lam_i l_i)``; returns (grid, logp)."""
        mu = self._multipliers(multipliers)
        grid = grid or self.grid()
        x = grid.points
        return grid, grid.normalize_log(self.log_pre(x) - (self.likelihood(x) * mu[None]).sum(1))

    def fu_target(self, multipliers, grid: Grid | None = None):
        """FU: ``p_pre - sum_i mu_i q_i`` (needs to stay >= 0); returns (grid, logp)."""
        mu = self._multipliers(multipliers)
        grid = grid or self.grid()
        x = grid.points
        p = torch.exp(self.log_pre(x)) - (torch.exp(self.log_q(x)) * mu[None]).sum(1)
        if float(p.min()) < -1e-12 * float(torch.exp(self.log_pre(x)).max()):
            raise ValueError("FU target needs p_pre >= sum_i mu_i q_i everywhere")
        return grid, grid.normalize_log(torch.log(torch.clamp(p, min=1e-300)))

    def ru_values(self, multipliers) -> np.ndarray:
        """``KL(p_rev || q_i) = KL(p_rev || p_pre) - E_rev[llr_i]`` at RU's target (or its capped form)."""
        grid, logp = self.ru_target(multipliers)
        x = grid.points
        kl_pre = grid.kl(logp, grid.normalize_log(self.log_pre(x)))
        return (kl_pre - grid.expect(logp, self.ru_log_ratio(x))).numpy()

    def lu_values(self, multipliers) -> np.ndarray:
        """``E_p[l_i]`` at LU's target."""
        grid, logp = self.lu_target(multipliers)
        return grid.expect(logp, self.likelihood(grid.points)).numpy()

    def fu_values(self, multipliers) -> np.ndarray:
        """``KL(q_i || p_fw)`` at FU's target."""
        grid, logp = self.fu_target(multipliers)
        x = grid.points
        return np.array([grid.kl(grid.normalize_log(q.log_prob(x)), logp) for q in self.concepts])

    def ru_dual(self, multipliers, thresholds) -> tuple[float, np.ndarray]:
        mu, b = np.asarray(multipliers, dtype=np.float64), np.asarray(thresholds, dtype=np.float64)
        grid = self.ru_grid(mu)
        logr = self._ru_log_target(grid.points, torch.as_tensor(mu))
        logz = float(torch.logsumexp(logr, 0)) + math.log(grid.dv)
        return float(-(1 - mu.sum()) * logz + mu @ b), np.asarray(b - self.ru_values(mu), dtype=np.float64)

    def lu_dual(self, multipliers, thresholds) -> tuple[float, np.ndarray]:
        mu, b = np.asarray(multipliers, dtype=np.float64), np.asarray(thresholds, dtype=np.float64)
        grid = self.grid()
        x = grid.points
        logr = self.log_pre(x) - (self.likelihood(x) * torch.as_tensor(mu)[None]).sum(1)
        logz = float(torch.logsumexp(logr, 0)) + math.log(grid.dv)
        return float(-logz - mu @ b), np.asarray(self.lu_values(mu) - b, dtype=np.float64)

    def fu_dual(self, multipliers, thresholds) -> tuple[float, np.ndarray]:
        mu, b = np.asarray(multipliers, dtype=np.float64), np.asarray(thresholds, dtype=np.float64)
        grid, logp = self.fu_target(mu)
        x = grid.points
        p_pre = self.gmm.log_prob(x)
        qs = self.log_q(x)
        dv = grid.dv
        ent = float((torch.exp(p_pre) * p_pre).sum() * dv) - sum(
            float(mu[i] * (torch.exp(qs[:, i]) * qs[:, i]).sum() * dv) for i in range(len(mu)))
        mix = torch.exp(p_pre) - (torch.exp(qs) * torch.as_tensor(mu)[None]).sum(1)
        val = ent - float((mix * logp).sum() * dv) + mu @ b
        return float(val), np.asarray(b - self.fu_values(mu), dtype=np.float64)

    def ru_upper_bounds(self) -> list[float]:
        return [0.98] * len(self.unlearn)

    def lu_upper_bounds(self) -> list[float]:
        return [1e3] * len(self.unlearn)

    def fu_upper_bounds(self) -> list[float]:
        """FU's target stays a density while each ``mu_i`` is below the component's weight."""
        return [float(self.gmm.weights[i]) * (1 - 1e-9) for i in self.unlearn]

    def solve_dual(self, dual, thresholds, upper: list[float], max_sum: float | None = None,
                   name: str = "") -> np.ndarray:
        """Maximise a concave dual ``dual(mu, b) -> (value, gradient)`` over ``0 <= mu <= upper`` (and
        ``sum mu <= max_sum``): the exact optimal multipliers for ``thresholds`` (``name``: the problem's,
        for the error message)."""
        from scipy.optimize import brentq, minimize

        b = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        m = len(self.unlearn)
        if m == 1:
            def slack(v):
                return dual([v], b)[1][0]
            hi = upper[0]
            if slack(0.0) <= 0:  # constraint inactive at the pretrained model
                return np.zeros(1)
            if slack(hi) > 0:
                raise ValueError(f"thresholds {b} are infeasible for {name}")
            return np.array([brentq(slack, 0.0, hi, xtol=1e-10, rtol=1e-10)])

        def neg(v):
            val, grad = dual(v, b)
            return -val, -grad

        cons = []
        if max_sum is not None:
            cons = [{"type": "ineq", "fun": lambda v: max_sum - v.sum(), "jac": lambda v: -np.ones_like(v)}]
        res = minimize(neg, x0=np.zeros(m), jac=True, method="SLSQP",
                       bounds=[(0.0, u) for u in upper], constraints=cons,
                       options={"ftol": 1e-12, "maxiter": 500})
        return np.clip(res.x, 0, None)

    # -- by formulation (a name or class, looked up in the formulations' registry) -----------------
    def target_log_density(self, formulation, multipliers, grid: Grid | None = None):
        """Normalised log-density of the exact optimal target on a grid; returns (grid, logp)."""
        return formulation_class(formulation).oracle_log_target(self, multipliers, grid)

    def target_grid(self, formulation, multipliers) -> Grid | None:
        """The grid the exact target needs where it reaches beyond the mixture's (``None``: it does not)."""
        return formulation_class(formulation).oracle_grid(self, multipliers)

    def constraint_values(self, formulation, multipliers) -> np.ndarray:
        """The constraint quantities of each problem, evaluated at its exact target."""
        return formulation_class(formulation).oracle_values(self, multipliers)

    def pretrained_values(self, formulation) -> np.ndarray:
        """The constraint quantities of the pretrained model (multipliers 0)."""
        return formulation_class(formulation).oracle_pretrained_values(self)

    def thresholds(self, formulation, factor: float) -> np.ndarray:
        """Paper thresholds: RU ``factor * mean_i KL(p_pre||q_i)``; LU/FU ``factor * value_i``."""
        return formulation_class(formulation).oracle_thresholds(self, factor)

    def dual_function(self, formulation, multipliers, thresholds) -> tuple[float, np.ndarray]:
        """Dual value D(mu) and its gradient (the constraint slack), for maximisation."""
        return formulation_class(formulation).oracle_dual(self, multipliers, thresholds)

    def optimal_multipliers(self, formulation, thresholds) -> np.ndarray:
        """Exact optimal multipliers for given thresholds (maximise the concave dual)."""
        return formulation_class(formulation).oracle_multipliers(self, thresholds)
