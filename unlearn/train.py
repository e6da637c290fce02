"""``train(cfg)``: one unlearning run, from config to run directory (plain function, no Hydra)."""
from __future__ import annotations

import json
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .checkpoint import (CHECKPOINT, FORMAT, FORMAT_VERSION, RUN_INFO, RunDirError, inspect_run_dir, load_checkpoint,
                         read_run_info, result_hash, resume_hash, save_checkpoint)
from .config import ConfigError, validate_config
from .distributed import get_dist
from .dual import build_multipliers
from .logger import RunLogger
from .primal_dual import Diverged, PrimalDual
from .provenance import device_info, git_state, package_versions, session, split_volatile
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


RESUME_MODES = ("auto", "never")


def _train_options(cfg: DictConfig) -> tuple[str, int]:
    resume = str(cfg.train.get("resume", "auto"))
    if resume not in RESUME_MODES:
        raise ConfigError(f"train.resume must be one of {list(RESUME_MODES)} (got {resume!r})")
    every = cfg.train.get("checkpoint_every", 10)
    try:
        every = int(every)
    except (TypeError, ValueError):
        every = -1
    if every < 0:
        raise ConfigError(f"train.checkpoint_every must be an integer >= 0 (got {cfg.train.get('checkpoint_every')!r})")
    return resume, every


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_fits(ckpt: dict, formulation, multipliers, path: Path) -> None:
    """A checkpoint of the same config must fit the model built now (else the code changed)."""
    state = ckpt["state"]
    world = get_dist().world_size
    if int(state.get("world_size", 1)) != world:
        raise RunDirError(f"{path}: checkpoint written by {state.get('world_size', 1)} data-parallel process(es), "
                          f"this run has {world}; resume with the same number of processes")
    try:
        saved = state["formulation"]["trainable"]
        params = formulation._trainable_named()
        bad = sorted(set(saved) ^ set(params)) or [n for n in params if tuple(saved[n].shape) != tuple(params[n].shape)]
        mu = state["multipliers"]["value"]
        if not bad and tuple(mu.shape) != tuple(multipliers.value().shape):
            bad = ["multipliers"]
    except (KeyError, TypeError, AttributeError) as exc:
        bad = [f"missing {exc}"]
    if bad:
        raise RunDirError(f"{path}: checkpoint does not fit the model this code builds (differs in {bad[0]}); "
                          f"resume with the version of unlearn that wrote it or run in a new directory "
                          f"(hydra.run.dir=...)")


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Run one unlearning experiment and write its outputs to ``run_dir``; returns the summary.

    A directory that already holds a checkpoint of the same run is resumed from it
    (``train.resume=auto``). A run that meets a non-finite quantity stops and returns a summary
    with ``"status": "diverged"``.
    """
    t_start = time.time()
    show = bool(cfg.get("progress", True))
    validate_config(cfg)
    resume_mode, checkpoint_every = _train_options(cfg)
    dist = get_dist()
    main = dist.is_main
    run_dir = Path(dist.broadcast_object(str(run_dir if run_dir is not None else cfg.paths.run_dir)))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    dual_steps = int(cfg.train.dual_steps)
    seed = int(cfg.seed)
    # nothing is written before this check: a foreign or corrupt run directory stays as it is
    plan, error = None, None
    if main:
        try:
            plan = inspect_run_dir(run_dir, resolved, resume_mode, dual_steps)
        except RunDirError as exc:
            error = exc
    verdict = dist.broadcast_object({"error": str(error) if error else None, "fresh": plan is None,
                                     "completed": bool(plan and plan["completed"])})
    if error is not None:
        raise error
    if verdict["error"] is not None:
        raise RunDirError(verdict["error"])
    if verdict["completed"]:
        if not main:
            return {"status": "completed", "rank": dist.rank}
        summary = json.loads((run_dir / "summary.json").read_text())
        if show:
            print(f"{run_dir}: this run is already complete (checkpoint at dual step {dual_steps}); "
                  f"outputs left as they are", file=sys.stderr)
        return summary
    ckpt = None
    if not verdict["fresh"]:
        ckpt = plan["checkpoint"] if main else (load_checkpoint(run_dir / CHECKPOINT)
                                                if (run_dir / CHECKPOINT).exists() else None)
    old_info = read_run_info(run_dir) if main and plan is not None else None
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        for tmp in run_dir.glob(f"{CHECKPOINT}*.tmp"):  # left by a run killed while it wrote a checkpoint
            tmp.unlink(missing_ok=True)
    torch.set_num_threads(int(cfg.get("num_threads", 2)))
    _seed_everything(seed)

    setup, sampler, formulation, multipliers, gen = build(cfg, show_progress=show)
    # pretraining draws from the global RNGs when the cache misses, not when it hits: reseed
    _seed_everything(seed)
    if ckpt is not None:
        _check_fits(ckpt, formulation, multipliers, run_dir / CHECKPOINT)
        if show and main:
            print(f"resuming {run_dir} from its checkpoint at dual step {ckpt['step']} of {dual_steps}",
                  file=sys.stderr)
    evaluator = None
    if setup.to_images is not None and main:  # image families: KID, SSCD, CLIP, KL, likelihood
        from .evaluation import ImageEvaluator

        evaluator = ImageEvaluator(cfg, setup, sampler, run_dir)  # metrics.strict: fails here, before training
        evaluator = evaluator if evaluator.active else None

    def on_step(step, model, mu):
        if evaluator is None or not evaluator.due(step):
            return None
        # RU's resampled samples at the current multipliers, like the final evaluation's (None: sample `model`)
        own = formulation.final_samples(mu, int(cfg.metrics.num_images), generator(seed + 999))
        return evaluator.evaluate(model, step, f"step{step:05d}", own)[0]

    stable_info, volatile_info = split_volatile(setup.info)
    r_hash = resume_hash(resolved)
    run_info = {"format": FORMAT, "format_version": FORMAT_VERSION, "resume_hash": r_hash,
                "result_hash": result_hash(resolved), "seed": seed, "status": "running",
                "versions": package_versions(), "git": git_state(), **device_info(setup.model),
                "sessions": list((old_info or {}).get("sessions", [])) if ckpt is not None else []}
    run_info["sessions"].append({**session(int(ckpt["step"]) if ckpt is not None else None), "setup": volatile_info,
                                 "world_size": dist.world_size})
    if main:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))
        atomic_write_text(run_dir / RUN_INFO, json.dumps(run_info, indent=2, default=str))

    logger = RunLogger(run_dir, cfg.get("logger"), resolved,
                       resume_step=int(ckpt["step"]) if ckpt else None) if main else None
    saved = {"step": int(ckpt["step"]) if ckpt is not None else None}

    def checkpoint(step: int, state: dict):
        if main:
            save_checkpoint(run_dir / CHECKPOINT, state, step, r_hash)
        saved["step"] = step

    t_train, timing = time.time(), {}
    driver = PrimalDual(formulation, multipliers, dual_steps, cfg.train.primal_steps_per_dual,
                        logger=logger, show_progress=show and main, log_every=int(cfg.train.get("log_every", 1)),
                        on_step=on_step, checkpoint_every=checkpoint_every, checkpoint=checkpoint,
                        final_multipliers=str(cfg.train.get("final_multipliers", "last")),
                        final_primal=str(cfg.train.get("final_primal", "last")),
                        estimate_every=1 if multipliers.learnable else int(cfg.train.get("baseline_estimate_every", 1)),
                        final_fit_steps=int(cfg.train.get("final_fit_steps", 0) or 0),
                        final_fit_tol=float(cfg.train.get("final_fit_tol", 0.05)),
                        final_fit_lr_scale=float(cfg.train.get("final_fit_lr_scale", 1.0)))

    def finish(summary: dict, status: str) -> dict:
        # wall_time_s (all sessions of the run together, as in run_info.json) is the one field of
        # summary.json that differs between two identical runs
        wall = round(time.time() - t_start, 2)
        earlier = sum(float(x.get("wall_time_s") or 0.0) for x in run_info["sessions"][:-1])
        summary["wall_time_s"] = round(earlier + wall, 2)
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=float))
        run_info["status"] = status
        run_info["sessions"][-1].update(wall_time_s=wall,
                                        train_time_s=round(timing.get("train", time.time() - t_train), 2))
        atomic_write_text(run_dir / RUN_INFO, json.dumps(run_info, indent=2, default=str))
        logger.finish(summary)
        return summary

    head = {"model": str(cfg.model.name), "formulation": formulation.name, "method": str(cfg.method.name)}
    try:
        mu, values, thr, extra = driver.run(resume=ckpt["state"] if ckpt is not None else None)
    except Diverged as d:
        if not main:
            return {"status": "diverged", "rank": dist.rank}
        last = ({k: v for k, v in driver.history[-1].items() if k != "time_s"}  # no wall-clock in summaries
                if driver.history else None)
        summary = {**head, "status": "diverged",
                   "diverged": {"step": d.step, "quantity": d.quantity, "value": str(d.value)},
                   "checkpoint_step": saved["step"], "last_good": last,
                   "threshold_factor": formulation.factor, "seed": seed}
        return finish(summary, "diverged")
    timing["train"] = time.time() - t_train
    if dist.world_size > 1:  # every rank's multipliers after each dual step, to check they agree
        import hashlib

        w = formulation.trainable_state()
        sha = hashlib.sha256(b"".join(w[k].float().numpy().tobytes() for k in sorted(w))).hexdigest()
        atomic_write_text(run_dir / f"rank{dist.rank}_multipliers.json",
                          json.dumps({"multipliers": [h["multipliers"] for h in driver.history],
                                      "final": [float(v) for v in mu], "trainable_sha256": sha}))
        if not main:
            return {"status": "completed", "rank": dist.rank, "multipliers": [float(v) for v in mu]}

    # final samples of the unlearned model and of the pretrained model, same seed
    n = int(cfg.train.final_samples)
    final = formulation.final_model(mu)
    eval_gen = generator(seed + 999)
    samples = formulation.final_samples(mu, n, eval_gen)
    own_samples = samples  # not None: the final samples do not come from `final` (RU's importance resampling)
    if samples is None:
        samples = sampler.sample(final, n, eval_gen, cond=setup.cond).x0.detach()
    pre_own = formulation.pretrained_samples(n, generator(seed + 999)) if own_samples is not None else None
    pre_samples = pre_own if pre_own is not None else \
        sampler.sample(setup.pretrained, n, generator(seed + 999), cond=setup.cond).x0.detach()
    target = formulation.oracle_target(mu)
    metrics, pre_metrics = {}, {}
    if setup.evaluate is not None:
        metrics = setup.evaluate(samples, target.formulation if target else None, target.multipliers if target else None)
        pre_metrics = setup.evaluate(pre_samples, None, None)
    metric_info = {}
    metrics = {**formulation.final_metrics(mu), **metrics}  # e.g. RU's importance-weighted KL; measured ones win
    if own_samples is not None:
        pre_metrics = {**formulation.final_metrics(torch.zeros_like(mu)), **pre_metrics}
    if evaluator is not None:
        suite_metrics, results = evaluator.evaluate(final, int(cfg.train.dual_steps), "final", own_samples)
        metrics = {**metrics, **suite_metrics}
        pre_metrics = {**pre_metrics, **evaluator.evaluate(setup.pretrained, 0, "pretrained", pre_own)[0]}
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
    status, verdict = outcome(sat, names, formulation.reliability(mu), multipliers.learnable, tol)
    summary = {
        **head,
        "status": status,
        "verdict": verdict,
        "constraints_met": all(sat),
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
        "setup": stable_info,
        "seed": seed,
    }
    if setup.oracle is not None and bool(cfg.train.get("oracle_multipliers", True)) and formulation.oracle_comparable:
        try:
            exact_b = setup.oracle.thresholds(formulation.name, formulation.factor)
            summary["oracle"] = {"thresholds": exact_b.tolist(),
                                 "multipliers": setup.oracle.optimal_multipliers(formulation.name, exact_b).tolist()}
        except ValueError as exc:
            summary["oracle"] = {"error": str(exc)}
    finish(summary, status)
    if show:
        print_summary(summary, run_dir, wall_time_s=time.time() - t_start)
    return summary


def outcome(satisfied: list[bool], names: list[str], unreliable: str | None, constrained: bool,
            tol: float) -> tuple[str, str]:
    """The run's status and its one-line verdict about the delivered model.

    ``unreliable``: a formulation's estimates did not hold at the final multipliers (its reason);
    ``constraints_violated``: a constrained run ended outside some constraint (beyond ``tol``);
    ``completed``: otherwise. A baseline (fixed multipliers) only monitors its constraints, so a
    violated one is reported in the verdict but does not change its status."""
    bad = [n for n, ok in zip(names, satisfied) if not ok]
    if unreliable is not None:
        return "unreliable", f"UNRELIABLE: {unreliable}"
    if bad and constrained:
        return "constraints_violated", (f"CONSTRAINTS VIOLATED beyond train.satisfied_tol={tol:g}: {', '.join(bad)}")
    if bad:
        return "completed", f"baseline (fixed multipliers): {len(bad)} of {len(names)} constraints not met: {', '.join(bad)}"
    return "completed", f"every constraint met (within train.satisfied_tol={tol:g})"


def print_summary(summary: dict, run_dir: Path, file=sys.stdout, wall_time_s: float | None = None):
    took = f" ({wall_time_s:.1f} s)" if wall_time_s is not None else ""
    lines = [f"\n== {summary['model']} / {summary['formulation'].upper()} / {summary['method']}{took} ==",
             f"{'constraint':<28}{'value':>11}{'':>3}{'threshold':>11}{'pretrained':>12}  ok   multiplier"]
    for c, m in zip(summary["constraints"], summary["multipliers"]):
        lines.append(f"{c['name'][:27]:<28}{c['value']:>11.4g} {c['sense']:>2}{c['threshold']:>11.4g}"
                     f"{c['pretrained']:>12.4g}  {'yes' if c['satisfied'] else 'NO ':<4} {m:.4g}")
    if summary.get("oracle") and "multipliers" in summary["oracle"]:
        lines.append(f"oracle optimal multipliers: {[round(v, 4) for v in summary['oracle']['multipliers']]}")
    if summary.get("verdict"):
        lines.append(f"verdict: {summary['verdict']}")
    dual = (summary.get("extra") or {}).get("dual") or {}
    if dual.get("oscillating"):
        lines.append(f"dual ascent oscillated over the second half (sign-flip share {dual['sign_flip_share']}, "
                     f"multiplier spread {dual['multiplier_spread']})")
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
