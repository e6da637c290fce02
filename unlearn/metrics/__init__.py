"""Evaluation metrics for image diffusion models, with their protocols recorded.

Metrics (paper section 4, formulas.md section 3):

* ``kid`` - Kernel Inception Distance (torchmetrics) between the model's images and a reference
  set (the LU retain set, or pretrained samples); torch-fidelity's InceptionV3 or any feature
  module. Lower is better.
* ``sscd`` - "max SSCD" for data unlearning: forget images noised to ``t``, denoised by the
  model, compared with the originals by the SSCD copy-detection descriptor. Lower means more
  forgotten (about 0.4 or less looked like complete unlearning in the paper).
* ``clip`` - CLIP score ``100 * max(cos, 0)`` (open_clip) of the model's images against the
  unlearning prompts; the max over prompts of the mean over images.
* ``kl`` - pathwise ``KL(P_model || P_pre)`` (Lemma 3).
* ``likelihood`` - expected likelihood ``E_model[q_i / p_pre]`` of each unlearning concept
  (Lemma 2), and the mean log-ratio.

Conventions: images are float ``(N, 3, H, W)`` tensors in ``[0, 1]``; model data live in the
model's space, reached with ``encode`` (default ``2x - 1``) and left with ``decode`` (default
``(x + 1) / 2`` clamped; for latent models, the VAE).

How the training loop uses it::

    from unlearn.metrics import EvalContext, MetricSuite, sample_images

    suite = MetricSuite.from_config(cfg.metrics, image_model=True)
    suite.check_available()          # before training: loads weights, warns once per missing
                                     # metric; metrics.strict=true -> ConfigError
    ...
    if suite.due(step, final=last):
        ctx = EvalContext.from_setup(setup, sampler, step=step,
                                     images=sample_images(setup.model, sampler, cfg.metrics.num_images, ...),
                                     reference_images=retain_images, reference_name="retain set",
                                     forget_images=..., prompts=[...])
        results = suite.evaluate(ctx)       # {metric: {"status", "value", ..., "protocol"}}
        log(MetricSuite.scalars(results))   # flat numbers for metrics.jsonl / W&B
        suite.save_images(run_dir / "eval", prefix=f"step{step}_")
        summary["metrics_protocol"] = {k: r.get("protocol") for k, r in results.items()}

Each ``ok`` result carries a ``protocol`` dict (feature model, weight file and its SHA-256,
library versions, image sizes, preprocessing, numbers of samples, subset size, seeds, timestep,
sampler) and its short hash ``protocol["id"]``: equal ids mean comparable numbers. A metric
whose weights are not available is ``{"status": "missing", "reason": ...}`` - never a 0.

Metrics are registered classes (:class:`Metric`, :mod:`unlearn.metrics.base`): adding one is a
module with ``class X(Metric, name="x")`` and its block in ``configs/metrics/default.yaml``
(docs/metrics.md, "Adding a metric"). ``MetricSuite.from_config(..., given={"x": obj})`` (or the
keywords ``kid_feature=``, ``sscd_descriptor=``, ``clip_scorer=``) hands loaded objects in code.

Retain sets (paper appendix E.1): :func:`retain_mask` / :meth:`MetricSuite.retain_set` keep
pretrained samples whose unlearn-concept score (likelihood ratio from
:func:`concept_likelihood`, exponentiated, or CLIP score) is below ``factor * mean``.
"""
from .base import Checks, Metric, Result, Skip, Weights, metric_class, register, registered, unregister
from .clip import CLIPScorer, clip_score_matrix, load_clip
from .context import EvalContext
from .divergence import concept_likelihood, expected_likelihood, kl_to_pretrained
from .images import check_images, sample_images, save_image_grid
from .kid import InceptionFeatures, compute_kid, retain_mask, retain_set
from .sscd import SSCDPreprocess, denoise_from, denoising_sampler, load_descriptor, pixel_decode, pixel_encode, sscd_protocol
from .suite import (DEFAULTS, IMAGE_METRICS, NAMES, MetricSuite, metric_names, metrics_config, protocol_id,
                    validate_metrics_config)
from .weights import WeightsUnavailable, reset_warnings

__all__ = [
    "CLIPScorer", "clip_score_matrix", "load_clip", "concept_likelihood", "expected_likelihood", "kl_to_pretrained",
    "check_images", "sample_images", "save_image_grid", "InceptionFeatures", "compute_kid", "retain_mask",
    "retain_set", "SSCDPreprocess", "denoise_from", "denoising_sampler", "load_descriptor", "pixel_decode",
    "pixel_encode", "sscd_protocol", "DEFAULTS", "NAMES", "EvalContext", "MetricSuite", "metrics_config",
    "protocol_id", "WeightsUnavailable", "reset_warnings", "Checks", "Metric", "Result", "Skip", "Weights",
    "metric_class", "register", "registered", "unregister", "IMAGE_METRICS", "metric_names", "validate_metrics_config",
]
