"""``attack=relearn``: a few fine-tuning steps on a handful of concept images bring an erased concept
back? The run's trainable weights (its LoRA adapters, or the whole network) are fine-tuned with the
plain denoising loss on ``images`` samples of the unlearned concepts (real ones where the testbed
has them) under the model's own condition (``condition: retain``) or the concept's own
(``condition: concept``: its prompt or class label), without guidance; after each of ``steps`` fine-tuning
steps the concept's share (the family's judge) and its expected likelihood are measured on
``eval_samples`` samples (the same seeds at every step, for both sides)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.base import draw_conditions
from ..utils import generator, progress
from ..models.diffusers_models import ConditionedView, recondition
from .base import Attack, AttackError, number, positive, step_counts
from .target import plain_view

CONDITIONS = ("retain", "concept")


class Relearn(Attack, kind="relearn"):
    @classmethod
    def validate(cls, cfg) -> None:
        step_counts(cfg, "fine-tuning")
        number(cfg, "images", int, 1)
        number(cfg, "batch_size", int, 1)
        number(cfg, "eval_samples", int, 1)
        number(cfg, "likelihood_samples", int, 0)
        number(cfg, "likelihood_timesteps", int, 1)
        positive(cfg, "lr")
        if str(cfg.condition) not in CONDITIONS:
            raise AttackError(f"attack.condition must be one of {list(CONDITIONS)} (got {cfg.condition!r})")

    def cannot_run(self, target) -> str | None:
        s = target.setup
        if str(self.cfg.condition) == "concept" and (len(s.concepts) != 1 or not isinstance(s.concepts[0], ConditionedView)
                                                     or not isinstance(s.model, ConditionedView)):
            return (f"model {s.name}: attack.condition=concept needs one concept model with a condition of its own "
                    f"(a prompt or class label; this run has {len(s.concepts)} concept models"
                    f"{'' if not s.concepts or isinstance(s.concepts[0], ConditionedView) else ' without one'}); "
                    f"accepted: attack.condition=retain")
        if target.composed:
            return (f"{target.run_dir}: the run's result is a composed score (RU dual-only, no weights were "
                    f"trained), so there is nothing to fine-tune; accepted: a run with trained weights (e.g. "
                    f"formulation.distill_steps > 0)")
        return None

    def measure(self, target, model, seed: int) -> dict:
        c = self.cfg
        x = target.sample(model, int(c.eval_samples), seed)
        out = {"share": target.judge.share(x)}
        m = min(int(c.likelihood_samples), len(x))
        if m > 0:
            el = target.expected_likelihood(x[:m], seed + 1, int(c.likelihood_timesteps), int(c.batch_size) * 4)
            if el:
                out["expected_likelihood"] = sum(el) / len(el)
                out["expected_likelihood_per_concept"] = el
        return out

    def run(self, target, side: str) -> dict:
        c, seed = self.cfg, int(self.cfg.seed)
        model = target.use(side)
        params = target.trainable()
        data, source = target.concept_samples(int(c.images), generator(seed))
        view = plain_view(model)
        if str(c.condition) == "concept":  # the trainable model under the concept's own prompt or label
            view = recondition(view, plain_view(target.setup.concepts[0]).cond)
        schedule = target.setup.schedule
        opt = torch.optim.AdamW(params, lr=float(c.lr), weight_decay=0.0)
        checkpoints = step_counts(c, "fine-tuning")
        gen, eval_seed = generator(seed + 1), seed + 1000
        curve, losses = [], []
        bar = progress(range(checkpoints[-1] + 1), desc=f"relearn ({side})", enabled=self.show)
        for step in bar:
            if step in checkpoints:
                curve.append({"step": step, **self.measure(target, model, eval_seed)})
            if step == checkpoints[-1]:
                break
            idx = torch.randint(0, len(data), (int(c.batch_size),), generator=gen)
            x0 = data[idx]
            t = torch.randint(0, schedule.T, (len(x0),), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            draw_conditions(view, len(x0), gen)
            loss = F.mse_loss(view.eps(schedule.add_noise(x0, noise, t), t), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return {"curve": curve, "data": {"images": len(data), "source": source, "condition": str(c.condition)},
                "loss_first_last":
                [losses[0], losses[-1]] if losses else []}

    def compare(self, pretrained: dict, unlearned: dict) -> dict:
        pre0 = pretrained["curve"][0]["share"]
        clean = unlearned["curve"][0]["share"]
        removed = pre0 - clean
        half = None
        for point in unlearned["curve"]:
            if removed > 0 and point["share"] >= clean + 0.5 * removed:
                half = point["step"]
                break
        last_pre = pretrained["curve"][-1]["share"]
        return {"pretrained_share": pre0, "clean_share": clean, "removed_share": removed,
                "share_after": {str(p["step"]): p["share"] for p in unlearned["curve"]},
                "steps_to_half_recovery": half,
                "recovered_pretrained_share": any(p["share"] >= pre0 for p in unlearned["curve"][1:]),
                "sanity": {"check": "relearning raises the pretrained model's concept share (or it is at 1 already)",
                           "passed": bool(last_pre > pre0 or pre0 >= 0.99), "pretrained_share_after": last_pre}}
