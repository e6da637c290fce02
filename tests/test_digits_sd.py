"""``model=digits_sd``: a Stable-Diffusion-class pipeline trained on the digits, loaded through
``model.path``'s code; the user's round trip through diffusers' own pipeline with the run's LoRA."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import compose_cfg
from unlearn.config import ConfigError
from unlearn.train import train


def _pipeline(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)


def _images(pipe, prompt, n, steps, seed=0, guidance=3.0):
    g = torch.Generator().manual_seed(seed)
    return pipe([prompt] * n, num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="pt",
                height=16, width=16).images


def test_digits_sd_round_trip_through_the_diffusers_pipeline(tmp_path):
    """The run loads the cached pipeline folder as a local SD copy, writes a LoRA that the folder's own
    ``StableDiffusionPipeline`` loads, and ``fuse_lora`` draws the same images; the summary records
    the folder, the prompts and the shares under the unlearn prompt and its paraphrases."""
    cfg = compose_cfg(["model=digits_sd", "formulation=lu", "method=esd", "method.multiplier=1.0"])
    s = train(cfg, tmp_path)
    path = s["setup"]["model_path"]
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()
    assert s["setup"]["prompts"]["retain"] == ["a handwritten digit"] and s["setup"]["prompts"]["unlearn"] == ["seven"]
    shares = s["metrics"]["prompt_shares"]
    assert shares["seven"]["kind"] == "prompt" and shares["the digit 7"]["kind"] == "paraphrase"
    assert all(0.0 <= v["share"] <= 1.0 for v in shares.values())
    assert "prompt_shares" in s["pretrained_metrics"]

    pipe = _pipeline(path)
    before = _images(pipe, "a handwritten digit", 2, 3)
    pipe.load_lora_weights(str(tmp_path))
    lora = _images(pipe, "a handwritten digit", 2, 3)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the fused weights stay
    fused = _images(pipe, "a handwritten digit", 2, 3)
    assert lora.shape == (2, 3, 16, 16)
    assert (lora - before).abs().max() > 1e-4  # the adapter changes the model
    assert torch.allclose(lora, fused, atol=1e-4)


def test_a_run_starts_from_the_callers_pipeline_object(tmp_path):
    """``unlearn.run(cfg, pipeline=pipe)`` unlearns the components of a pipeline the caller holds: the
    same LoRA as the run that loads the same weights from ``model.path``, and the caller's pipeline is
    untouched until it loads the result."""
    import unlearn
    from safetensors.torch import load_file

    overrides = ["model=digits_sd", "formulation=lu", "method=esd", "method.multiplier=1.0"]
    s = train(compose_cfg(overrides), tmp_path / "from_path")
    pipe = _pipeline(s["setup"]["model_path"])
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    s2 = unlearn.run(compose_cfg(overrides), tmp_path / "from_pipe", pipeline=pipe)
    assert s2["setup"]["model_path"] == "pipeline object (StableDiffusionPipeline)"
    info = json.loads((tmp_path / "from_pipe" / "run_info.json").read_text())["sessions"][-1]
    assert info["pretrained_eval"]["cache"] == "off"  # the caller's weights are outside any cache key
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    a = load_file(tmp_path / "from_path" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "from_pipe" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pipe.load_lora_weights(str(tmp_path / "from_pipe"))
    with pytest.raises(ConfigError, match="pipeline: a DDPMPipeline without vae, text_encoder, tokenizer"):
        from diffusers import DDPMPipeline
        unlearn.run(compose_cfg(overrides), tmp_path / "bad", pipeline=DDPMPipeline(unet=pipe.unet, scheduler=pipe.scheduler))


def test_digits_sd_refuses_a_prompt_that_names_no_digit(tmp_path):
    cfg = compose_cfg(["model=digits_sd", "formulation=lu", "model.prompts.unlearn=[a horse]"])
    with pytest.raises(ConfigError, match=r"model.prompts.unlearn\[0\]='a horse' names no digit"):
        train(cfg, tmp_path)
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("formulation", ["lu", "ru"])
def test_digits_sd_erases_seven_under_the_retain_prompt(tmp_path, formulation):
    """The real pipeline (pretraining cached) and the LU recipe, or RU's distilled into the LoRA: through
    diffusers' own pipeline call with the run's LoRA, the evaluation network finds less than half the
    pretrained pipeline's share of 7s under the retain prompt, and the other digits' shares move little."""
    from unlearn.families.digits_sd import DigitsSD

    cfg = compose_cfg(["model=digits_sd", f"formulation={formulation}", "logger=none", "progress=false"], tiny=False)
    s = train(cfg, tmp_path)
    fam = DigitsSD.__new__(DigitsSD)
    fam.cfg, fam.m = cfg, cfg.model
    net = fam.eval_net()

    def shares(pipe):
        x = torch.cat([_images(pipe, "a handwritten digit", 64, 20, seed=k) for k in range(8)])  # share std ~0.013
        return torch.bincount(net(x).argmax(-1), minlength=10).float() / len(x)

    pipe = _pipeline(s["setup"]["model_path"])
    pre = shares(pipe)
    pipe.load_lora_weights(str(tmp_path))
    post = shares(pipe)
    (tmp_path / "pipeline_shares.json").write_text(json.dumps({"pretrained": pre.tolist(), "unlearned": post.tolist()}))
    assert post[7] < 0.5 * pre[7], (pre.tolist(), post.tolist())
    others = [d for d in range(10) if d != 7]
    assert (post[others] / post[others].sum() - pre[others] / pre[others].sum()).abs().max() < 0.08


@pytest.mark.slow
def test_digits_sd_prompts_preset_erases_seven_under_the_prompts_that_name_it(tmp_path):
    """experiment=digits_sd_prompts (a retain distribution, the seven's captions anchored to the generic
    prompt): through diffusers' pipeline call with the LoRA, fewer than half the pretrained share of 7s
    under the retain prompt, under "seven" and under the paraphrase "number 7" (never used in
    unlearning), while "the digit d" still draws d."""
    from unlearn.families.digits_sd import DigitsSD

    cfg = compose_cfg(["experiment=digits_sd_prompts", "progress=false"], tiny=False)
    s = train(cfg, tmp_path)
    fam = DigitsSD.__new__(DigitsSD)
    fam.cfg, fam.m = cfg, cfg.model
    net = fam.eval_net()

    def shares(pipe, prompt, batches):
        x = torch.cat([_images(pipe, prompt, 64, 20, seed=k) for k in range(batches)])
        return torch.bincount(net(x).argmax(-1), minlength=10).float() / len(x)

    prompts = {"a handwritten digit": 4, "seven": 2, "number 7": 2, "the digit 1": 1, "the digit 9": 1}
    pipe = _pipeline(s["setup"]["model_path"])
    pre = {p: shares(pipe, p, b) for p, b in prompts.items()}
    pipe.load_lora_weights(str(tmp_path))
    post = {p: shares(pipe, p, b) for p, b in prompts.items()}
    for p in ("a handwritten digit", "seven", "number 7"):
        assert post[p][7] < 0.5 * pre[p][7], (p, pre[p].tolist(), post[p].tolist())
    assert post["the digit 1"][1] > 0.9 and post["the digit 9"][9] > 0.9, (post["the digit 1"], post["the digit 9"])
