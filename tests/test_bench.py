"""The bench at the test double's size: our step and the bare diffusers loop on the same settings."""
from __future__ import annotations

import pytest
import torch


def test_bench_case_and_its_bare_loop_at_tiny_size():
    from unlearn.bench import architecture, run_case

    assert architecture("sd14")["unet"]["block_out_channels"] == [320, 640, 1280, 1280]  # SD v1.4's published config
    row = run_case("fu_fixed", "tiny", "cpu", "fp32", reps=1, min_s=0)
    assert row["s_per_step"] > 0 and row["dual_s"] > 0 and row["est_run_s"] > row["s_per_step"]
    assert row["peak_mem_bytes"] > 0 and row["bare_s_per_step"] > 0
    assert row["ratio"] == pytest.approx(row["s_per_step"] / row["bare_s_per_step"])
    assert row["recipe"]["dual_steps"] == 60  # the text-to-image FU recipe, extrapolated


def test_scaling_row_times_the_step_alone():
    from unlearn.bench import run_case

    row = run_case("ru_dual", "tiny", "cpu", "fp32", reps=1, concepts=3, batch=2, step_only=True, min_s=0)
    assert row["concepts"] == 3 and row["batch"]["estimate"] == 2 and row["s_per_step"] > 0
    assert row["sample_s"] is None and row["est_run_s"] is None and row["ratio"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_on_a_gpu():
    from unlearn.bench import run_case

    row = run_case("lu_esd", "tiny", "cuda", "fp16", reps=1, min_s=0)
    assert row["device"].startswith("cuda") and row["peak_mem_bytes"] > 0 and row["bare_s_per_step"] > 0
