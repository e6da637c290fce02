"""The bench at the test double's size: our step and the bare diffusers loop on the same settings."""
from __future__ import annotations

import pytest
import torch


def test_bench_case_and_its_bare_loop_at_tiny_size():
    from unlearn.bench import architecture, run_bare, run_ours

    assert architecture("sd14")["unet"]["block_out_channels"] == [320, 640, 1280, 1280]  # SD v1.4's published config
    ours = run_ours("fu_fixed", "tiny", "cpu", "fp32", reps=1)
    bare = run_bare("fu_fixed", "tiny", "cpu", "fp32", reps=1)
    assert ours["s_per_step"] > 0 and ours["dual_s"] > 0 and ours["est_run_s"] > ours["s_per_step"]
    assert ours["peak_mem_bytes"] > 0 and bare["bare_s_per_step"] > 0
    assert ours["recipe"]["dual_steps"] == 60  # the text-to-image FU recipe, extrapolated


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_on_a_gpu():
    from unlearn.bench import run_bare, run_ours

    ours = run_ours("lu_esd", "tiny", "cuda", "fp16", reps=1)
    bare = run_bare("lu_esd", "tiny", "cuda", "fp16", reps=1)
    assert ours["device"].startswith("cuda") and ours["peak_mem_bytes"] > 0 and bare["bare_s_per_step"] > 0
