"""``train(cfg)``: one unlearning run, from config to run directory (plain function, no Hydra)."""
from __future__ import annotations

import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, validate_config
from .distributed import get_dist
from .dual import build_multipliers
from .logger import RunLogger
from .primal_dual import PrimalDual
from .samplers import build_sampler
from .utils import atomic_torch_save, atomic_write_text, generator

log = logging.getLogger(__name__)


def _resolve(target: str, key: str):
    from hydra.utils import get_method

    try:
        return get_method(target)
    except Exception:
        raise ConfigError(f"{key} must name an importable builder (got {target!r})") from None


def build(cfg: DictConfig, show_progress: bool = True):
    """Build the setup, sampler, formulation and multipliers a config describes."""
    validate_config(cfg)
    fixed = not bool(cfg.method.get("learnable", True))
    formulation_cls = _resolve(str(cfg.formulation._target_), "formulation._target_")
    formulation_cls.check_config(cfg, fixed)  # fail before any pretraining
    setup = _resolve(str(cfg.model._target_), "model._target_")(cfg, show_progress=show_progress)
    sampler = build_sampler(setup.schedule, cfg.model.sampler)
    gen = generator(int(cfg.seed) + 1_000_003 * get_dist().rank)  # data-parallel ranks draw different batches
    formulation = formulation_cls(cfg.formulation, setup, sampler, gen, fixed_multipliers=fixed,
                                  show_progress=show_progress)
    multipliers = build_multipliers(cfg.method, formulation)
    return setup, sampler, formulation, multipliers, gen


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Run one unlearning experiment and write its outputs to ``run_dir``; returns the summary."""
    t_start = time.time()
    show = bool(cfg.get("progress", True))
    validate_config(cfg)
    dist = get_dist()
    run_dir = Path(dist.broadcast_object(str(run_dir if run_dir is not None else cfg.paths.run_dir)))
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(cfg.get("num_threads", 2)))
    torch.manual_seed(int(cfg.seed))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if dist.is_main:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))

    setup, sampler, formulation, multipliers, gen = build(cfg, show_progress=show)
    logger = RunLogger(run_dir, cfg.get("logger"), resolved) if dist.is_main else None
    evaluator = None
    if setup.to_images is not None and dist.is_main:  # image families: KID, SSCD, CLIP, KL, likelihood
        from .evaluation import ImageEvaluator

        evaluator = ImageEvaluator(cfg, setup, sampler, run_dir)  # metrics.strict: fails here, before training
        evaluator = evaluator if evaluator.active else None

    def on_step(step, model):
        if evaluator is None or not evaluator.due(step):
            return None
        return evaluator.evaluate(model, step, f"step{step:05d}")[0]

    t_train = time.time()
    driver = PrimalDual(formulation, multipliers, cfg.train.dual_steps, cfg.train.primal_steps_per_dual,
                        logger=logger, show_progress=show and dist.is_main, log_every=int(cfg.train.get("log_every", 1)),
                        on_step=on_step)
    mu, values, thr, extra = driver.run()
    train_time = time.time() - t_train
    if dist.world_size > 1:  # every rank's multipliers after each dual step, to check they agree
        import hashlib

        w = formulation.trainable_state()
        sha = hashlib.sha256(b"".join(w[k].float().numpy().tobytes() for k in sorted(w))).hexdigest()
        atomic_write_text(run_dir / f"rank{dist.rank}_multipliers.json",
                          json.dumps({"multipliers": [h["multipliers"] for h in driver.history],
                                      "final": [float(v) for v in mu], "trainable_sha256": sha}))
        if not dist.is_main:
            return {"status": "completed", "rank": dist.rank, "multipliers": [float(v) for v in mu]}

    # final samples of the unlearned model and of the pretrained model, same seed
    n = int(cfg.train.final_samples)
    final = formulation.final_model(mu)
    eval_gen = generator(int(cfg.seed) + 999)
    samples = formulation.final_samples(mu, n, eval_gen)
    if samples is None:
        samples = sampler.sample(final, n, eval_gen, cond=setup.cond).x0.detach()
    pre_samples = sampler.sample(setup.pretrained, n, generator(int(cfg.seed) + 999), cond=setup.cond).x0.detach()
    target = formulation.oracle_target(mu)
    metrics, pre_metrics = {}, {}
    if setup.evaluate is not None:
        metrics = setup.evaluate(samples, target.formulation if target else None, target.multipliers if target else None)
        pre_metrics = setup.evaluate(pre_samples, None, None)
    metric_info = {}
    if evaluator is not None:
        suite_metrics, results = evaluator.evaluate(final, int(cfg.train.dual_steps), "final")
        metrics = {**metrics, **suite_metrics}
        pre_metrics = {**pre_metrics, **evaluator.evaluate(setup.pretrained, 0, "pretrained")[0]}
        metric_info = {"metric_status": {k: r.get("status") for k, r in results.items()},
                       "metrics_missing": {k: r.get("reason") for k, r in results.items() if r.get("status") != "ok"},
                       "metric_protocols": {k: r.get("protocol") for k, r in results.items() if r.get("protocol")},
                       "retain_set": evaluator.retain_info}
    if setup.save_samples is not None:
        setup.save_samples(run_dir / "samples.npy", samples)
        setup.save_samples(run_dir / "pretrained_samples.npy", pre_samples)
    if setup.plot is not None:
        title = f"{cfg.model.name} / {formulation.name.upper()} / {cfg.method.name}"
        setup.plot(run_dir / "samples.png", pre_samples, samples, target.formulation if target else formulation.name,
                   target.multipliers if target else [float(v) for v in mu], title=title)
    composed = not formulation.has_primal and not extra  # RU dual-only: the result is the composed score
    atomic_torch_save({"state_dict": formulation.trainable_state(), "multipliers": mu, "composed": composed},
                      run_dir / "model.pt")
    if setup.save_model is not None and not composed:  # e.g. LoRA in diffusers format
        setup.save_model(run_dir)

    tol = float(cfg.train.satisfied_tol)
    sat = formulation.satisfied(values, thr, tol)
    names = formulation.constraint_names()
    summary = {
        "model": str(cfg.model.name),
        "formulation": formulation.name,
        "method": str(cfg.method.name),
        "status": "completed",
        "constraints": [{"name": nm, "value": float(v), "threshold": float(b), "pretrained": float(p),
                         "satisfied": s, "sense": ">=" if formulation.sense == "ge" else "<="}
                        for nm, v, b, p, s in zip(names, values, thr, driver.pretrained_values, sat)],
        "multipliers": [float(v) for v in mu],
        "oracle_target": {"formulation": target.formulation, "multipliers": target.multipliers} if target else None,
        "threshold_factor": formulation.factor,
        "metrics": metrics,
        "pretrained_metrics": pre_metrics,
        **metric_info,
        "extra": {**extra, **formulation.diagnostics(mu)},
        "setup": setup.info,
        "wall_time_s": round(time.time() - t_start, 2),
        "train_time_s": round(train_time, 2),
        "seed": int(cfg.seed),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    if setup.oracle is not None and bool(cfg.train.get("oracle_multipliers", True)) and formulation.oracle_comparable:
        try:
            exact_b = setup.oracle.thresholds(formulation.name, formulation.factor)
            summary["oracle"] = {"thresholds": exact_b.tolist(),
                                 "multipliers": setup.oracle.optimal_multipliers(formulation.name, exact_b).tolist()}
        except ValueError as exc:
            summary["oracle"] = {"error": str(exc)}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=float))
    logger.finish(summary)
    if show:
        print_summary(summary, run_dir)
    return summary


def print_summary(summary: dict, run_dir: Path, file=sys.stdout):
    lines = [f"\n== {summary['model']} / {summary['formulation'].upper()} / {summary['method']} "
             f"({summary['wall_time_s']:.1f} s) ==",
             f"{'constraint':<28}{'value':>11}{'':>3}{'threshold':>11}{'pretrained':>12}  ok   multiplier"]
    for c, m in zip(summary["constraints"], summary["multipliers"]):
        lines.append(f"{c['name'][:27]:<28}{c['value']:>11.4g} {c['sense']:>2}{c['threshold']:>11.4g}"
                     f"{c['pretrained']:>12.4g}  {'yes' if c['satisfied'] else 'NO ':<4} {m:.4g}")
    if summary.get("oracle") and "multipliers" in summary["oracle"]:
        lines.append(f"oracle optimal multipliers: {[round(v, 4) for v in summary['oracle']['multipliers']]}")
    met = summary.get("metrics") or {}
    pre = summary.get("pretrained_metrics") or {}
    keys = [k for k in ("unlearned_mass", "expected_likelihood", "kl_to_pretrained", "kl_to_retained", "kl_to_target")
            if k in met]
    if keys:
        lines.append(f"{'metric':<22}{'unlearned':>12}{'pretrained':>12}")
        for k in keys:
            v, p = met.get(k), pre.get(k)
            fmt = lambda z: f"{z:>12.4g}" if isinstance(z, (int, float)) else f"{'-':>12}"
            lines.append(f"{k:<22}{fmt(v)}{fmt(p)}")
    lines.append(f"outputs: {run_dir}")
    print("\n".join(lines), file=file)
