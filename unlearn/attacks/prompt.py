"""``attack=prompt``: an adversarial soft prompt that brings the concept back. The condition the model
is sampled under (the text prompt's token embeddings, or the class embedding) starts at the retain
condition and is optimised, the model's weights fixed, two ways:

* ``classifier`` (as UnlearnDiffAtk does with its classifier): maximise the judge's log-probability
  of the concept on samples of a few-step deterministic DDIM sampler, differentiated through the
  chain (and the VAE decoder for latent models);
* ``inversion`` (textual inversion): minimise the plain denoising loss on ``images`` concept images.

The attack success rate is the share of ``eval_seeds`` samples (the run's own sampler and guidance,
seeds never used in the optimisation) that the judge assigns to an unlearned concept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.diffusers_models import recondition
from ..models.soft_conditions import ascent_step, check_radius, weights_fixed
from ..samplers import GaussianSampler
from ..utils import generator, progress
from .base import Attack, AttackError, number, positive, step_counts

OBJECTIVES = ("classifier", "inversion")


class PromptAttack(Attack, kind="prompt"):
    @classmethod
    def validate(cls, cfg) -> None:
        obj = list(cfg.objectives) if not isinstance(cfg.objectives, str) else [cfg.objectives]
        if not obj or any(o not in OBJECTIVES for o in obj):
            raise AttackError(f"attack.objectives must list some of {list(OBJECTIVES)} (got {cfg.objectives!r})")
        step_counts(cfg, "optimisation")
        for key in ("batch_size", "sampler_steps", "images", "eval_seeds", "restarts"):
            number(cfg, key, int, 1)
        positive(cfg, "lr")
        radius(cfg)

    def cannot_run(self, target) -> str | None:
        s = target.setup
        if s.soft_condition is None:
            return (f"model {s.name}: takes no condition to optimise (no text encoder or class embedding), so the "
                    f"prompt attack cannot run; accepted: text-to-image or class-conditional models")
        if s.concept_judge is None or s.concept_judge.log_prob is None and "classifier" in list(self.cfg.objectives):
            return (f"model {s.name}: no differentiable judge of the concepts for objective 'classifier'; accepted: "
                    f"attack.objectives=[inversion]")
        return None

    def run(self, target, side: str) -> dict:
        c, seed = self.cfg, int(self.cfg.seed)
        model = target.use(side)
        with weights_fixed(model):  # the model is fixed: only the soft condition learns
            eval_seed = seed + 1000
            clean = target.judge.share(target.sample(model, int(c.eval_seeds), eval_seed))
            out = {"clean_share": clean, "objectives": {}}
            for obj in (list(c.objectives) if not isinstance(c.objectives, str) else [c.objectives]):
                out["objectives"][obj] = self._best_of(target, model, obj, seed, eval_seed, side)
            return out

    def _best_of(self, target, model, objective: str, seed: int, eval_seed: int, side: str) -> dict:
        """``restarts`` runs of the attack from the retain condition, each with its own noise, and the one
        whose own objective ended lowest (what an attacker can see: not the held-out seeds' judgement)."""
        runs = [self._attack(target, model, objective, seed, eval_seed, side, r) for r in range(int(self.cfg.restarts))]
        final = [r["loss_first_last"][-1] if r["loss_first_last"] else 0.0 for r in runs]
        best = min(range(len(runs)), key=final.__getitem__)
        return {**runs[best], "restart": best, "restarts": [
            {"final_loss": f, "attack_success_rate": r["attack_success_rate"]} for f, r in zip(final, runs)]}

    def _attack(self, target, model, objective: str, seed: int, eval_seed: int, side: str, restart: int = 0) -> dict:
        c, s = self.cfg, target.setup
        soft = s.soft_condition()
        try:
            opt = torch.optim.Adam(soft.parameters(), lr=float(c.lr))
            gen = generator(seed + 7 + 1009 * restart)  # restart 0: the single run's noise
            fast = GaussianSampler(s.schedule, num_steps=int(c.sampler_steps), kind="ddim", eta=0.0)
            data = target.concept_samples(int(c.images), generator(seed))[0] if objective == "inversion" else None
            bound = radius(c)
            losses, curve = [], []
            checkpoints = step_counts(c, "optimisation")
            for step in progress(range(checkpoints[-1] + 1), desc=f"prompt attack, {objective} ({side}, {restart})",
                                 enabled=self.show):
                if step in checkpoints:
                    with torch.no_grad():
                        view = recondition(model, soft.condition(guided=True))
                        curve.append({"step": step, "attack_success_rate":
                                      target.judge.share(target.sample(view, int(c.eval_seeds), eval_seed))})
                if step == checkpoints[-1]:
                    break
                if objective == "classifier":
                    losses.append(ascent_step(model, soft, target.judge.log_prob, fast, int(c.batch_size), gen, opt,
                                              bound))
                    continue
                x0 = data[torch.randint(0, len(data), (int(c.batch_size),), generator=gen)]
                t = torch.randint(0, s.schedule.T, (len(x0),), generator=gen)
                noise = torch.randn(x0.shape, generator=gen)
                view = recondition(model, soft.condition(guided=False))
                loss = F.mse_loss(view.eps(s.schedule.add_noise(x0, noise, t), t), noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                soft.project(bound)
                losses.append(float(loss.detach()))
            return {"attack_success_rate": curve[-1]["attack_success_rate"], "curve": curve,
                    "loss_first_last": [losses[0], losses[-1]] if losses else [], "condition": soft.describe(),
                    "distance": soft.distance()}
        finally:
            soft.close()

    def compare(self, pretrained: dict, unlearned: dict) -> dict:
        pre_clean = pretrained["clean_share"]
        out = {"pretrained_share": pre_clean, "clean_share": unlearned["clean_share"], "attack_success_rate": {},
               "pretrained_attack_success_rate": {}, "sanity": {}}
        for obj, r in unlearned["objectives"].items():
            pre = pretrained["objectives"][obj]["attack_success_rate"]
            out["attack_success_rate"][obj] = r["attack_success_rate"]
            out["pretrained_attack_success_rate"][obj] = pre
            out.setdefault("attack_success_rate_after", {})[obj] = {str(p["step"]): p["attack_success_rate"]
                                                                   for p in r["curve"]}
            out["sanity"][obj] = {"check": "on the pretrained model the attack raises the concept share above its "
                                           "clean share (or it is at 1 already)",
                                  "passed": bool(pre > pre_clean or pre_clean >= 0.99)}
        return out


def radius(cfg) -> float | None:
    """``attack.radius``: null (unbounded) or a number > 0, each row of the soft condition kept within
    that many times its starting norm of the retain condition (:meth:`SoftCondition.project`)."""
    return check_radius(cfg.radius, "attack.radius", AttackError)
