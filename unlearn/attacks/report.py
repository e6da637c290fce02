"""The robustness table and figure of several runs' attack records (``run_dir/attacks/*.json``):

    python -m unlearn.attacks.report OUT_STEM RUN_DIR [RUN_DIR ...]

writes ``OUT_STEM.csv``, ``OUT_STEM.md`` and ``OUT_STEM.png``: per run, the concept share of the
pretrained and the unlearned model (from the relearning record where there is one: it judges more samples), the
share after each relearning step count, the steps until half
the removed share is back, and each prompt objective's attack success rate (and the pretrained
model's, the sanity check), beside the run's cost (KL to the pretrained model, KID) and whether its
constraints held.
"""
from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

COLUMNS = ("run", "model", "formulation", "method", "pretrained_share", "clean_share", "kl_to_pretrained", "kid",
           "constraints_met")
COST = ("kl_to_pretrained", "kid")  # what the unlearning cost, from the run's summary.json


def rows(run_dirs) -> list[dict]:
    out = []
    for d in run_dirs:
        d = Path(d)
        recs = {p.stem: json.loads(p.read_text()) for p in sorted((d / "attacks").glob("*.json"))
                if "." not in p.stem}  # <name>.<protocol_id>.json: an earlier record of other settings
        if not recs:
            continue
        first = recs.get("relearn") or next(iter(recs.values()))  # relearning judges more samples
        generic = re.fullmatch(r"[a-z]+_\d+|\d+", d.name) is not None  # a sweep's job folder: name it with its sweep
        row = {"run": f"{d.parent.name}/{d.name}" if generic else d.name, **{
            k: first["run"][k] for k in ("model", "formulation", "method")},
            "pretrained_share": first["result"]["pretrained_share"], "clean_share": first["result"]["clean_share"]}
        summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
        row.update({k: (summary.get("metrics") or {}).get(k) for k in COST})
        row["constraints_met"] = summary.get("constraints_met")
        for name, rec in recs.items():
            r = rec["result"]
            for step, v in (r.get("share_after") or {}).items():
                row[f"{name}@{step}"] = v
            if "steps_to_half_recovery" in r:
                row[f"{name}: steps to half"] = r["steps_to_half_recovery"]
            if "attack_success_rate" in r:
                row[f"{name} clean share"] = r["clean_share"]
            for obj, v in (r.get("attack_success_rate") or {}).items():
                row[f"{name} {obj} ASR"] = v
                row[f"{name} {obj} ASR (pretrained)"] = r["pretrained_attack_success_rate"][obj]
        out.append(row)
    return out


def write(stem: str | Path, table: list[dict]) -> list[Path]:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    keys = list(COLUMNS) + sorted({k for r in table for k in r} - set(COLUMNS), key=_order)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(table)
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))
    md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in table]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    plot(stem.with_suffix(".png"), table)
    return [stem.with_suffix(s) for s in (".csv", ".md", ".png")]


def _order(key: str):
    name, _, step = key.partition("@")
    return (name, int(step) if step.isdigit() else 10**9, key)


def plot(path: Path, table: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5.2))
    for r in table:
        steps = sorted((int(k.split("@")[1]), v) for k, v in r.items() if k.startswith("relearn@"))
        if steps:
            a.plot([s for s, _ in steps], [v for _, v in steps], marker="o", label=r["run"])
    a.set_xscale("symlog", linthresh=5)
    a.set_xlabel("relearning steps")
    a.set_ylabel("concept share")
    a.set_title("relearning")
    a.legend(fontsize=7)
    prompted = [r for r in table if any(k.endswith(" ASR") for k in r)]
    objs = sorted({k for r in prompted for k in r if k.endswith(" ASR")})
    width = 0.8 / max(1, len(objs) + 1)
    for j, key in enumerate(["clean_share"] + objs):
        b.bar([i + j * width for i in range(len(prompted))], [r.get(key) or 0.0 for r in prompted], width,
              label=key.replace("prompt ", ""))
    b.set_xticks([i + 0.4 - width / 2 for i in range(len(prompted))])
    b.set_xticklabels([r["run"] for r in prompted], fontsize=7, rotation=35, ha="right")
    b.set_ylabel("concept share / attack success rate")
    b.set_title("adversarial soft prompt")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print("error: usage: python -m unlearn.attacks.report OUT_STEM RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    table = rows(argv[1:])
    if not table:
        print("error: RUN_DIR: none of the run directories holds attacks/*.json; accepted: run directories "
              "attacked with python attack.py", file=sys.stderr)
        return 2
    for p in write(argv[0], table):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
