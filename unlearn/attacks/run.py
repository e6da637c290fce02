"""``attack(cfg)``: one attack on one finished run (plain function; ``attack.py`` is its Hydra wrapper).

Writes ``run_dir/attacks/<attack.name>.json``: both sides' numbers (the run's unlearned model and,
with the same protocol, the pretrained model), the comparison, the protocol and its short id.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..metrics.base import protocol_id
from ..utils import atomic_write_text
from .base import AttackError, attack_class
from .target import SIDES, check_run_dir, load_run


def compose(overrides=()) -> DictConfig:
    """The composed config of ``python attack.py <overrides>`` (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ..api import CONFIG_DIR
    from ..cli import check_group_overrides
    from ..config import register_resolvers

    register_resolvers()
    msg = check_group_overrides(list(overrides), CONFIG_DIR, groups=("attack",))
    if msg:
        raise AttackError(msg.removeprefix("error: "))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="attack", overrides=list(overrides))


def check(cfg: DictConfig):
    """Every check that needs no model: the attack's settings and the run directory (one line each)."""
    if OmegaConf.is_missing(cfg, "run_dir") or not cfg.run_dir:
        raise AttackError("run_dir is not set; accepted: run_dir=PATH, the directory of a finished run")
    name = str(cfg.attack.name)
    if not name or any(ch in name for ch in "/\\") or name.startswith("."):
        raise AttackError(f"attack.name={name!r} is not a file name; accepted: letters, digits, '_' or '-'")
    cls = attack_class(cfg.attack.kind)
    attack = cls(cfg.attack, show_progress=bool(cfg.progress))
    check_run_dir(cfg.run_dir)
    return attack


def attack(cfg: DictConfig) -> dict:
    """Run ``cfg.attack`` on ``cfg.run_dir``; returns the record written to ``attacks/<name>.json``."""
    t0 = time.time()
    atk = check(cfg)
    target = load_run(cfg.run_dir, cfg.cache_dir, cfg.num_threads, show_progress=bool(cfg.progress))
    reason = atk.cannot_run(target)
    if reason:
        raise AttackError(reason)
    target.judge  # noqa: B018 -- a model without a judge fails here, before any work
    sides = {side: atk.run(target, side) for side in SIDES}
    settings = OmegaConf.to_container(cfg.attack, resolve=True)
    protocol = {"attack": settings, "judge": target.judge.name,
                "data": sides["unlearned"].get("data"), "sampler": {"kind": target.sampler.kind,
                                                                     "num_steps": target.sampler.num_steps,
                                                                     "eta": target.sampler.eta},
                "run_config_filled": getattr(target, "filled", [])}
    s = target.summary
    record = {"attack": str(cfg.attack.kind), "name": str(cfg.attack.name), "run_dir": str(target.run_dir),
              "run": {"model": s.get("model"), "formulation": s.get("formulation"), "method": s.get("method"),
                      "status": s.get("status"), "threshold_factor": s.get("threshold_factor")},
              "result": atk.compare(sides["pretrained"], sides["unlearned"]), **sides,
              "protocol": protocol, "protocol_id": protocol_id(protocol), "wall_time_s": round(time.time() - t0, 1)}
    out = target.run_dir / "attacks" / f"{cfg.attack.name}.json"
    out.parent.mkdir(exist_ok=True)
    keep_other_protocol(out, record["protocol_id"])
    atomic_write_text(out, json.dumps(record, indent=2, default=float))
    print_record(record, out)
    return record


def keep_other_protocol(path: Path, protocol: str) -> None:
    """A record of the same name but another protocol (other settings) is kept as
    ``<name>.<its protocol_id>.json`` before the new one takes ``<name>.json``."""
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text()).get("protocol_id")
    except Exception:  # noqa: BLE001  (unreadable: keep it under a name that says so)
        old = "unreadable"
    if old != protocol:
        path.rename(path.with_name(f"{path.stem}.{old}.json"))


def print_record(record: dict, path: Path, file=sys.stdout) -> None:
    r = record["result"]
    lines = [f"\n== attack {record['name']} on {record['run']['model']} / {record['run']['formulation']} / "
             f"{record['run']['method']} ({record['wall_time_s']} s) ==",
             f"concept share: pretrained {r['pretrained_share']:.3f}, unlearned {r['clean_share']:.3f}"]
    if "share_after" in r:
        lines.append("after relearning steps: " + ", ".join(f"{k}: {v:.3f}" for k, v in r["share_after"].items()))
        half = r["steps_to_half_recovery"]
        lines.append(f"steps until half the removed share is back: {half if half is not None else 'not within the steps'}")
    for obj, v in (r.get("attack_success_rate") or {}).items():
        after = ", ".join(f"{k}: {x:.3f}" for k, x in r["attack_success_rate_after"][obj].items())
        lines.append(f"attack success rate ({obj}): unlearned {v:.3f} (after steps {after}), pretrained "
                     f"{r['pretrained_attack_success_rate'][obj]:.3f}")
    sanity = r["sanity"]
    checks = [sanity] if "passed" in sanity else list(sanity.values())
    lines.append("sanity (the attack works on the pretrained model): "
                 + ("passed" if all(c["passed"] for c in checks) else "FAILED"))
    lines.append(f"written: {path}")
    print("\n".join(lines), file=file)


def main():
    """``python attack.py run_dir=PATH attack=NAME [attack.key=value ...]`` (Hydra; ``-m`` sweeps)."""
    from ..cli import check_group_overrides
    from ..config import register_resolvers

    register_resolvers()
    root = Path(__file__).resolve().parent.parent.parent / "configs"
    argv = sys.argv[1:]
    msg = check_group_overrides(argv, root, groups=("attack",))
    if not msg:  # before Hydra makes run_dir/attacks: every run directory given must hold a finished run
        given = [a.split("=", 1)[1] for a in argv if a.startswith("run_dir=")]
        if not given:
            msg = "error: run_dir is not set; accepted: run_dir=PATH, the directory of a finished run"
        for value in given:
            for d in (value.split(",") if "-m" in argv or "--multirun" in argv else [value]):
                try:
                    check_run_dir(d)
                except AttackError as exc:
                    msg = msg or f"error: {exc}"
    if msg:
        print(msg, file=sys.stderr)
        sys.exit(2)
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base="1.3", config_path=str(root), config_name="attack")
    def _run(cfg: DictConfig):
        multirun = HydraConfig.get().mode.name == "MULTIRUN"
        try:
            return attack(cfg)
        except AttackError as exc:
            if multirun:
                print(f"error (job {HydraConfig.get().job.num}): {exc}", file=sys.stderr)
                return None
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except Exception as exc:
            from ..config import ConfigError

            if isinstance(exc, ConfigError):
                print(f"error: {exc}", file=sys.stderr)
                sys.exit(2)
            raise

    _run()
