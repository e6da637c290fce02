"""Speed and memory at Stable Diffusion scale, beside bare diffusers loops doing the same arithmetic.

    python -m unlearn.bench [--size cpu|sd14|tiny] [--device auto|cpu|cuda] [--dtype fp32|fp16|bf16 ...]

For each case (a formulation and a method) it times one primal step, one dual step (the constraint
estimates) and the sampling of one batch, extrapolates a whole run of the case's recipe from them, and
records the peak memory (the CUDA allocator's peak on a GPU, the peak RSS of the case's own process on
a CPU). SD v1.4's components are built with random weights from their published configurations
(``unlearn/assets/sd14/``): ``size=sd14`` is the full model at 64x64 latents, ``size=cpu`` the same
architecture at a tenth of the width and 8x8 latents, ``size=tiny`` the test double. Each case runs
in its own process. Rows go to ``outputs/bench/bench.json`` and a table is printed.

The bare loops (:mod:`unlearn.bench_bare`) are what a user would write on diffusers and peft without
this framework, at the same settings: ``ratio`` is our step's time over theirs.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

ASSETS = Path(__file__).parent / "assets" / "sd14"
ROOT = Path(__file__).resolve().parent.parent

# name -> (overrides, bare loop or None, the multiplier each constraint gets)
CASES = {
    "lu_constrained": (["formulation=lu", "method=constrained", "formulation.gradient=policy"], "dpok", 0.5),
    "lu_esd": (["formulation=lu", "method=esd", "method.multiplier=1.0"], "esd", 1.0),
    "ru_dual": (["formulation=ru", "method=constrained"], None, 0.1),
    "fu_constrained": (["formulation=fu", "method=constrained"], "denoise", 0.1),
    "fu_fixed": (["formulation=fu", "method=fixed", "method.multiplier=0.1"], "denoise", 0.1),
}
MAX_BATCH = {"tiny": 256, "cpu": 512, "sd14": 16}  # UNet rows per call (the bare loops make one call for all roles)
SCALING = {"lu": "lu_constrained", "ru": "ru_dual"}  # how cost grows with the number of concepts
CONCEPTS = (1, 3, 10)
PROMPTS = ["a golden retriever", "a german shepherd", "a brown dog", "a poodle", "a beagle", "a husky",
           "a corgi", "a dalmatian", "a pug", "a boxer"]


def _json(name: str) -> dict:
    return {k: v for k, v in json.loads((ASSETS / f"{name}.json").read_text()).items() if not k.startswith("_")}


# size -> changes to SD v1.4's UNet, VAE and text encoder ("cpu": a tenth of the width, 8x8 latents,
# a 4-layer text encoder; "sd14": none)
REDUCED = {
    "cpu": ({"block_out_channels": [32, 64, 128, 128], "cross_attention_dim": 128, "sample_size": 8},
            {"block_out_channels": [32, 64, 128, 128], "sample_size": 64},
            {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 4, "num_hidden_layers": 4,
             "projection_dim": 128}),
    "sd14": ({}, {}, {}),
}
CHECKPOINTING = {"tiny": False, "cpu": False, "sd14": True}  # gradient checkpointing where it pays (full size)


def architecture(size: str) -> dict:
    """``model.tiny`` for a size: the components' constructor arguments (random weights)."""
    if size == "tiny":
        return OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / "tiny_sd.yaml").tiny, resolve=True)
    unet, vae, te, sched = _json("unet"), _json("vae"), _json("text_encoder"), _json("scheduler")
    te.update(vocab_size=578, bos_token_id=576, eos_token_id=577, pad_token_id=577)  # the offline tokenizer's ids
    if size not in REDUCED:
        raise SystemExit(f"error: --size must be one of ['tiny', *{list(REDUCED)}] (got {size!r})")
    for part, changes in zip((unet, vae, te), REDUCED[size]):
        part.update(changes)
    sched = {k: sched[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")}
    return {"seed": 0, "unet": unet, "vae": vae, "text_encoder": te, "scheduler": sched}


def case_config(case: str, size: str, device: str, dtype: str, concepts: int | None = None,
                batch: int | None = None, overrides=()):
    """The composed config of a case: SD v1.4's recipe (``model=sd14`` and its tuning) on the size's components."""
    from .api import compose

    extra = [f"model.precision={dtype}", f"model.device={device}", "logger=none", "progress=false",
             f"model.max_batch={MAX_BATCH[size]}"]
    cfg = compose(["model=sd14", *CASES[case][0], *extra, *overrides])
    with open_dict(cfg):
        cfg.model.tiny = architecture(size)
        cfg.model.name = f"bench_{size}"
        cfg.model.gradient_checkpointing = CHECKPOINTING[size]
        if concepts is not None:
            cfg.model.prompts.unlearn = PROMPTS[:concepts]
        if batch is not None:
            cfg.formulation.primal_batch_size = batch
            if "batch_size" in cfg.formulation:  # FU's estimates use fixed draws of its forget set
                cfg.formulation.batch_size = batch
    return cfg


class Timer:
    """Medians over at least ``reps`` calls and about ``min_s`` seconds of calls (at most 20), after one
    warm-up call (one-off draws, kernels, allocator): on shared cores the median resists the odd slow
    call that a mean would carry."""

    def __init__(self, device: torch.device, min_s: float = 3.0):
        self.cuda = device.type == "cuda"
        self.min_s = min_s

    def once(self, fn) -> float:
        """Seconds of one call (the device synchronised on both sides)."""
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def _calls(self, warm: float, reps: int) -> int:
        return max(reps, min(20, int(self.min_s / max(warm, 1e-3))))

    def __call__(self, fn, reps: int) -> float:
        warm = self.once(fn)
        return statistics.median([self.once(fn) for _ in range(self._calls(warm, max(1, reps)))])

    def paired(self, fn_a, fn_b, reps: int) -> tuple[float, float]:
        """Medians of ``fn_a`` and ``fn_b`` called alternately (as many pairs as :meth:`__call__` makes calls)."""
        warm = (self.once(fn_a) + self.once(fn_b)) / 2
        pairs = [(self.once(fn_a), self.once(fn_b)) for _ in range(self._calls(warm, max(2, reps)))]
        return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: kB


def run_case(case: str, size: str, device: str, dtype: str, reps: int, concepts=None, batch=None,
             overrides=(), step_only: bool = False, bare: bool = True, min_s: float = 3.0) -> dict:
    """One case in this process: our primal step, dual step and sampling, the run they add up to and
    the peak memory; then, where the case has one, the bare loop built beside it and the two steps
    timed alternately (``s_per_step``, ``bare_s_per_step``, ``ratio``), so that drifts of a shared
    machine fall on both. ``step_only`` (the scaling rows) times the case's own step only: the
    primal step, or RU's estimate."""
    from .api import build

    torch.manual_seed(0)
    cfg = case_config(case, size, device, dtype, concepts, batch, overrides)
    setup, sampler, f, mu, gen = build(cfg)
    dev = next(setup.model.parameters()).device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    m = f.project(torch.full((f.num_constraints,), CASES[case][2]))  # feasible (RU: the multipliers sum below 1)
    timer = Timer(dev, min_s)
    pilot = 0.0
    if hasattr(f, "timestep_proposal"):  # LU's one-off timestep-proposal pilot (likelihood_pilot > 0), on its own
        t0 = time.perf_counter()
        f.timestep_proposal()
        pilot = time.perf_counter() - t0
    step = lambda: f.primal_step(m)  # noqa: E731 (formulations with a primal step)
    paired = bare and bool(CASES[case][1]) and f.has_primal  # the primal step is timed beside the bare loop below
    if paired:
        step()  # before the peak memory is read: it includes a primal step's
    primal = timer(step, reps) if f.has_primal and not paired else 0.0
    dual = timer(lambda: f.estimate(m), reps) if not (step_only and f.has_primal) else None
    f_cfg = cfg.formulation
    n = int(f_cfg.batch_size if "batch_size" in f_cfg else f_cfg.primal_batch_size)
    sample = None if step_only else timer(lambda: sampler.sample(setup.model, n, gen, cond=setup.cond), max(1, reps // 2))
    peak = _peak(dev)  # ours alone: read before the bare loop is built
    bare_s = None
    if paired:
        from . import bench_bare

        torch.manual_seed(0)
        loop = bench_bare.BareLoop(case_config(case, size, device, dtype, concepts, batch), CASES[case][1],
                                   CASES[case][2])
        primal, bare_s = timer.paired(step, loop.step, reps)
    k, steps = int(cfg.train.primal_steps_per_dual), int(cfg.train.dual_steps)
    est = None if step_only else pilot + steps * (k * primal + dual) + sample
    return {"name": case, "formulation": f.name, "method": str(cfg.method.name), "device": str(dev), "dtype": dtype,
            "size": size, "s_per_step": primal if f.has_primal else dual, "primal_s": primal, "dual_s": dual,
            "sample_s": sample, "pilot_s": pilot, "est_run_s": est, "peak_mem_bytes": peak,
            "concepts": f.num_constraints, "batch": {"primal": int(f_cfg.primal_batch_size), "estimate": n},
            "recipe": {"dual_steps": steps, "primal_steps_per_dual": k, "sampler_steps": int(cfg.model.sampler.num_steps),
                       "guidance_scale": float(cfg.model.guidance_scale),
                       "likelihood_pilot": int(f_cfg.likelihood_pilot) if "likelihood_pilot" in f_cfg else 0},
            "resolution": int(cfg.model.tiny.unet.sample_size) * 8, "bare_s_per_step": bare_s,
            "ratio": primal / bare_s if bare_s else None}


def _subprocess(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-m", "unlearn.bench", *args], capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": tail}
    return json.loads(r.stdout.strip().splitlines()[-1])


def versions() -> dict:
    import diffusers
    import peft
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "transformers": transformers.__version__, "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_all(size: str, device: str, dtypes: list[str], reps: int, scaling: bool, cases=None, sets=()) -> list[dict]:
    rows = []
    common = ["--size", size, "--device", device, "--reps", str(reps), *[f"--set={o}" for o in sets]]
    for dtype in dtypes:
        for case in cases or CASES:
            row = _subprocess(["--case", case, "--dtype", dtype, *common])
            row.setdefault("name", case)
            row.setdefault("ratio", None)
            row.setdefault("bare_s_per_step", None)
            rows.append(row)
            print(_line(row), flush=True)
        if not scaling:
            continue
        for form, case in SCALING.items():
            for b in (2, 4):
                for k in CONCEPTS:
                    row = _subprocess(["--case", case, "--dtype", dtype, "--concepts", str(k), "--batch", str(b),
                                       "--step-only", *common])
                    row.update(name=f"{case}_k{k}_b{b}", scaling=True)
                    rows.append(row)
                    print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    if "error" in r:
        return f"{r['name']:<26} error: {r['error']}"
    ratio = f"{r['ratio']:.2f}" if r.get("ratio") else "-"
    bare = f"{r['bare_s_per_step']:.3f}" if r.get("bare_s_per_step") else "-"
    num = lambda v, w, p: f"{v:>{w}.{p}f}" if v is not None else f"{'-':>{w}}"
    return (f"{r['name']:<26}{r['dtype']:>5}{r['s_per_step']:>9.3f}{bare:>9}{ratio:>7}{num(r['dual_s'], 9, 3)}"
            f"{num(r['sample_s'], 9, 3)}{num(r['est_run_s'], 10, 0)}{r['peak_mem_bytes'] / 2**30:>8.2f}")


HEADER = (f"{'case':<26}{'dtype':>5}{'step s':>9}{'bare s':>9}{'ratio':>7}{'dual s':>9}{'sample s':>9}"
          f"{'run s':>10}{'peak GB':>8}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="cpu", help="tiny | cpu | sd14")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--dtype", nargs="*", default=None, help="fp32 | fp16 | bf16 (default: fp32 on a CPU, fp16 bf16 on a GPU)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="outputs/bench/bench.json")
    ap.add_argument("--cases", nargs="*", default=None, help=" ".join(CASES))
    ap.add_argument("--no-scaling", action="store_true", help="skip the 1/3/10-concept rows")
    ap.add_argument("--set", action="append", default=[], help="a config override for our side, e.g. model.batch_roles=false")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case in this process (JSON on stdout)
    ap.add_argument("--concepts", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--step-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and a.device != "cpu"
    device = "cuda" if cuda else "cpu"
    if a.case is not None:
        if a.case not in CASES:
            print(f"error: --case must be one of {list(CASES)} (got {a.case!r})", file=sys.stderr)
            return 2
        dtype = (a.dtype or ["fp32"])[0]
        row = run_case(a.case, a.size, device, dtype, a.reps, a.concepts, a.batch, a.set, a.step_only,
                       bare=not a.step_only)
        print(json.dumps(row))
        return 0
    unknown = [c for c in (a.cases or []) if c not in CASES]
    if unknown:
        print(f"error: --cases accepts {list(CASES)} (got {unknown})", file=sys.stderr)
        return 2
    dtypes = a.dtype or (["fp16", "bf16"] if cuda else ["fp32"])
    print(f"bench size={a.size} device={device} dtypes={dtypes}\n{HEADER}", flush=True)
    t0 = time.time()
    rows = run_all(a.size, device, dtypes, a.reps, not a.no_scaling, a.cases, a.set)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"versions": versions(), "size": a.size, "device": device, "overrides": a.set, "rows": rows,
                               "wall_s": time.time() - t0}, indent=1))
    print(f"{len(rows)} rows -> {out} ({time.time() - t0:.0f} s)")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
