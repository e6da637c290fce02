"""Regenerate every figure the CPU can make: `python scripts/make_figures.py [--skip-runs] [--only fig4 ...]`.

Runs each experiment preset's sweep (`python train.py -m experiment=NAME`), then aggregates the
run directories into outputs/figures/NAME.{png,pdf,csv}. Figure 1 needs no training.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

import unlearn.config  # noqa: E402,F401  (registers the ${pick:...} resolver)
from unlearn import figures  # noqa: E402

EXPERIMENTS = ("fig4", "ru_tradeoff", "fu_tradeoff", "digits_lu", "digits_fu", "digits_ru", "digits_ru_paper",
               "digits_sd_lu", "digits_sd_ru", "digits_sd_fu", "digits_sd_many", "fig3", "fig5", "fig6")
# the digits sweeps take long on a CPU, and fig3/fig5/fig6 need the real weights and a GPU: ask for them with --only
DEFAULT = ("fig1", "fig4", "ru_tradeoff", "fu_tradeoff")


def preset(name):
    """The preset's composed config with Hydra's own node (its sweep directory comes from configs/sweep/)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}"], return_hydra_config=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--skip-runs", action="store_true", help="only aggregate existing sweep directories")
    ap.add_argument("--only", nargs="*", default=None, help="subset of: fig1 " + " ".join(EXPERIMENTS))
    ap.add_argument("--out", default=str(ROOT / "outputs" / "figures"))
    ap.add_argument("--wandb", action="store_true", help="log each sweep's table and tradeoff plot to W&B (offline)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides passed to every sweep")
    a = ap.parse_args(argv)
    out = Path(a.out)
    todo = a.only or list(DEFAULT)
    t0 = time.time()
    if "fig1" in todo:
        print("[fig1] exact targets (oracle, no training)", flush=True)
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            c = compose("train", overrides=["experiment=fig1", *[o for o in a.overrides if o.startswith("model.")]])
        m = OmegaConf.to_container(c.model, resolve=True)
        figures.figure1(out, m["means"], m["stds"], m["weights"], m["unlearn"], float(c.experiment.unlearned_mass))
    for name in [n for n in EXPERIMENTS if n in todo]:
        p = preset(name)
        sweep_dir = ROOT / str(p.hydra.sweep.dir)
        if not a.skip_runs:
            print(f"[{name}] sweep: python train.py -m experiment={name}  ({time.time() - t0:.0f} s so far)", flush=True)
            r = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", f"experiment={name}", "progress=false",
                                *a.overrides], cwd=ROOT)
            if r.returncode != 0:
                print(f"[{name}] sweep exited with {r.returncode}; aggregating what exists", flush=True)
        y = p.experiment.y
        y = [str(v) for v in y] if OmegaConf.is_list(y) else str(y)
        rows = figures.figure_tradeoff(sweep_dir, out, name, str(p.experiment.title), str(p.experiment.x), y)
        if name == "fig4":
            first = next((d for d in sweep_dir.iterdir() if (d / "config.yaml").exists()), None)
            if first is not None:
                mcfg = OmegaConf.to_container(OmegaConf.load(first / "config.yaml").model, resolve=True)
                figures.density_panels(sweep_dir, rows, out / "fig4_densities", str(p.experiment.title), mcfg)
        if a.wandb:
            import wandb

            run = wandb.init(mode="offline", project="unlearn", group=name, name=f"{name}-tradeoff",
                             dir=str(out))
            cols = ["run", "method", "threshold_factor", "fixed_weight", "x", "y", "status"]
            table = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])
            run.log({f"{name}/table": table,
                     f"{name}/tradeoff": wandb.plot.scatter(table, "x", "y", title=str(p.experiment.title))})
            run.finish()
        n_ok = sum(r["status"] == "completed" for r in rows)
        print(f"[{name}] {n_ok}/{len(rows)} points -> {out / name}.png", flush=True)
    print(f"figures in {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
