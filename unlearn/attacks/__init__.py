"""Attacks on an unlearned model (``python attack.py run_dir=PATH attack=NAME``): does it stay erased?

Each attack is one module with a registered :class:`~unlearn.attacks.base.Attack` subclass and a
``configs/attack/<name>.yaml``; :func:`~unlearn.attacks.run.attack` runs it on a finished run's
unlearned model and, with the same protocol, on the pretrained model, and writes
``run_dir/attacks/<name>.json``.
"""
from .base import ATTACKS, Attack, AttackError, attack_class
from .target import AttackTarget, load_run

__all__ = ["ATTACKS", "Attack", "AttackError", "AttackTarget", "attack_class", "load_run"]
