"""Judge a digits_sd run's LoRA through diffusers' own pipeline call, as a user would load it.

    python scripts/pipeline_shares.py RUN_DIR ["a handwritten digit" "seven" ...] [--n 256] [--eta 0]

Loads ``StableDiffusionPipeline.from_pretrained(summary.setup.model_path)``, samples each prompt
(20 DDIM steps, the run's guidance scale, seeds 0..), classifies the images with the digits
evaluation network, then does the same after ``pipe.load_lora_weights(RUN_DIR)``; prints the share
of each digit before and after as JSON (the slow test in tests/test_digits_sd.py checks the same).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def shares(pipe, net, prompt: str, n: int, guidance: float, eta: float, batch: int = 64) -> list[float]:
    xs = []
    for k in range(0, n, batch):
        g = torch.Generator().manual_seed(k // batch)
        xs.append(pipe([prompt] * min(batch, n - k), num_inference_steps=20, guidance_scale=guidance, eta=eta,
                       generator=g, output_type="pt", height=16, width=16).images)
    pred = net(torch.cat(xs)).argmax(-1)
    return [round(float(v), 4) for v in torch.bincount(pred, minlength=10).float() / len(pred)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("prompts", nargs="*", default=["a handwritten digit"])
    ap.add_argument("--n", type=int, default=256, help="samples per prompt")
    ap.add_argument("--eta", type=float, default=0.0, help="DDIM eta of the pipeline call (diffusers' default 0)")
    a = ap.parse_args(argv)
    run = Path(a.run_dir)
    if not (run / "summary.json").exists() or not (run / "pytorch_lora_weights.safetensors").exists():
        print(f"error: run_dir={str(run)!r} holds no summary.json and pytorch_lora_weights.safetensors; accepted: "
              f"the directory of a finished digits_sd run", file=sys.stderr)
        return 2
    from diffusers import StableDiffusionPipeline

    import unlearn
    from unlearn.families.digits_sd import DigitsSD

    s = json.loads((run / "summary.json").read_text())
    cfg = unlearn.compose(["model=digits_sd"])
    fam = DigitsSD.__new__(DigitsSD)
    fam.cfg, fam.m = cfg, cfg.model
    net = fam.eval_net()
    g = float(s["setup"]["guidance_scale"])  # the run's own sampling guidance
    pipe = StableDiffusionPipeline.from_pretrained(s["setup"]["model_path"], safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = {p: {"pretrained": shares(pipe, net, p, a.n, g, a.eta)} for p in a.prompts}
    pipe.load_lora_weights(str(run))
    for p in a.prompts:
        out[p]["unlearned"] = shares(pipe, net, p, a.n, g, a.eta)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
