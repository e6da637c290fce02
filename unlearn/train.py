"""``train(cfg)``: one unlearning run, from config to run directory (plain function, no Hydra)."""
from __future__ import annotations

import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .checkpoint import (CHECKPOINT, FORMAT, FORMAT_VERSION, RUN_INFO, RunDirError, inspect_run_dir, load_checkpoint,
                         read_run_info, result_hash, resume_hash, save_checkpoint)
from .config import ConfigError, validate_config
from .distributed import get_dist
from .families import build_setup, family_class
from .logger import RunLogger
from . import reference_cache
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


def check_config(cfg: DictConfig):
    """Every check that needs no model (the config's, the method's, the formulation's, the model
    family's): one :class:`ConfigError` line each, before any weights are loaded or anything is
    written. Returns the formulation class and the method."""
    from .methods import build_method

    validate_config(cfg)
    formulation_cls = _resolve(str(cfg.formulation._target_), "formulation._target_")
    method = build_method(cfg.method).resolve(formulation_cls)  # e.g. method=baseline: the paper's baseline
    method.check_config(cfg, formulation_cls)  # fail before any pretraining
    formulation_cls.check_config(cfg, method)
    family_class(cfg.model.family).validate(cfg.model)
    return formulation_cls, method


def build(cfg: DictConfig, show_progress: bool = True):
    """Build the setup, sampler, formulation and multipliers a config describes (the method, which
    solves the formulation's problem, is ``formulation.method``). Checks that need the built model
    (e.g. LoRA target modules, prompt lengths) raise :class:`ConfigError` here, before training."""
    formulation_cls, method = check_config(cfg)
    setup = build_setup(cfg, formulation_cls.needs, show_progress=show_progress)
    sampler = build_sampler(setup.schedule, cfg.model.sampler)
    gen = generator(int(cfg.seed) + 1_000_003 * get_dist().rank)  # data-parallel ranks draw different batches
    formulation = formulation_cls(cfg.formulation, setup, sampler, gen, method, show_progress=show_progress)
    multipliers = method.build_multipliers(formulation)
    return setup, sampler, formulation, multipliers, gen


RESUME_MODES = ("auto", "never")


def _train_options(cfg: DictConfig) -> tuple[str, int]:
    resume = str(cfg.train.resume)
    if resume not in RESUME_MODES:
        raise ConfigError(f"train.resume must be one of {list(RESUME_MODES)} (got {resume!r})")
    every = cfg.train.checkpoint_every
    try:
        every = int(every)
    except (TypeError, ValueError):
        every = -1
    if every < 0:
        raise ConfigError(f"train.checkpoint_every must be an integer >= 0 (got {cfg.train.checkpoint_every!r})")
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


@dataclass
class Plan:
    """Phase 1: what this call will do with its run directory (nothing written yet)."""

    cfg: DictConfig
    run_dir: Path
    resolved: dict
    show: bool
    resume_mode: str
    checkpoint_every: int
    ckpt: dict | None = None        # the checkpoint to resume from
    old_info: dict | None = None    # the run_info.json of the run being resumed
    done: dict | None = None        # a finished run's summary (left as it is), or a non-main rank's answer
    t_start: float = field(default_factory=time.time)

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    @property
    def dual_steps(self) -> int:
        return int(self.cfg.train.dual_steps)


@dataclass
class Run:
    """Phase 2: the built run: models, method, metric suite, logger, provenance and driver."""

    setup: object
    sampler: object
    formulation: object
    multipliers: object
    evaluator: object
    logger: object
    driver: PrimalDual
    run_info: dict
    stable_info: dict
    saved: dict
    timing: dict = field(default_factory=dict)


def plan_run(cfg: DictConfig, run_dir: str | Path | None = None) -> Plan:
    """Validate the config and decide, before anything is written, whether the run directory starts a
    fresh run, resumes one (its checkpoint) or already holds this finished run. A foreign or corrupt
    directory raises :class:`~unlearn.checkpoint.RunDirError` and stays as it is; so does a bad config
    (:func:`check_config`: the error is about the input, whatever the directory holds)."""
    check_config(cfg)
    resume_mode, checkpoint_every = _train_options(cfg)
    dist = get_dist()
    run_dir = Path(dist.broadcast_object(str(run_dir if run_dir is not None else cfg.paths.run_dir)))
    plan = Plan(cfg, run_dir, OmegaConf.to_container(cfg, resolve=True), bool(cfg.progress), resume_mode,
                checkpoint_every)
    found, error = None, None
    if dist.is_main:
        try:
            found = inspect_run_dir(run_dir, plan.resolved, resume_mode, plan.dual_steps)
        except RunDirError as exc:
            error = exc
    verdict = dist.broadcast_object({"error": str(error) if error else None, "fresh": found is None,
                                     "completed": bool(found and found["completed"])})
    if error is not None:
        raise error
    if verdict["error"] is not None:
        raise RunDirError(verdict["error"])
    if verdict["completed"]:
        if not dist.is_main:
            plan.done = {"status": "completed", "rank": dist.rank}
            return plan
        plan.done = json.loads((run_dir / "summary.json").read_text())
        if plan.show:
            print(f"{run_dir}: this run is already complete (checkpoint at dual step {plan.dual_steps}); "
                  f"outputs left as they are", file=sys.stderr)
        return plan
    if not verdict["fresh"]:
        plan.ckpt = found["checkpoint"] if dist.is_main else (load_checkpoint(run_dir / CHECKPOINT)
                                                              if (run_dir / CHECKPOINT).exists() else None)
    plan.old_info = read_run_info(run_dir) if dist.is_main and found is not None else None
    return plan


def build_run(plan: Plan) -> Run:
    """Phase 2: build the models and the method, check a checkpoint fits them, start the metric suite
    (``metrics.strict`` fails here, before training), write ``config.yaml`` and ``run_info.json``."""
    cfg, run_dir, main = plan.cfg, plan.run_dir, get_dist().is_main
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        for tmp in run_dir.glob(f"{CHECKPOINT}*.tmp"):  # left by a run killed while it wrote a checkpoint
            tmp.unlink(missing_ok=True)
    torch.set_num_threads(int(cfg.num_threads))
    _seed_everything(plan.seed)
    setup, sampler, formulation, multipliers, _ = build(cfg, show_progress=plan.show)
    _seed_everything(plan.seed)  # pretraining draws from the global RNGs when the cache misses, not when it hits
    if plan.ckpt is not None:
        _check_fits(plan.ckpt, formulation, multipliers, run_dir / CHECKPOINT)
        if plan.show and main:
            print(f"resuming {run_dir} from its checkpoint at dual step {plan.ckpt['step']} of {plan.dual_steps}",
                  file=sys.stderr)
    evaluator = None
    if setup.to_images is not None and main:  # image families: KID, SSCD, CLIP, KL, likelihood
        from .evaluation import ImageEvaluator

        evaluator = ImageEvaluator(cfg, setup, sampler, run_dir)
        evaluator = evaluator if evaluator.active else None
    stable_info, volatile_info = split_volatile(setup.info)
    run_info = _run_info(plan, setup, volatile_info)
    if main:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(plan.resolved)))
        atomic_write_text(run_dir / RUN_INFO, json.dumps(run_info, indent=2, default=str))
    resume_step = int(plan.ckpt["step"]) if plan.ckpt is not None else None
    logger = RunLogger(run_dir, cfg.logger, plan.resolved, resume_step=resume_step) if main else None
    saved = {"step": resume_step}
    driver = _driver(plan, formulation, multipliers, logger, evaluator, saved, run_info["resume_hash"])
    return Run(setup, sampler, formulation, multipliers, evaluator, logger, driver, run_info, stable_info, saved)


def _run_info(plan: Plan, setup, volatile_info: dict) -> dict:
    ckpt, resolved = plan.ckpt, plan.resolved
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "resume_hash": resume_hash(resolved),
            "result_hash": result_hash(resolved), "seed": plan.seed, "status": "running",
            "versions": package_versions(), "git": git_state(), **device_info(setup.model),
            "sessions": list((plan.old_info or {}).get("sessions", [])) if ckpt is not None else []}
    info["sessions"].append({**session(int(ckpt["step"]) if ckpt is not None else None), "setup": volatile_info,
                             "world_size": get_dist().world_size})
    return info


def _driver(plan: Plan, formulation, multipliers, logger, evaluator, saved: dict, r_hash: str) -> PrimalDual:
    cfg, t, main = plan.cfg, plan.cfg.train, get_dist().is_main

    def on_step(step, model, mu):
        if evaluator is None or not evaluator.due(step):
            return None
        # RU's resampled samples at the current multipliers, like the final evaluation's (None: sample `model`)
        own = formulation.final_samples(mu, int(cfg.metrics.num_images), generator(plan.seed + 999))
        return evaluator.evaluate(model, step, f"step{step:05d}", own)[0]

    def checkpoint(step: int, state: dict):
        if main:
            save_checkpoint(plan.run_dir / CHECKPOINT, state, step, r_hash)
        saved["step"] = step

    return PrimalDual(formulation, multipliers, plan.dual_steps, t.primal_steps_per_dual, logger=logger,
                      show_progress=plan.show and main, log_every=int(t.log_every), on_step=on_step,
                      checkpoint_every=plan.checkpoint_every, checkpoint=checkpoint,
                      final_multipliers=str(t.final_multipliers), final_primal=str(t.final_primal),
                      estimate_every=1 if multipliers.learnable else int(t.baseline_estimate_every),
                      final_fit_steps=int(t.final_fit_steps or 0), final_fit_tol=float(t.final_fit_tol),
                      final_fit_lr_scale=float(t.final_fit_lr_scale))


def solve(plan: Plan, run: Run):
    """Phase 3: run the method (the dual steps and the final fit). Returns ``(mu, values, thresholds,
    extra)``, or a summary when the run diverged or this is a non-main data-parallel rank."""
    dist, t0 = get_dist(), time.time()
    try:
        result = run.driver.run(resume=plan.ckpt["state"] if plan.ckpt is not None else None)
    except Diverged as d:
        if not dist.is_main:
            return {"status": "diverged", "rank": dist.rank}
        hist = run.driver.history
        last = {k: v for k, v in hist[-1].items() if k != "time_s"} if hist else None  # no wall-clock in summaries
        summary = {**_head(plan, run), "status": "diverged",
                   "diverged": {"step": d.step, "quantity": d.quantity, "value": str(d.value)},
                   "checkpoint_step": run.saved["step"], "last_good": last,
                   "threshold_factor": run.formulation.factor, "seed": plan.seed}
        return _finish(plan, run, summary, "diverged")
    run.timing["train"] = time.time() - t0
    mu = result[0]
    if dist.world_size > 1:  # every rank's multipliers after each dual step, to check they agree
        import hashlib

        w = run.formulation.trainable_state()
        sha = hashlib.sha256(b"".join(w[k].float().numpy().tobytes() for k in sorted(w))).hexdigest()
        atomic_write_text(plan.run_dir / f"rank{dist.rank}_multipliers.json",
                          json.dumps({"multipliers": [h["multipliers"] for h in run.driver.history],
                                      "final": [float(v) for v in mu], "trainable_sha256": sha}))
        if not dist.is_main:
            return {"status": "completed", "rank": dist.rank, "multipliers": [float(v) for v in mu]}
    return result


def finalise(plan: Plan, run: Run, mu, extra: dict) -> dict:
    """Phase 4: final samples of the unlearned and the pretrained model (same seed), their metrics,
    the samples and the picture. Returns the metrics and the oracle's target for the summary. The
    pretrained side comes from the cache where an earlier run stored it (:mod:`unlearn.reference_cache`)."""
    cfg, f, setup, sampler, seed = plan.cfg, run.formulation, run.setup, run.sampler, plan.seed
    n = int(cfg.train.final_samples)
    final = f.final_model(mu)
    samples = f.final_samples(mu, n, generator(seed + 999))
    own = samples  # not None: the final samples do not come from `final` (RU's importance resampling)
    if samples is None:
        samples = sampler.sample(final, n, generator(seed + 999), cond=setup.cond).x0.detach()
    device = {k: run.run_info.get(k) for k in ("device", "device_name", "torch_threads")}
    key = (reference_cache.cache_key(cfg, run.stable_info, run.evaluator, device)
           if own is None else None)  # RU's resampled pool is the formulation's
    ref = reference_cache.load(cfg, key)
    if ref is not None and run.evaluator is not None:
        run.evaluator.use_retain_set(ref["retain"], ref["retain_info"])
    target = f.oracle_target(mu)
    metrics, metric_info = {}, {}
    if setup.evaluate is not None:
        metrics = setup.evaluate(samples, target.formulation if target else None, target.multipliers if target else None,
                                 model=final)
    metrics = {**f.final_metrics(mu), **metrics}  # e.g. RU's importance-weighted KL; measured ones win
    if run.evaluator is not None:
        suite_metrics, results = run.evaluator.evaluate(final, plan.dual_steps, "final", own)
        metrics = {**metrics, **suite_metrics}
    reused = ref is not None
    if not reused:
        ref = pretrained_side(plan, run, own, n)
        reference_cache.store(cfg, key, ref)
    else:
        reference_cache.write_pictures(plan.run_dir, ref["pictures"])
    pre_samples, pre_metrics = ref["samples"], dict(ref["metrics"])
    if own is not None:
        pre_metrics = {**f.final_metrics(torch.zeros_like(mu)), **pre_metrics}
    if run.evaluator is not None:
        pre_metrics = {**pre_metrics, **ref["suite_metrics"]}
        metric_info = {"metric_status": {k: r.get("status") for k, r in results.items()},
                       "metrics_missing": {k: r.get("reason") for k, r in results.items() if r.get("status") != "ok"},
                       "metric_protocols": {k: r.get("protocol") for k, r in results.items() if r.get("protocol")},
                       "retain_set": run.evaluator.retain_info}
    # where the pretrained side came from: run_info.json (summaries do not depend on the cache)
    run.run_info["sessions"][-1]["pretrained_eval"] = {"cache": "off" if key is None else ("reused" if reused else "stored"),
                                                       "key": key}
    if setup.save_samples is not None:
        setup.save_samples(plan.run_dir / "samples.npy", samples)
        setup.save_samples(plan.run_dir / "pretrained_samples.npy", pre_samples)
    if setup.plot is not None:
        title = f"{cfg.model.name} / {f.name.upper()} / {cfg.method.name}"
        setup.plot(plan.run_dir / "samples.png", pre_samples, samples, target.formulation if target else f.name,
                   target.multipliers if target else [float(v) for v in mu], title=title,
                   trained=f.has_primal or bool(extra.get("distill_kl")))  # RU dual-only: nothing was trained
    return {"metrics": metrics, "pretrained_metrics": pre_metrics, "metric_info": metric_info, "target": target}


def pretrained_side(plan: Plan, run: Run, own, n: int) -> dict:
    """The pretrained model's samples (the final samples' seed) and their evaluation: what
    :func:`finalise` compares the unlearned model with, and what the cache keeps."""
    f, setup, sampler, seed = run.formulation, run.setup, run.sampler, plan.seed
    pre_own = f.pretrained_samples(n, generator(seed + 999)) if own is not None else None
    pre_samples = pre_own if pre_own is not None else \
        sampler.sample(setup.pretrained, n, generator(seed + 999), cond=setup.cond).x0.detach()
    side = {"samples": pre_samples, "metrics": {}, "suite_metrics": {}, "pictures": {}}
    if setup.evaluate is not None:
        side["metrics"] = setup.evaluate(pre_samples, None, None, model=setup.pretrained)
    if run.evaluator is not None:
        side["suite_metrics"] = run.evaluator.evaluate(setup.pretrained, 0, "pretrained", pre_own)[0]
        side["retain"], side["retain_info"] = run.evaluator.retain_images(), run.evaluator.retain_info
        side["pictures"] = reference_cache.eval_pictures(plan.run_dir, "pretrained_")
    return side


def write_outputs(plan: Plan, run: Run, mu, values, thr, extra: dict, final: dict) -> dict:
    """Phase 5: the trained weights (``model.pt``, and the family's own format), ``summary.json``
    with the delivered model's constraints, status and verdict, ``run_info.json``, the table."""
    cfg, f, setup = plan.cfg, run.formulation, run.setup
    composed = not f.has_primal and not extra.get("distill_kl")  # RU dual-only: the result is the composed score
    atomic_torch_save({"state_dict": f.trainable_state(), "multipliers": mu, "composed": composed},
                      plan.run_dir / "model.pt")
    exported = []  # the trained weights in the family's own format, e.g. LoRA for diffusers
    if setup.save_model is not None and not composed:
        exported = list(setup.save_model(plan.run_dir) or [])
    tol = float(cfg.train.satisfied_tol)
    sat = f.satisfied(values, thr, tol)
    names = f.constraint_names()
    status, verdict = outcome(sat, names, f.reliability(mu), run.multipliers.learnable, tol)
    target = final["target"]
    summary = {
        **_head(plan, run), "status": status, "verdict": verdict, "constraints_met": all(sat),
        "constraints": [{"name": nm, "value": float(v), "threshold": float(b), "pretrained": float(p),
                         "satisfied": s, "sense": ">=" if f.sense == "ge" else "<="}
                        for nm, v, b, p, s in zip(names, values, thr, run.driver.pretrained_values, sat)],
        "multipliers": [float(v) for v in mu], "exported": exported,
        "oracle_target": {"formulation": target.formulation, "multipliers": target.multipliers} if target else None,
        "threshold_factor": f.factor, "metrics": final["metrics"], "pretrained_metrics": final["pretrained_metrics"],
        **final["metric_info"], "extra": {**extra, **f.diagnostics(mu)}, "setup": run.stable_info, "seed": plan.seed,
    }
    if setup.oracle is not None and bool(cfg.train.oracle_multipliers) and f.oracle_comparable:
        try:
            given = f.cfg.thresholds
            exact_b = (np.asarray([float(v) for v in given]) if given is not None  # the run's own rule on exact values
                       else f.factor_thresholds(torch.as_tensor(f.oracle_pretrained_values(setup.oracle))).numpy())
            summary["oracle"] = {"thresholds": exact_b.tolist(),
                                 "multipliers": f.oracle_multipliers(setup.oracle, exact_b).tolist()}
        except ValueError as exc:
            summary["oracle"] = {"error": str(exc)}
    _finish(plan, run, summary, status)
    if plan.show:
        print_summary(summary, plan.run_dir, wall_time_s=time.time() - plan.t_start)
    return summary


def _head(plan: Plan, run: Run) -> dict:
    return {"model": str(plan.cfg.model.name), "formulation": run.formulation.name, "method": str(plan.cfg.method.name)}


def _finish(plan: Plan, run: Run, summary: dict, status: str) -> dict:
    """Write ``summary.json`` and ``run_info.json`` and close the logger. ``wall_time_s`` (all sessions
    of the run together, as in ``run_info.json``) is the one field of ``summary.json`` that differs
    between two identical runs."""
    info = run.run_info
    wall = round(time.time() - plan.t_start, 2)
    earlier = sum(float(x.get("wall_time_s") or 0.0) for x in info["sessions"][:-1])
    summary["wall_time_s"] = round(earlier + wall, 2)
    atomic_write_text(plan.run_dir / "summary.json", json.dumps(summary, indent=2, default=float))
    info["status"] = status
    info["sessions"][-1].update(wall_time_s=wall, train_time_s=round(run.timing.get("train", wall), 2))
    atomic_write_text(plan.run_dir / RUN_INFO, json.dumps(info, indent=2, default=str))
    run.logger.finish(summary)
    return summary


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Run one unlearning experiment and write its outputs to ``run_dir``; returns the summary.

    Five phases: plan the run directory, build the run, solve (the method's dual steps and final
    fit), finalise (samples, metrics, pictures), write the outputs. A directory that already holds a
    checkpoint of the same run is resumed from it (``train.resume=auto``); a run that meets a
    non-finite quantity stops and returns a summary with ``"status": "diverged"``.
    """
    plan = plan_run(cfg, run_dir)
    if plan.done is not None:
        return plan.done
    run = build_run(plan)
    result = solve(plan, run)
    if isinstance(result, dict):  # diverged, or a non-main data-parallel rank
        return result
    mu, values, thr, extra = result
    final = finalise(plan, run, mu, extra)
    return write_outputs(plan, run, mu, values, thr, extra, final)


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
        how = {"average": "the multiplier above is its mean over the second half",
               "last": "the multiplier above is its last value"}.get(dual.get("delivered_multipliers"), "")
        lines.append(f"dual ascent oscillated over the second half (sign-flip share {dual['sign_flip_share']}, "
                     f"multiplier spread {dual['multiplier_spread']}){': ' + how if how else ''}")
    ex = summary.get("extra") or {}
    if "distilled_kl_to_target" in ex:
        lines.append(f"distilled into the weights: path KL to the composed target {ex['distilled_kl_to_target']:.4g} "
                     f"(+- {ex['distilled_kl_to_target_stderr']:.2g}); the distilled model's KL to the pretrained model "
                     f"{ex['distilled_kl_to_pretrained']:.4g}")
    met = summary.get("metrics") or {}
    pre = summary.get("pretrained_metrics") or {}
    keys = [k for k in ("unlearned_share", "unlearned_mass", "expected_likelihood", "kl_to_pretrained", "kl_to_retained", "kl_to_target")
            if k in met]
    if keys:
        lines.append(f"{'metric':<22}{'unlearned':>12}{'pretrained':>12}")
        for k in keys:
            v, p = met.get(k), pre.get(k)
            fmt = lambda z: f"{z:>12.4g}" if isinstance(z, (int, float)) else f"{'-':>12}"
            lines.append(f"{k:<22}{fmt(v)}{fmt(p)}")
    lines.append(f"outputs: {run_dir}")
    print("\n".join(lines), file=file)
