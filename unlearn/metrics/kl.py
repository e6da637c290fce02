"""The ``kl`` metric: pathwise ``KL(P_model || P_pre)`` (Lemma 3) along trajectories of the run's sampler."""
from __future__ import annotations

from .base import Checks, Metric, Result
from .divergence import kl_to_pretrained, sampler_protocol


class KLToPretrained(Metric, name="kl"):
    """``KL(P_model || P_pretrained)`` between path measures; needs a stochastic sampler."""

    needs = ("model", "pretrained", "sampler")

    @classmethod
    def validate(cls, check: Checks) -> None:
        check.number("num_samples", int, 1)
        check.number("batch_size", int, 1)

    def evaluate(self, ctx, weights, seed) -> Result:
        c = self.cfg
        r = kl_to_pretrained(ctx.model, ctx.pretrained, ctx.sampler, int(c.num_samples), seed, ctx.cond,
                             batch_size=int(c.batch_size))
        proto = {"estimator": "pathwise KL (Lemma 3), exact weights c_t^2/(2 s_t^2)",
                 "direction": "KL(P_model || P_pretrained), trajectories of the model",
                 "sampler": sampler_protocol(ctx.sampler), "n": r["n"], "seed": seed}
        return Result(r["value"], proto, {"stderr": r["stderr"]})

    @classmethod
    def scalars(cls, result: dict) -> dict[str, float]:
        return {"kl_to_pretrained": result["value"], "kl_to_pretrained_stderr": result["stderr"]}
