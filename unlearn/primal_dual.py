"""The primal-dual driver shared by every formulation."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

from .checkpoint import rng_state, set_rng_state
from .distributed import get_dist
from .dual import Multipliers
from .formulations.base import Formulation
from .utils import progress


class Diverged(RuntimeError):
    """A non-finite loss, constraint estimate or multiplier: the run stops at ``step``."""

    def __init__(self, step: int, quantity: str, value: float):
        self.step, self.quantity, self.value = int(step), str(quantity), float(value)
        super().__init__(f"non-finite {quantity} = {value} at dual step {step}")


def _first_nonfinite(values) -> float | None:
    t = torch.as_tensor(values).detach()
    if bool(torch.isfinite(t).all()):
        return None
    t = t.flatten().double()
    bad = t[~torch.isfinite(t)]
    return float(bad[0]) if len(bad) else None


class PrimalDual:
    """``for each dual step: K primal steps on the Lagrangian; estimate constraints; move mu``.

    ``checkpoint(step, state)`` is called every ``checkpoint_every`` dual steps and after the
    last one, with :meth:`state_dict`; :meth:`run` takes such a state to continue from it.
    Under data parallelism (``unlearn.distributed``) constraint estimates are averaged over
    ranks, a non-finite loss on any rank stops every rank, and a checkpoint holds every rank's
    generator and RNG states (the rest is identical across ranks).
    """

    def __init__(self, formulation: Formulation, multipliers: Multipliers, dual_steps: int, primal_steps_per_dual: int,
                 logger=None, show_progress: bool = True, log_every: int = 1, on_step=None, checkpoint_every: int = 0,
                 checkpoint: Callable[[int, dict], None] | None = None, final_multipliers: str = "last",
                 final_primal: str = "last", estimate_every: int = 1, final_fit_steps: int = 0,
                 final_fit_tol: float = 0.05, final_fit_lr_scale: float = 1.0):
        self.f, self.mu = formulation, multipliers
        # fixed multipliers (baselines): the constraints are only monitored, so they may be
        # estimated every few dual steps (always at the last one); dual ascent needs every step's
        self.estimate_every = int(estimate_every)
        if self.estimate_every < 1:
            raise ValueError(f"estimate_every must be >= 1 (got {estimate_every})")
        if self.estimate_every > 1 and getattr(multipliers, "learnable", False):
            raise ValueError("estimate_every > 1 needs fixed multipliers (dual ascent uses every estimate)")
        if final_multipliers not in ("last", "average"):
            raise ValueError(f"final_multipliers must be 'last' or 'average' (got {final_multipliers!r})")
        if final_primal not in ("last", "average"):
            raise ValueError(f"final_primal must be 'last' or 'average' (got {final_primal!r})")
        self.final_multipliers, self.final_primal = final_multipliers, final_primal
        # after the dual steps: while the delivered model violates a constraint by more than final_fit_tol
        # (relative), up to final_fit_steps more dual steps on the final estimates, each followed by the
        # primal steps at the new multipliers (dual ascent only)
        self.final_fit_steps, self.final_fit_tol = max(0, int(final_fit_steps)), float(final_fit_tol)
        self.final_fit_lr_scale = float(final_fit_lr_scale)  # primal learning rate during the fit, relative
        # final_primal=average: running mean of the trainable weights after the primal steps of each
        # dual step in the second half (the primal counterpart of the averaged multipliers)
        self.primal_average: dict | None = None
        self.primal_average_count = 0
        self.primal_average_start = 0  # the first dual step in the average
        self.dual_steps, self.k = int(dual_steps), int(primal_steps_per_dual)
        self.logger, self.show, self.log_every = logger, show_progress, max(1, int(log_every))
        self.checkpoint_every, self.checkpoint = max(0, int(checkpoint_every)), checkpoint
        self.history: list[dict] = []
        self.on_step = on_step  # on_step(step, model, multipliers) -> dict of evaluation numbers (or None), logged with the step
        self.step = 0
        self.elapsed = 0.0

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The run's state (collective under data parallelism: call it on every rank)."""
        state = {"step": self.step, "history": self.history, "elapsed_s": self.elapsed,
                 "pretrained_values": self.pretrained_values.clone(), "thresholds": self.threshold_values.clone(),
                 "values": torch.as_tensor(self.values).clone(),
                 "formulation": self.f.state_dict(), "multipliers": self.mu.state_dict(), "rng": rng_state()}
        if self.primal_average is not None:
            state["primal_average"] = {"count": self.primal_average_count, "start": self.primal_average_start,
                                       "weights": {k: v.clone() for k, v in self.primal_average.items()}}
        dist = get_dist()
        state["world_size"] = dist.world_size
        if dist.world_size > 1:  # each rank draws its own batches
            state["ranks"] = dist.gather_object({"generator": state["formulation"]["generator"], "rng": state["rng"]})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step, self.history, self.elapsed = int(state["step"]), list(state["history"]), float(state["elapsed_s"])
        self.pretrained_values, self.threshold_values = state["pretrained_values"], state["thresholds"]
        self.values = state["values"]
        self.f.load_state_dict(state["formulation"])
        self.mu.load_state_dict(state["multipliers"])
        avg = state.get("primal_average")
        self.primal_average = {k: v.clone() for k, v in avg["weights"].items()} if avg else None
        self.primal_average_count = int(avg["count"]) if avg else 0
        self.primal_average_start = int(avg.get("start", 0)) if avg else 0
        if avg and self.primal_average_start < self.dual_steps // 2 + 1:
            # an extended run (more dual steps): its second half starts later. Exact when the
            # checkpoint is still before the new start; otherwise the average restarts here
            self.primal_average, self.primal_average_count, self.primal_average_start = None, 0, 0
        rng = state["rng"]
        if "ranks" in state:
            own = state["ranks"][get_dist().rank]
            self.f.gen.set_state(own["generator"])
            rng = own["rng"]
        set_rng_state(rng)

    # -- divergence ------------------------------------------------------------------------------
    def _check(self, step: int, kind: str, names, values) -> None:
        if _first_nonfinite(values) is None:
            return
        vals = torch.as_tensor(values, dtype=torch.float64).detach().flatten()
        for n, v in zip(names, vals.tolist()):
            if not math.isfinite(v):
                raise Diverged(step, f"{kind} {n}", v)

    def _check_losses(self, step: int, losses: dict) -> None:
        bad = next(((k, v) for k, v in losses.items() if isinstance(v, (int, float)) and not math.isfinite(v)), None)
        dist = get_dist()
        if dist.enabled:  # losses are per rank: every rank must stop together
            if float(dist.mean(torch.tensor([0.0 if bad is None else 1.0]))) > 0 and bad is None:
                raise Diverged(step, "loss (on another data-parallel rank)", float("nan"))
        if bad is not None:
            k, v = bad
            raise Diverged(step, "loss" if k == "loss" else f"loss ({k})", v)

    def _record(self, step, losses, values, thresholds, mu, elapsed, evaluation=None, diagnostics=None,
                phase: str | None = None):
        names = self.f.constraint_names()
        rec = {
            "losses": losses,
            # values=None: not estimated at this step (fixed multipliers, estimate_every > 1)
            "constraints": ({n: {"value": float(v), "threshold": float(b)} for n, v, b in zip(names, values, thresholds)}
                            if values is not None else {}),
            "multipliers": {n: float(m) for n, m in zip(names, mu)},
            "time_s": round(elapsed, 3),
        }
        if evaluation:
            rec["eval"] = evaluation
        if diagnostics:
            rec["diagnostics"] = diagnostics
        if phase:
            rec["phase"] = phase
        self.history.append({"step": step, **rec})
        if self.logger is not None and (step % self.log_every == 0 or step >= self.dual_steps):
            self.logger.log(step, rec)

    def _save(self):
        if self.checkpoint is not None:
            for n, p in self.f._trainable_named().items():  # never checkpoint a broken state
                bad = _first_nonfinite(p)
                if bad is not None:
                    raise Diverged(self.step, f"trainable weight {n}", bad)
            self.checkpoint(self.step, self.state_dict())  # the callback writes on the main rank only

    def _accumulate_primal(self) -> None:
        w = {n: p.detach().to(torch.float64).cpu() for n, p in self.f._trainable_named().items()}
        self.primal_average_count += 1
        if self.primal_average is None:
            self.primal_average = {n: v.clone() for n, v in w.items()}
            self.primal_average_start = self.step + 1
        else:
            c = self.primal_average_count
            for n, v in w.items():
                self.primal_average[n] += (v - self.primal_average[n]) / c

    def _load_primal_average(self) -> int:
        """``final_primal="average"``: put the mean of the trainable weights over the second half of
        the dual steps into the model (stochastic primal steps leave the last iterate scattered around
        the Lagrangian minimiser; averaged primal and dual iterates are what primal-dual theory bounds).
        Returns how many iterates were averaged (0: nothing changed)."""
        if self.final_primal != "average" or self.primal_average is None:
            return 0
        with torch.no_grad():
            for n, p in self.f._trainable_named().items():
                p.copy_(self.primal_average[n].to(p.dtype))
        return self.primal_average_count

    def final_mu(self) -> torch.Tensor:
        """The last multipliers, or (``final_multipliers="average"``) the mean of the multipliers over
        the second half of the dual steps and the final ones: stochastic dual ascent on noisy
        constraint estimates makes the last iterate a random walk around the optimum, whose
        average converges (the formulation's ``finalize`` then refits the primal at it)."""
        last = self.mu.value()
        if self.final_multipliers == "last":
            return last
        names = self.f.constraint_names()
        tail = [[h["multipliers"][n] for n in names] for h in self.history if h["step"] > self.dual_steps // 2]
        rows = torch.tensor(tail + [[float(v) for v in last]], dtype=torch.float64)
        return rows.mean(0).to(torch.as_tensor(last).dtype)

    def _final_fit(self, mu: torch.Tensor, values: torch.Tensor, thr: torch.Tensor):
        """Fit the delivered model into its constraints: while one is violated beyond ``final_fit_tol``,
        one more dual step on the final estimate (from the delivered multipliers) that moves only the
        violated constraints' multipliers, then the primal steps at the new multipliers and a new final
        estimate. Returns ``(mu, values, steps taken)``."""
        if not getattr(self.mu, "learnable", False) or self.final_fit_steps == 0:
            return mu, values, 0
        dist, names = get_dist(), self.f.constraint_names()
        fit = 0
        if not all(self.f.satisfied(values, thr, self.final_fit_tol)) and self.f.has_primal:
            self.f.scale_primal_lr(self.final_fit_lr_scale)  # smaller primal steps: less scatter around the minimiser
        while fit < self.final_fit_steps and not all(self.f.satisfied(values, thr, self.final_fit_tol)):
            fit += 1
            self.mu.set_value(mu)
            jac = self.f.dual_jacobian(mu) if getattr(self.mu, "rule", "plain") == "newton" else None
            # only the violated constraints move: the fit restores feasibility, it does not relax what holds
            ok = torch.tensor(self.f.satisfied(values, thr, self.final_fit_tol))
            violation = torch.where(ok, torch.zeros_like(values), self.f.violation(values, thr))
            self.mu.update(violation, jacobian=jac, trusted=self.f.trusted, recenter=self.f.recenter,
                           noise=self.f.standard_error())
            mu = self.mu.value()
            self._check(self.dual_steps + fit, "multiplier", names, mu)
            losses = {}
            if self.f.has_primal:
                for _ in range(self.k):
                    losses = self.f.primal_step(mu)
                    self._check_losses(self.dual_steps + fit, losses)
            values = dist.mean(self.f.final_estimate(mu))
            self._check(self.dual_steps + fit, "final constraint", names, values)
            self._record(self.dual_steps + fit, losses, values, thr, mu, self.elapsed, phase="final_fit")
        return mu, values, fit

    def run(self, resume: dict | None = None):
        """Run (or, given a checkpoint's state, continue) the dual steps; returns
        ``(final multipliers, final constraint values, thresholds, extra)``. Raises
        :class:`Diverged` on the first non-finite quantity, before any checkpoint of it."""
        # computed on a resume too: it draws from the formulation's generator exactly as the
        # original run did (e.g. RU's importance pool), before the saved states replace it
        dist = get_dist()  # constraint estimates are averaged over data-parallel ranks
        pre = dist.mean(self.f.pretrained_values())
        names = self.f.constraint_names()
        self._check(0, "pretrained constraint", names, pre)
        thr = self.f.thresholds(pre)
        self.f.prepare()  # one-off draws (e.g. LU's weighted pool), also redrawn before a resume's states load
        self.pretrained_values, self.threshold_values, self.values = pre, thr, pre
        if resume is not None:
            self.load_state_dict(resume)
            pre, thr = self.pretrained_values, self.threshold_values
        t0 = time.time() - self.elapsed
        bar = progress(range(self.step + 1, self.dual_steps + 1), desc=f"{self.f.name.upper()} primal-dual",
                       enabled=self.show)
        for step in bar:
            mu = self.mu.value()
            losses: dict = {}
            if self.f.has_primal:
                for _ in range(self.k):
                    losses = self.f.primal_step(mu)
                    self._check_losses(step, losses)
            if self.final_primal == "average" and self.f.has_primal and step > self.dual_steps // 2:
                self._accumulate_primal()
            estimated = step % self.estimate_every == 0 or step == self.dual_steps
            values = dist.mean(self.f.estimate(mu)) if estimated else self.values
            if estimated:
                self._check(step, "constraint", names, values)
                jac = self.f.dual_jacobian(mu) if getattr(self.mu, "rule", "plain") == "newton" else None
                self.mu.update(self.f.violation(values, thr), jacobian=jac, trusted=self.f.trusted,
                               recenter=self.f.recenter, noise=self.f.standard_error())
            self._check(step, "multiplier", names, self.mu.value())
            mu_now = self.mu.value()
            evaluation = self.on_step(step, self.f.final_model(mu_now), mu_now) if self.on_step else None
            self.step, self.values, self.elapsed = step, values, time.time() - t0
            self._record(step, losses, values if estimated else None, thr, mu, self.elapsed, evaluation,
                         self.f.step_diagnostics(mu_now))
            bar.set_postfix(c=", ".join(f"{float(v):.3g}/{float(b):.3g}" for v, b in zip(values, thr)),
                            mu=", ".join(f"{float(m):.3g}" for m in self.mu.value()), refresh=False)
            if self.checkpoint_every and step % self.checkpoint_every == 0 and step < self.dual_steps:
                self._save()
        if resume is None or int(resume["step"]) < self.dual_steps:
            self._save()  # the end of the dual steps (before finalize, so a run can be extended)
        final_mu = self.final_mu()
        averaged = self._load_primal_average()
        extra = self.f.finalize(final_mu)
        if averaged:
            extra = {**extra, "primal_average_of": averaged}
        # the delivered model at the final multipliers, estimated after the last update (never the
        # value the last dual step saw, which belongs to the multipliers before it)
        values = dist.mean(self.f.final_estimate(final_mu))
        self._check(self.dual_steps, "final constraint", names, values)
        final_mu, values, fit = self._final_fit(final_mu, values, thr)
        if fit:
            extra = {**extra, "final_fit_steps": fit}
        self.final_values = values
        osc = self.mu.oscillation([[h["multipliers"][n] for n in names] for h in self.history])
        if osc:
            extra = {**extra, "dual": {**osc, "delivered_multipliers": self.final_multipliers}}
        return final_mu, values, thr, extra
