"""Data-parallel primal steps across processes started by ``accelerate launch``.

Every rank holds the whole model and the same multipliers. Each primal step averages the
gradients of the trainable parameters over ranks (each rank samples its own batch), and each
constraint estimate is averaged over ranks before the dual step, so the multipliers stay
identical everywhere. Rank 0 writes the run's outputs; every rank writes
``rank<r>_multipliers.json`` (its multipliers after each dual step) so that can be checked.

On a CPU-only machine: ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2
train.py ...`` (gloo backend). Single-process runs never touch ``torch.distributed``.
"""
from __future__ import annotations

import os

import torch


class Distributed:
    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self._pg = False
        if self.world_size > 1:
            import torch.distributed as dist
            from accelerate import PartialState

            cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
            state = PartialState(cpu=cpu)
            self.rank, self.world_size = state.process_index, state.num_processes
            self._pg = dist.is_available() and dist.is_initialized()
            self.device = state.device

    @property
    def enabled(self) -> bool:
        return self._pg and self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The average of ``t`` over ranks (identical on every rank afterwards)."""
        if not self.enabled:
            return t
        import torch.distributed as dist

        out = t.detach().clone().float()
        dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
        out = out.to(dev)
        dist.all_reduce(out)
        return (out / self.world_size).to(t.device, t.dtype)

    def average_gradients(self, params) -> None:
        if not self.enabled:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= self.world_size

    def gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank (e.g. their RNG states for a checkpoint)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (e.g. the run directory)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


_DIST: Distributed | None = None


def get_dist() -> Distributed:
    global _DIST
    if _DIST is None:
        _DIST = Distributed()
    return _DIST
