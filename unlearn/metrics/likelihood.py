"""The ``likelihood`` metric: expected likelihood ``E_model[q_i / p_pre]`` of each unlearning concept (Lemma 2)."""
from __future__ import annotations

from .base import Checks, Metric, Result
from .divergence import expected_likelihood, sampler_protocol


class ExpectedLikelihood(Metric, name="likelihood"):
    """Per concept ``E_model[q_i / p]`` (``p``: ``ctx.likelihood_reference`` or the pretrained model),
    their mean as ``value``, and the mean log-ratio."""

    needs = ("model", "pretrained", "sampler", "concepts")

    @classmethod
    def validate(cls, check: Checks) -> None:
        check.number("num_samples", int, 1)
        check.number("batch_size", int, 1)
        check.number("num_timesteps", int, 1)
        check.number("num_noise", int, 1)

    def evaluate(self, ctx, weights, seed) -> Result:
        c = self.cfg
        r = expected_likelihood(ctx.model, list(ctx.concepts), ctx.likelihood_reference or ctx.pretrained, ctx.sampler,
                                int(c.num_samples), seed, ctx.cond, list(ctx.concept_conds) or None,
                                int(c.num_timesteps), int(c.num_noise), bool(c.antithetic), int(c.batch_size))
        names = list(ctx.concept_names) or [str(i) for i in range(len(ctx.concepts))]
        proto = {"estimator": "E_model[exp(log q_i - log p_pre)], log-ratio from denoising errors over log-SNR (Lemma 2)",
                 "num_timesteps": int(c.num_timesteps), "num_noise": int(c.num_noise),
                 "antithetic": bool(c.antithetic), "sampler": sampler_protocol(ctx.sampler), "n": r["n"],
                 "seed": seed, "concepts": names}
        details = {"per_concept": dict(zip(names, r["per_concept"])), "stderr": dict(zip(names, r["stderr"])),
                   "mean_log_ratio": dict(zip(names, r["mean_log_ratio"]))}
        return Result(r["value"], proto, details)

    @classmethod
    def scalars(cls, result: dict) -> dict[str, float]:
        out = {"expected_likelihood": result["value"]}
        for k, v in result["per_concept"].items():
            out[f"expected_likelihood/{k}"] = v
        return out
