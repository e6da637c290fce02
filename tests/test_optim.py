"""The primal optimiser: gradient accumulation, the forget term's own clip (SISS), AdamW's betas,
the cosine schedule with warm-up, absolute thresholds."""
from __future__ import annotations

import math
import types

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_cfg
from unlearn.config import ConfigError
from unlearn.formulations.base import Formulation, PrimalLoss
from unlearn.optim import lr_multiplier


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))

    def trainable_parameters(self):
        return [self.w]


class _CountingSGD(torch.optim.SGD):
    count = 0

    def step(self, closure=None):
        self.count += 1
        return super().step(closure)


class _Toy(Formulation):
    """Micro-batch ``j`` has loss ``a_j . w + b_j . w`` where the second term is the clipped one."""
    name = ""  # not registered

    def __init__(self, cfg, batches):
        super().__init__(cfg, types.SimpleNamespace(model=_Model()), None, torch.Generator().manual_seed(0))
        self.batches, self.calls = iter(batches), 0
        self.opt = _CountingSGD(self.setup.model.trainable_parameters(), lr=1.0)
        self.schedule_primal()

    @property
    def steps(self):
        return self.opt.count

    def primal_loss(self, multipliers):
        a, b = next(self.batches)
        w = self.setup.model.w
        retain, forget = (a * w).sum(), (b * w).sum()
        return PrimalLoss(retain + forget, {"r": retain.item()}, clipped=((forget, float(self.cfg.forget_grad_clip)),))


def _cfg(**kw):
    base = dict(threshold_factor=1.5, thresholds=None, grad_accumulation=1, grad_clip=0.0, forget_grad_clip=0.0,
                adam_betas=[0.9, 0.999], lr_schedule="constant", lr_warmup_steps=0, dual_steps=4,
                primal_steps_per_dual=2)
    return OmegaConf.create({**base, **kw})


def test_one_optimiser_step_per_accumulation_window_with_the_mean_gradient():
    a = [torch.tensor([1.0, 0.0, 2.0]), torch.tensor([3.0, 1.0, 0.0]), torch.tensor([-1.0, 5.0, 1.0])]
    zero = torch.zeros(3)
    f = _Toy(_cfg(grad_accumulation=3), [(x, zero) for x in a])
    w0 = f.setup.model.w.detach().clone()
    stats = f.primal_step(torch.zeros(1))
    assert f.steps == 1
    mean = sum(a) / 3
    assert torch.allclose(f.setup.model.w.detach(), w0 - mean)  # SGD lr 1: one step along the mean gradient
    assert stats["r"] == pytest.approx(sum(float((x * w0).sum()) for x in a) / 3)


def test_forget_clip_acts_on_the_forget_gradient_alone():
    retain, forget = torch.tensor([30.0, 40.0, 0.0]), torch.tensor([0.0, 3.0, 4.0])  # norms 50 and 5
    f = _Toy(_cfg(forget_grad_clip=1.0), [(retain, forget)])
    w0 = f.setup.model.w.detach().clone()
    f.primal_step(torch.zeros(1))
    # the forget gradient is scaled to norm 1, the (much larger) retain gradient untouched
    assert torch.allclose(f.setup.model.w.detach(), w0 - retain - forget / 5, atol=1e-5)
    # a clip of the whole gradient would have scaled both together
    g = _Toy(_cfg(grad_clip=1.0), [(retain, forget)])
    g.primal_step(torch.zeros(1))
    total = retain + forget
    assert torch.allclose(g.setup.model.w.detach(), w0 - total / total.norm(), atol=1e-5)


def test_forget_clip_applies_per_micro_batch_then_averages():
    forget = [torch.tensor([0.0, 0.0, 10.0]), torch.tensor([0.0, 0.5, 0.0])]
    zero = torch.zeros(3)
    f = _Toy(_cfg(forget_grad_clip=1.0, grad_accumulation=2), [(zero, x) for x in forget])
    w0 = f.setup.model.w.detach().clone()
    f.primal_step(torch.zeros(1))
    expected = (torch.tensor([0.0, 0.0, 1.0]) + torch.tensor([0.0, 0.5, 0.0])) / 2
    assert torch.allclose(f.setup.model.w.detach(), w0 - expected, atol=1e-5)


def test_cosine_schedule_matches_diffusers_and_resumes():
    from diffusers.optimization import get_cosine_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    ref = get_cosine_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=200)
    ours = [lr_multiplier("cosine", 10, 200, s) for s in range(220)]
    theirs = []
    for _ in range(220):
        theirs.append(ref.get_last_lr()[0])
        opt.step()
        ref.step()
    assert ours[:201] == pytest.approx(theirs[:201], abs=1e-12)  # diffusers' cosine turns up again past the end
    assert ours[201:] == [0.0] * 19                                  # ours stays at 0
    assert lr_multiplier("constant", 5, 100, 2) == pytest.approx(0.4) and lr_multiplier("constant", 5, 100, 50) == 1.0
    # the schedule's position is part of the formulation's checkpoint
    steps = [(torch.ones(3), torch.zeros(3))] * 20
    f = _Toy(_cfg(lr_schedule="cosine", lr_warmup_steps=2), steps)
    for _ in range(3):
        f.primal_step(torch.zeros(1))
    g = _Toy(_cfg(lr_schedule="cosine", lr_warmup_steps=2), steps)
    g.sched.load_state_dict(f.state_dict()["lr_schedule"])
    assert g.sched.last_epoch == 3 and g.sched.get_last_lr()[0] == pytest.approx(math.cos(math.pi / 6) * 0.5 + 0.5)
    # the final fit ends the schedule at a share of the peak rate
    f.scale_primal_lr(0.25)
    assert f.sched is None and f.opt.param_groups[0]["lr"] == pytest.approx(0.25)


def test_absolute_thresholds_one_per_constraint():
    f = _Toy(_cfg(thresholds=[0.3, 0.7]), [])
    f.constraint_names = lambda: ["a", "b"]
    assert f.thresholds(torch.tensor([1.0, 1.0])).tolist() == pytest.approx([0.3, 0.7])
    with pytest.raises(ConfigError, match="formulation.thresholds needs one value per constraint"):
        f.thresholds(torch.tensor([1.0, 1.0, 1.0]))
    assert _Toy(_cfg(), []).thresholds(torch.tensor([2.0])).tolist() == [3.0]  # threshold_factor 1.5


@pytest.mark.parametrize("override, match", [
    ("formulation.lr_schedule=linear", "formulation.lr_schedule must be one of"),
    ("formulation.grad_accumulation=0", "formulation.grad_accumulation must be an integer >= 1"),
    ("formulation.adam_betas=[0.9]", "formulation.adam_betas must be two numbers"),
    ("formulation.thresholds=[a]", "formulation.thresholds must be null or a list of numbers"),
    ("formulation.concept_guidance=0.5", "formulation.concept_guidance must be 'sampling'"),
])
def test_optimiser_keys_are_checked_before_any_model(override, match):
    from unlearn.formulations.base import formulation_class

    cfg = compose_cfg(["formulation=fu", override])
    with pytest.raises(ConfigError, match=match):
        formulation_class(cfg.formulation.name).check_config(cfg)


def test_siss_recipe_and_gmm_absolute_thresholds_compose():
    c = compose_cfg(["model=ddpm_celebahq", "formulation=fu"], tiny=False).formulation
    assert (c.grad_accumulation, c.primal_steps_per_dual, c.dual_steps) == (16, 1, 60)
    assert (c.forget_grad_clip, c.grad_clip, list(c.adam_betas), c.weight_decay, c.primal_lr) == \
        (500.0, 0.0, [0.95, 0.999], 1e-6, 5e-6)
    lu = compose_cfg(["model=bk_sdm_tiny", "formulation=lu"], tiny=False).formulation
    assert (lu.lr_schedule, lu.lr_warmup_steps) == ("cosine", 10)
    # absolute thresholds skip FU's factor check
    from unlearn.formulations.fu import ForwardKLUnlearning

    cfg = compose_cfg(["formulation=fu", "formulation.threshold_factor=0.5", "formulation.thresholds=[0.02]"])
    ForwardKLUnlearning.check_config(cfg)


def test_fu_on_the_ddpm_double_accumulates_and_clips_its_forget_gradient():
    import unlearn

    cfg = compose_cfg(["model=tiny_ddpm", "formulation=fu", "formulation.grad_accumulation=3",
                       "formulation.grad_clip=0", "formulation.forget_grad_clip=1e-9"])
    setup, _, f, *_ = unlearn.build(cfg)
    calls, grads = {"loss": 0, "step": 0}, []
    loss_fn, step_fn = f.primal_loss, f.opt.step

    def counted_loss(mu):
        calls["loss"] += 1
        return loss_fn(mu)

    def captured_step(*a, **k):
        calls["step"] += 1
        grads.append(torch.cat([p.grad.flatten().clone() for p in setup.model.trainable_parameters()]))
    f.primal_loss, f.opt.step = counted_loss, captured_step
    state = f.gen.get_state()
    f.primal_step(torch.full((f.num_constraints,), 5.0))
    assert calls == {"loss": 3, "step": 1}  # one optimiser step per window of three micro-batches
    f.gen.set_state(state)
    f.primal_step(torch.zeros(f.num_constraints))  # the same draws without the forget term
    # the forget term (weight 5) is clipped to norm 1e-9: what is left is the retain gradient alone
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].norm() > 1e-3
