"""Sweep aggregation and the paper's GMM figures, from local run directories only.

A sweep directory holds one sub-directory per job with ``config.yaml`` and ``summary.json``
(``status`` "completed", "constraints_violated", "unreliable", "diverged" or "failed"). :func:`collect`
turns them into rows, :func:`write_csv` writes the table next to the figure, :func:`plot_tradeoff` draws
constrained vs baseline, rings the points that ended outside their constraints or with unreliable
estimates, and marks the points that have no result (diverged: purple, failed: red).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import yaml

from .checkpoint import FINISHED

LABELS = {
    "expected_likelihood": "expected unlearning likelihood E_p[q/p_pre] (estimated; exactly 1 for the pretrained model)",
    "kl_to_retained": "KL(model || retained modes) [nats]",
    "kl_to_pretrained": "KL(model || pretrained) [nats]",
    "unlearned_mass": "share of samples in unlearned component(s) (fraction)",
    "min_kl_to_concepts": "min_i KL(model || q_i) (estimated) [nats]",
    "kl_to_target": "KL(model || exact target) [nats]",
    "kl_retained_part": "KL(model || retained modes), both restricted to the retained cells [nats]",
    "kid": "KID to the retain set (lower: better retention)",
    "max_sscd": "max copy-detection similarity over forget images (lower: more forgotten)",
    "clip": "max concept score over the unlearning prompts (CLIP, or 100 p(digit))",
    "unlearned_share": "share of samples classified as an unlearned digit",
    "retained_share_tv": "other classes' proportions: TV to pretrained",
}
STYLE = {"constrained": dict(color="tab:blue", marker="o", label="constrained (threshold factor b)"),
         "baseline": dict(color="tab:orange", marker="s", label="baseline (fixed weight w)"),
         "fixed": dict(color="tab:green", marker="^", label="fixed weights (w)"),
         "esd": dict(color="tab:red", marker="v", label="ESD-style target (eta w)")}  # one style per method


def _unlearned_classes(summary: dict) -> list:
    """The class labels a run unlearned, in constraint order: recorded by the digits metrics, else the
    class-conditional setup's, else (digits_sd runs before they were recorded) the digits its prompts name."""
    setup = summary.get("setup") or {}
    classes = (summary.get("metrics") or {}).get("unlearned_classes") or (setup.get("classes") or {}).get("unlearn")
    if not classes and (setup.get("prompts") or {}).get("unlearn"):
        from .models.digits_sd import digit_of

        classes = [digit_of(p) for p in setup["prompts"]["unlearn"]]
    return list(classes or [])


def retained_share_tv(summary: dict):
    """Total variation between the retained classes' proportions (class shares renormalised over
    the classes not unlearned) of the unlearned and of the pretrained model's samples: 0 when the
    other classes keep their share exactly, whatever happened to the unlearned ones."""
    share = (summary.get("metrics") or {}).get("class_share")
    pre = (summary.get("pretrained_metrics") or {}).get("class_share")
    unlearn = set(d for d in _unlearned_classes(summary) if d is not None)
    if not share or not pre or len(share) != len(pre):
        return None
    keep = [i for i in range(len(share)) if i not in unlearn]
    a, b = sum(share[i] for i in keep), sum(pre[i] for i in keep)
    if a <= 0 or b <= 0:
        return None
    return 0.5 * sum(abs(share[i] / a - pre[i] / b) for i in keep)


def _metric(summary: dict, key: str):
    if key == "retained_share_tv":
        return retained_share_tv(summary)
    if key == "min_kl_to_concepts":  # a capped RU run's constraints are capped: its uncapped KLs are in "extra"
        vals = (summary.get("extra") or {}).get("kl_to_concepts") or [c["value"] for c in summary.get("constraints", [])]
        return min(vals) if vals else None
    v = (summary.get("metrics") or {}).get(key)
    return float(v) if isinstance(v, (int, float)) else None


def collect(sweep_dir: Path, x: str, y: str) -> list[dict]:
    rows = []
    for d in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir()):
        sfile, cfile = d / "summary.json", d / "config.yaml"
        if not sfile.exists() and not cfile.exists() and not (d / ".hydra").exists():
            continue
        cfg = {}
        for c in (cfile, d / ".hydra" / "config.yaml"):
            if c.exists():
                cfg = yaml.safe_load(c.read_text()) or {}
                break
        s = json.loads(sfile.read_text()) if sfile.exists() else {"status": "failed", "error": "no summary.json"}
        method = s.get("method") or (cfg.get("method") or {}).get("name")
        factor = s.get("threshold_factor", (cfg.get("formulation") or {}).get("threshold_factor"))
        weight = (cfg.get("method") or {}).get("multiplier")
        learnable = _learnable(method)  # dual ascent reads the threshold factor, fixed weights their multiplier
        row = {"run": d.name, "status": s.get("status", "completed"), "method": method,
               "formulation": s.get("formulation"), "threshold_factor": factor if learnable is True else None,
               "fixed_weight": weight if learnable is False else None,
               "multipliers": json.dumps(s.get("multipliers")) if "multipliers" in s else "",
               "x_metric": x, "y_metric": y, "x": None, "y": None, "error": s.get("error", "")}
        if row["status"] == "diverged":
            d = s.get("diverged") or {}
            row["error"] = f"diverged at dual step {d.get('step')}: {d.get('quantity')} = {d.get('value')}"
            row.update(diverged_step=d.get("step"), diverged_quantity=d.get("quantity"),
                       checkpoint_step=s.get("checkpoint_step"))
        if row["status"] in FINISHED:
            row["x"], row["y"] = _metric(s, x), _metric(s, y)
            for k in ("unlearned_mass", "expected_likelihood", "kl_to_pretrained", "kl_to_retained", "kl_to_target",
                      "kl_retained_part"):
                row[k] = _metric(s, k)
            for k in ("unlearned_share", "retained_share_tv"):  # class-labelled models (digits) only
                v = _metric(s, k)
                if v is not None:
                    row[k] = v
            row["constraints_satisfied"] = all(c.get("satisfied") for c in s.get("constraints", []))
            row["wall_time_s"] = _wall_time(d)
        rows.append(row)
    return rows


def _learnable(method) -> bool | None:
    """Whether the registered method ``method`` moves its multipliers (``None``: no such method)."""
    from .methods import METHODS

    cls = METHODS.get(str(method))
    return None if cls is None else bool(cls.learnable)


def _wall_time(run_dir: Path):
    """Wall-clock seconds over every session of the run (``run_info.json``), if recorded."""
    try:
        info = json.loads((run_dir / "run_info.json").read_text())
        return round(sum(float(x.get("wall_time_s") or 0.0) for x in info.get("sessions", [])), 2)
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _point_label(r: dict) -> str:
    if r.get("threshold_factor") is not None:  # set for dual ascent only (collect)
        return f"b={r['threshold_factor']:g}"
    if r.get("fixed_weight") is not None:  # set for fixed weights only
        return f"w={r['fixed_weight']:g}"
    return str(r["run"])


def write_csv(rows: list[dict], path: Path):
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plot_tradeoff(rows: list[dict], title: str, path_stem: Path, ax=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
    x_metric, y_metric = rows[0]["x_metric"], rows[0]["y_metric"]
    missing = []
    for method, st in STYLE.items():
        pts = [r for r in rows if r["method"] == method]
        ok = sorted([r for r in pts if r["status"] in FINISHED and r["x"] is not None and r["y"] is not None],
                    key=lambda r: r["x"])
        missing += [r for r in pts if r not in ok]
        if ok:
            ax.plot([r["x"] for r in ok], [r["y"] for r in ok], linestyle="-", alpha=0.6, **st)
            for r in ok:
                ax.annotate(_point_label(r), (r["x"], r["y"]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=st["color"])
            flagged = [r for r in ok if r["status"] != "completed"]
            if flagged:  # a result, but outside its constraints or with estimates that did not hold
                ax.plot([r["x"] for r in flagged], [r["y"] for r in flagged], linestyle="none", marker="o",
                        markersize=11, markerfacecolor="none", color="black",
                        label=f"{method}: outside constraints / unreliable ({len(flagged)})")
    # points without a result are marked, not dropped: diverged runs in purple, failed ones in red
    diverged = [r for r in missing if r["status"] == "diverged"]
    failed = [r for r in missing if r["status"] != "diverged"]
    lines = []
    if diverged:
        lines.append(("diverged (no result): " + ", ".join(
            f"{r['method']} {_point_label(r)} (run {r['run']}) at step {r.get('diverged_step')}" for r in diverged), "tab:purple"))
        ax.plot([], [], linestyle="none", marker="X", color="tab:purple", label=f"diverged ({len(diverged)})")
    if failed:
        lines.append(("missing (failed): " + ", ".join(r["run"] for r in failed), "red"))
        ax.plot([], [], linestyle="none", marker="x", color="red", label=f"failed ({len(failed)})")
    for i, (text, color) in enumerate(lines):
        ax.text(0.01, 0.01 + 0.05 * i, text, transform=ax.transAxes, fontsize=7, color=color, va="bottom")
    ax.set_xlabel(LABELS.get(x_metric, x_metric))
    ax.set_ylabel(LABELS.get(y_metric, y_metric))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if own:
        fig.tight_layout()
        for ext in ("png", "pdf"):
            fig.savefig(f"{path_stem}.{ext}", dpi=130)
        plt.close(fig)


def figure_tradeoff(sweep_dir: Path, out_dir: Path, name: str, title: str, x: str, y) -> list[dict]:
    """One panel per y metric (``y``: a name or a list of names) against ``x``; CSV of every point."""
    ys = [y] if isinstance(y, str) else list(y)
    per_y = [collect(sweep_dir, x, yy) for yy in ys]
    rows = per_y[0]
    if not rows:
        raise FileNotFoundError(f"no runs found in {sweep_dir}")
    for yy, other in zip(ys[1:], per_y[1:]):
        for r, o in zip(rows, other):
            r[yy] = o["y"]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / f"{name}.csv")
    if len(ys) == 1:
        plot_tradeoff(rows, title, out_dir / name)
    else:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(ys), figsize=(6.0 * len(ys), 4.8))
        for ax, pr in zip(axes, per_y):
            plot_tradeoff(pr, "", None, ax=ax)
        fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        for ext in ("png", "pdf"):
            fig.savefig(out_dir / f"{name}.{ext}", dpi=130)
        plt.close(fig)
    multiplier_trajectories(sweep_dir, out_dir / f"{name}_multipliers.png", title)
    concept_table(sweep_dir, out_dir / f"{name}_concepts.csv")
    return rows


def concept_table(sweep_dir: Path, path: Path) -> list[dict] | None:
    """Per concept of each finished run: its constraint value, threshold and multiplier and, for
    class-labelled models, its share of the samples before and after (CSV; None without runs)."""
    rows = []
    for d in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and (p / "summary.json").exists()):
        s = json.loads((d / "summary.json").read_text())
        if s.get("status") not in FINISHED:
            continue
        share = (s.get("metrics") or {}).get("class_share")
        pre = (s.get("pretrained_metrics") or {}).get("class_share")
        digits = _unlearned_classes(s)
        learnable = _learnable(s.get("method"))  # a fixed-weight run's threshold factor is not what it used
        for i, (c, mu) in enumerate(zip(s.get("constraints", []), s.get("multipliers", []))):
            row = {"run": d.name, "method": s.get("method"),
                   "threshold_factor": s.get("threshold_factor") if learnable is not False else None,
                   "concept": c["name"], "value": c["value"], "threshold": c["threshold"],
                   "pretrained": c["pretrained"], "satisfied": c["satisfied"], "multiplier": mu,
                   "kl_to_pretrained": _metric(s, "kl_to_pretrained"), "retained_share_tv": retained_share_tv(s)}
            if share and pre and digits and i < len(digits) and digits[i] is not None:
                row.update(share=share[digits[i]], pretrained_share=pre[digits[i]])
            rows.append(row)
    if rows:
        write_csv(rows, path)
    return rows or None


def multiplier_trajectories(sweep_dir: Path, path: Path, title: str = "") -> Path | None:
    """Each constrained run's multipliers over the dual steps (from metrics.jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for d in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir()):
        f = d / "metrics.jsonl"
        if d.name.startswith("constrained") and f.exists() and f.read_text().strip():
            recs = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
            runs.append((d.name, recs))
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs) + 1, 3.2), squeeze=False)
    for ax, (name, recs) in zip(axes[0], runs):
        for k in recs[0]["multipliers"]:
            ax.plot([r["step"] for r in recs], [r["multipliers"][k] for r in recs], label=k[:24])
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("dual step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("multiplier")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{title}: multipliers over training", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure1(out_dir: Path, means=((-2, 0), (2, 0), (0, 3)), stds=(0.5, 0.5, 0.5), weights=(1, 1, 1), unlearn=(2,),
            mass: float = 0.05):
    """Paper Figure 1: exact RU, FU and LU targets at comparable strength (the same mass left on
    the unlearned component), from the oracle; no training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from scipy.optimize import brentq

    from .models.gmm import GaussianMixture, GMMOracle

    g = GaussianMixture([list(m) for m in means], list(stds), list(weights))
    o = GMMOracle(g, list(unlearn))
    base = o.grid(3.0)

    def target_mass(form, v):
        _, logp = o.target_log_density(form, [v], base)
        near = g.nearest_component(base.points).numpy()
        p = torch.exp(logp).numpy() * base.dv
        return float(p[np.isin(near, list(unlearn))].sum())

    upper = {"ru": 0.95, "lu": 50.0, "fu": float(g.weights[unlearn[0]]) * (1 - 1e-9)}
    rows, panels = [], [("pretrained", None, base.normalize_log(g.log_prob(base.points)))]
    retained = g.subset([k for k in range(g.num_components) if k not in unlearn])
    lr = base.normalize_log(retained.log_prob(base.points))
    for form in ("ru", "fu", "lu"):
        v = brentq(lambda z: target_mass(form, z) - mass, 0.0, upper[form], xtol=1e-8)
        _, logp = o.target_log_density(form, [v], base)
        panels.append((form.upper(), v, logp))
        rows.append({"formulation": form, "multiplier": v, "unlearned_mass": target_mass(form, v),
                     "kl_to_retained": base.kl(logp, lr),
                     "kl_to_pretrained": base.kl(logp, base.normalize_log(g.log_prob(base.points))),
                     "expected_likelihood": float(base.expect(logp, o.likelihood(base.points))[0])})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "fig1.csv")
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.6))
    ext = [base.axes[0][0], base.axes[0][-1], base.axes[1][0], base.axes[1][-1]]
    for k, (ax, (name, v, logp)) in enumerate(zip(axes, panels)):
        ax.imshow(torch.exp(logp).reshape(base.shape).T.numpy(), origin="lower", extent=ext, cmap="viridis")
        for i in unlearn:
            ax.scatter(*g.means[i].numpy(), marker="x", c="red", s=60)
        t = name if v is None else f"{name} target (multiplier {v:.3g})"
        if v is not None:  # panels after the first follow the rows
            r = rows[k - 1]
            t += f"\nKL to retained modes {r['kl_to_retained']:.2f} nats"
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("x_1")
        ax.set_ylabel("x_2")
        ax.set_xlim(-7, 7)
        ax.set_ylim(-6, 8)
    fig.suptitle(f"Figure 1: exact unlearning targets, {mass:.0%} of the mass left on the unlearned "
                 f"component (red x)")
    fig.tight_layout()
    for e in ("png", "pdf"):
        fig.savefig(out_dir / f"fig1.{e}", dpi=120)
    plt.close(fig)
    return rows


def density_panels(sweep_dir: Path, rows: list[dict], out_stem: Path, title: str, model_cfg: dict):
    """Figure 4's left panels: pretrained / baseline / constrained densities (KDE of samples.npy),
    the constrained run with the median threshold and the baseline run closest to it in x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from .models.gmm import GaussianMixture, GMMOracle
    from .models.gmm_setup import GMMEvaluator

    done = [r for r in rows if r["status"] in FINISHED and r["x"] is not None]
    cons = sorted([r for r in done if r.get("threshold_factor") is not None], key=lambda r: r["x"])  # dual ascent
    base = [r for r in done if r.get("fixed_weight") is not None]  # fixed weights
    if not cons or not base:
        return None
    c = cons[len(cons) // 2]
    b = min(base, key=lambda r: abs(math.log(max(r["x"], 1e-9)) - math.log(max(c["x"], 1e-9))))
    g = GaussianMixture(model_cfg["means"], model_cfg["stds"], model_cfg["weights"])
    o = GMMOracle(g, model_cfg["unlearn"])
    ev = GMMEvaluator(g, model_cfg["unlearn"], o)
    pre = np.load(Path(sweep_dir) / c["run"] / "pretrained_samples.npy")
    sc = np.load(Path(sweep_dir) / c["run"] / "samples.npy")
    sb = np.load(Path(sweep_dir) / b["run"] / "samples.npy")
    grid = ev.metric_grid(np.concatenate([pre, sc, sb]), None, None)
    panels = [("pretrained", pre),
              (f"{b['method']} w={b['fixed_weight']:g}\nE[l]={b['x']:.3f}, KL ret={b['y']:.2f}", sb),
              (f"constrained b={c['threshold_factor']:g}\nE[l]={c['x']:.3f}, KL ret={c['y']:.2f}", sc)]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6))
    ext = [grid.axes[0][0], grid.axes[0][-1], grid.axes[1][0], grid.axes[1][-1]]
    for ax, (name, s) in zip(axes, panels):
        logp = grid.kde_log_density(s, ev.bandwidth)
        ax.imshow(torch.exp(logp).reshape(grid.shape).T.numpy(), origin="lower", extent=ext, cmap="viridis")
        for i in model_cfg["unlearn"]:
            ax.scatter(*g.means[i].numpy(), marker="x", c="red", s=60)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("x_1")
        ax.set_ylabel("x_2")
    fig.suptitle(title)
    fig.tight_layout()
    for e in ("png", "pdf"):
        fig.savefig(f"{out_stem}.{e}", dpi=120)
    plt.close(fig)
    return c, b
