"""The Gaussian-mixture model family: config validation, cached pretraining, metrics, plots."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError
from ..schedule import build_schedule
from ..setup import ConceptJudge, UnlearningSetup
from ..utils import atomic_torch_save, config_hash, generator
from .gmm import GaussianMixture, GMMOracle, Grid, formulation_class
from .resnet import ResNetDenoiser
from .training import fit_denoiser

log = logging.getLogger(__name__)


def validate_gmm_config(m: DictConfig) -> None:
    means = OmegaConf.to_container(m.means, resolve=True) if m.means is not None else None
    if not means or not all(isinstance(p, (list, tuple)) for p in means):
        raise ConfigError("model.means must be a non-empty list of points, e.g. [[-2,0],[2,0],[0,3]]")
    dim = int(m.dim)
    if dim < 1:
        raise ConfigError(f"model.dim must be a positive integer (got {dim})")
    for p in means:
        if len(p) != dim:
            raise ConfigError(f"model.means: every point must have model.dim={dim} coordinates (got {list(p)})")
    k = len(means)
    stds, weights = list(m.stds), list(m.weights)
    if len(stds) != k or len(weights) != k:
        raise ConfigError(f"model.means, model.stds and model.weights must have the same length "
                          f"(got {k}, {len(stds)}, {len(weights)})")
    if any(float(s) <= 0 for s in stds):
        raise ConfigError(f"model.stds must all be > 0 (got {stds})")
    if any(float(w) <= 0 for w in weights):
        raise ConfigError(f"model.weights must all be > 0 (got {weights})")
    unlearn = list(m.unlearn)
    if not unlearn:
        raise ConfigError("model.unlearn must list at least one component index")
    bad = [i for i in unlearn if not isinstance(i, int) or not 0 <= i < k]
    if bad:
        raise ConfigError(f"model.unlearn: component index {bad[0]} out of range; accepted: integers 0..{k - 1}")
    if len(set(unlearn)) != len(unlearn):
        raise ConfigError(f"model.unlearn must not repeat an index (got {unlearn})")
    if len(unlearn) == k:
        raise ConfigError(f"model.unlearn must leave at least one component to retain (got {unlearn} of {k})")


def pretrain_denoiser(sample_fn, schedule, arch: dict, dim: int, steps: int, batch_size: int, lr: float, seed: int,
                      desc: str, show_progress: bool = True) -> ResNetDenoiser:
    """Train a ResNet denoiser on fresh samples from ``sample_fn`` (infinite data)."""
    torch.manual_seed(seed)
    g = generator(seed)
    net = ResNetDenoiser(dim, schedule, **arch)
    if net.gaussian_skip:
        net.set_gaussian_skip(sample_fn(65536, g))
    fit_denoiser(net, net.parameters(), lambda g_: (sample_fn(batch_size, g_), None), steps, lr, g, desc,
                 show_progress)
    net.eval()
    return net


def _cached_denoiser(cache_dir: Path, key: dict, build, show_progress: bool) -> tuple[ResNetDenoiser, bool]:
    path = Path(cache_dir) / f"gmm_{key['role']}_{config_hash(key)}.pt"
    if path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=False)
            net = ResNetDenoiser(key["dim"], build.schedule, **key["arch"])
            net.load_state_dict(blob["state_dict"])
            net.eval()
            return net, True
        except Exception as exc:  # a corrupt cache entry is rebuilt, not trusted
            log.warning("cache entry %s unreadable (%s); retraining", path, exc)
    net = build(show_progress)
    atomic_torch_save({"state_dict": net.state_dict(), "key": key}, path)
    return net, False


def build_gmm_setup(cfg: DictConfig, show_progress: bool = True,
                    needs: frozenset = frozenset({"concepts", "forget_sets"})) -> UnlearningSetup:
    """``needs``: what the formulation asks for (:data:`unlearn.families.base.NEEDS`); the forget sets
    (``formulation.forget_samples`` samples of each unlearned component) are drawn only for ``forget_sets``."""
    m = cfg.model
    validate_gmm_config(m)
    schedule = build_schedule(str(m.schedule.kind), float(m.schedule.beta_start), float(m.schedule.beta_end),
                              int(m.schedule.num_timesteps))
    gmm = GaussianMixture(OmegaConf.to_container(m.means, resolve=True), list(m.stds), list(m.weights))
    unlearn = list(m.unlearn)
    arch = dict(num_layers=int(m.denoiser.num_layers), hidden=int(m.denoiser.hidden),
                time_embed_dim=int(m.denoiser.time_embed_dim), widen=int(m.denoiser.widen),
                gaussian_skip=bool(m.denoiser.gaussian_skip))
    pt = m.pretrain
    base_key = dict(dim=int(m.dim), arch=arch, schedule=schedule.to_dict(), steps=int(pt.steps),
                    batch_size=int(pt.batch_size), lr=float(pt.lr), seed=int(pt.seed))
    cache_dir = Path(str(cfg.paths.cache_dir))

    class _Builder:
        def __init__(self, sample_fn, desc, seed):
            self.sample_fn, self.desc, self.seed, self.schedule = sample_fn, desc, seed, schedule

        def __call__(self, show):
            return pretrain_denoiser(self.sample_fn, schedule, arch, int(m.dim), int(pt.steps), int(pt.batch_size),
                                     float(pt.lr), self.seed, self.desc, show)

    t0 = time.time()
    key = dict(base_key, role="mixture", means=gmm.means.tolist(), stds=gmm.stds.tolist(),
               weights=gmm.weights.tolist())
    pretrained, hit_pre = _cached_denoiser(cache_dir, key, _Builder(gmm.sample, "pretrain p_pre", int(pt.seed)),
                                           show_progress)
    concepts, hits = [], []
    for i in unlearn:
        comp = gmm.subset([i])
        key = dict(base_key, role=f"component", means=comp.means.tolist(), stds=comp.stds.tolist())
        net, hit = _cached_denoiser(cache_dir, key, _Builder(comp.sample, f"pretrain q_{i}", int(pt.seed) + 1 + i),
                                    show_progress)
        concepts.append(net)
        hits.append(hit)
    pretrain_time = time.time() - t0
    pretrained_frozen = pretrained.frozen_copy()
    concepts = [c.frozen_copy() for c in concepts]
    model = pretrained_frozen.frozen_copy()
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()

    oracle_kw = formulation_class(str(cfg.formulation.name)).oracle_options(cfg.formulation)  # e.g. RU's cap
    oracle = GMMOracle(gmm, unlearn, **oracle_kw) if gmm.dim <= 2 else None
    g = generator(int(cfg.seed) + 12345)
    forget_sets = ([gmm.subset([i]).sample(int(cfg.formulation.forget_samples), g) for i in unlearn]
                   if "forget_sets" in needs else [])
    evaluator = GMMEvaluator(gmm, unlearn, oracle)
    concept_mix = gmm.subset(unlearn)
    return UnlearningSetup(
        concept_judge=evaluator.judge(), concept_data=lambda k, g: concept_mix.sample(int(k), g),
        name="gmm", pretrained=pretrained_frozen, model=model, concepts=concepts,
        concept_names=[f"component {i}" for i in unlearn], forget_sets=forget_sets,
        retain_sampler=gmm.sample,  # the mixture's own data (formulation=fu's retain=model ignores it)
        oracle=oracle, evaluate=evaluator.evaluate, plot=evaluator.plot, save_samples=evaluator.save_samples,
        info={"pretrain_cache_hit": bool(hit_pre and all(hits)), "pretrain_time_s": round(pretrain_time, 2)})


class GMMEvaluator:
    """GMM metrics against the exact densities (see README, "How the GMM metrics are computed")."""

    def __init__(self, gmm: GaussianMixture, unlearn, oracle: GMMOracle | None, grid_size: int = 256):
        self.gmm, self.unlearn, self.oracle, self.grid_size = gmm, list(unlearn), oracle, grid_size
        self.bandwidth = 0.3 * float(gmm.stds.min())

    def metric_grid(self, samples: np.ndarray, formulation: str | None, multipliers) -> Grid:
        pts = [self.gmm.means.numpy()]
        g = None if self.oracle is None or formulation is None or multipliers is None else \
            self.oracle.target_grid(formulation, multipliers)  # where the target reaches beyond the mixture (RU)
        if g is not None:
            pts.append(np.array([[a[0] for a in g.axes], [a[-1] for a in g.axes]]))
        pts.append(np.quantile(samples, [0.001, 0.999], axis=0))
        allp = np.concatenate(pts, 0)
        margin = 5.0 * float(self.gmm.stds.max())
        return Grid.around(allp, margin, self.grid_size)

    def evaluate(self, samples: torch.Tensor, formulation: str | None = None, multipliers=None, model=None) -> dict:
        x = samples.detach().cpu().to(torch.float64)
        near = self.gmm.nearest_component(x).numpy()
        out = {"num_samples": int(len(x)),
               "unlearned_mass": float(np.isin(near, self.unlearn).mean()),
               "component_mass": np.bincount(near, minlength=self.gmm.num_components).astype(float).tolist()}
        out["component_mass"] = [c / len(x) for c in out["component_mass"]]
        comp = [self.gmm.subset([i]) for i in self.unlearn]
        log_l = torch.stack([q.log_prob(x) for q in comp], 1) - self.gmm.log_prob(x)[:, None]
        el = torch.exp(log_l).mean(0)
        out["expected_likelihood"] = float(el.mean())
        out["expected_likelihood_per_concept"] = el.tolist()
        if self.oracle is None:
            out["kl_note"] = "grid KLs need dim <= 2"
            return out
        s = x.numpy()
        grid = self.metric_grid(s, formulation, multipliers)
        pts = grid.points
        inside = np.all([(s[:, j] >= grid.axes[j][0]) & (s[:, j] <= grid.axes[j][-1]) for j in range(grid.dim)], 0)
        out["samples_outside_grid"] = int((~inside).sum())
        logm = grid.kde_log_density(s[inside], self.bandwidth)

        def smoothed(logp):
            d = grid.smooth(torch.exp(grid.normalize_log(logp)).numpy(), self.bandwidth)
            return grid.normalize_log(torch.as_tensor(np.log(np.maximum(d, 1e-300))))

        out["kl_to_pretrained"] = grid.kl(logm, smoothed(self.gmm.log_prob(pts)))
        retained = self.gmm.subset([k for k in range(self.gmm.num_components) if k not in self.unlearn])
        log_ret = smoothed(retained.log_prob(pts))
        out["kl_to_retained"] = grid.kl(logm, log_ret)
        # quality of what is kept, whatever mass is left on the unlearned components: the model and
        # the retained mixture, both conditioned on the retained components' Voronoi cells
        cell = ~np.isin(self.gmm.nearest_component(pts).numpy(), self.unlearn)
        keep = ~np.isin(near, self.unlearn) & inside
        if keep.sum() >= 10:
            lm = grid.kde_log_density(s[keep], self.bandwidth)
            lr = log_ret.clone()
            mask = torch.as_tensor(cell)
            lm[~mask], lr[~mask] = -1e300, -1e300
            lm = lm - torch.logsumexp(lm[mask], 0) - math.log(grid.dv)
            lr = lr - torch.logsumexp(lr[mask], 0) - math.log(grid.dv)
            out["kl_retained_part"] = float((torch.exp(lm[mask]) * grid.dv * (lm[mask] - lr[mask])).sum())
        else:
            out["kl_retained_part"] = None
        if formulation is not None and multipliers is not None:
            try:
                _, logt = self.oracle.target_log_density(formulation, multipliers, grid)
                out["kl_to_target"] = grid.kl(logm, smoothed(logt))
            except ValueError as exc:
                out["kl_to_target"] = None
                out["kl_to_target_note"] = str(exc)
        return out

    def judge(self) -> ConceptJudge:
        """The exact judge: the nearest component (the share), the posterior of the unlearned
        components (differentiable), and ``q_i / p`` from the exact densities."""
        gmm, unl = self.gmm, self.unlearn
        comp = [gmm.subset([i]) for i in unl]

        def share(x):
            return float(np.isin(gmm.nearest_component(x.detach().cpu()).numpy(), unl).mean())

        def log_prob(x):
            lp = gmm.component_log_prob(x)
            return (torch.logsumexp(lp[:, unl], 1) - torch.logsumexp(lp, 1)).to(x.dtype)

        def expected_likelihood(x):
            x = x.detach().cpu().to(torch.float64)
            return torch.exp(torch.stack([q.log_prob(x) for q in comp], 1) - gmm.log_prob(x)[:, None]).mean(0).tolist()

        return ConceptJudge("nearest mixture component (exact densities)", share, log_prob, expected_likelihood)

    def save_samples(self, path: Path, samples: torch.Tensor):
        np.save(path, samples.detach().cpu().numpy())

    def plot(self, path: Path, pretrained_samples: torch.Tensor, samples: torch.Tensor, formulation: str,
             multipliers, title: str = "", trained: bool = True):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if self.gmm.dim != 2 or self.oracle is None:
            fig, ax = plt.subplots(1, 1, figsize=(5, 4))
            ax.hist(pretrained_samples[:, 0].numpy(), 100, alpha=0.5, label="pretrained", density=True)
            ax.hist(samples[:, 0].numpy(), 100, alpha=0.5, label="unlearned", density=True)
            ax.legend(); ax.set_xlabel("x_1")
            fig.savefig(path, dpi=120); plt.close(fig)
            return
        s = samples.detach().cpu().numpy()
        ps = pretrained_samples.detach().cpu().numpy()
        grid = self.metric_grid(np.concatenate([s, ps]), formulation, multipliers)
        pts = grid.points
        panels = [("pretrained: exact density + samples", grid.normalize_log(self.gmm.log_prob(pts)), ps),
                  ("unlearned model: samples (KDE)", grid.kde_log_density(s, self.bandwidth), s)]
        try:
            _, logt = self.oracle.target_log_density(formulation, multipliers, grid)
            mu = ", ".join(f"{v:.3g}" for v in np.atleast_1d(multipliers))
            panels.append((f"exact {formulation.upper()} target at multipliers [{mu}]", logt, None))
        except ValueError:
            pass
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6))
        ext = [grid.axes[0][0], grid.axes[0][-1], grid.axes[1][0], grid.axes[1][-1]]
        for ax, (name, logp, pts_) in zip(axes, panels):
            ax.imshow(torch.exp(logp).reshape(grid.shape).T.numpy(), origin="lower", extent=ext, cmap="viridis",
                      aspect="equal")
            if pts_ is not None:
                ax.scatter(pts_[:800, 0], pts_[:800, 1], s=2, c="white", alpha=0.5)
            for i in self.unlearn:
                ax.scatter(*self.gmm.means[i].numpy(), marker="x", c="red", s=60)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("x_1"); ax.set_ylabel("x_2")
        fig.suptitle(title + "  (red x: unlearned component)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
