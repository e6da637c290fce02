"""The bench's bare loops: one training step written directly on diffusers and peft, the way a user
would without this framework, at the settings of a bench case (``unlearn.bench.case_config``).

- ``esd``: ESD-x. A trajectory of the LoRA model under the retain prompt (classifier-free guidance,
  DDIM), then at every stochastic step the guided model's noise prediction is fitted to ESD's target
  ``eps(c_retain, guided) - eta (eps(c_i) - eps(none))`` of the frozen model (weighted MSE).
- ``dpok``: the paper's LU primal step (DPOK). A recorded trajectory; the reward ``mu l(x_0)`` with
  Lemma 2's likelihood ratio of each concept over the unconditional model (stratified log-SNR
  timesteps, antithetic noise); the policy-gradient term and the path KL to the frozen model.
- ``denoise``: FU's primal step. The denoising loss on retain samples minus the weighted one on forget
  samples.

Everything (text embeddings, the retain pool, the forget samples) that the framework draws once at
build time is drawn once here too and not timed.
"""
from __future__ import annotations

import contextlib
import math

import torch

from .models.diffusers_models import DTYPES


class BareLoop:
    def __init__(self, cfg, kind: str, multiplier: float):
        from diffusers import UNet2DConditionModel
        from peft import LoraConfig
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        from .families.text2img import ASSETS

        self.kind, m, self.f = kind, cfg.model, cfg.formulation
        self.device = torch.device("cuda" if torch.cuda.is_available() and str(m.device) != "cpu" else "cpu")
        self.dtype = DTYPES[str(m.precision)]
        t = m.tiny
        torch.manual_seed(int(t.seed))
        unet = UNet2DConditionModel(**t.unet)
        te = CLIPTextModel(CLIPTextConfig(**t.text_encoder)).to(self.device).eval()
        tok = CLIPTokenizer.from_pretrained(str(ASSETS / "tiny_clip_tokenizer"))
        with torch.no_grad():
            def embed(p):
                ids = tok([p], padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids.to(self.device)
                return te(ids)[0].to(self.dtype)
            self.e_null, self.e_ret = embed(""), embed(m.prompts.retain[0])
            self.e_con = [embed(p) for p in m.prompts.unlearn]
        del te
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=int(m.lora.rank), lora_alpha=float(m.lora.alpha),
                                    target_modules=str(m.lora.target_modules), init_lora_weights=True))
        if bool(m.gradient_checkpointing):
            unet.enable_gradient_checkpointing()
        for p in unet.parameters():  # frozen weights in the run's dtype, LoRA in fp32
            p.data = p.data.to(self.device, torch.float32 if p.requires_grad else self.dtype)
        self.unet = unet
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=float(self.f.primal_lr), weight_decay=float(self.f.weight_decay))
        self.g = float(m.guidance_scale)
        self.n = int(self.f.primal_batch_size)
        self.shape = (int(t.unet.in_channels), int(t.unet.sample_size), int(t.unet.sample_size))
        s = t.scheduler
        betas = torch.linspace(float(s.beta_start) ** 0.5, float(s.beta_end) ** 0.5, int(s.num_train_timesteps)) ** 2
        self.abar = torch.cumprod(1 - betas.double(), 0)
        self._ddim(int(m.sampler.num_steps), float(m.sampler.eta))
        self.mu = torch.full((len(self.e_con),), float(multiplier), device=self.device)
        if kind == "denoise":
            with torch.no_grad():
                self.retain_pool = self.sample(int(self.f.retain_pool))
                self.forget = torch.cat([self.sample(int(m.forget_generated), e) for e in self.e_con])

    def _ddim(self, steps: int, eta: float) -> None:
        T = len(self.abar)
        self.ts = sorted(set(torch.linspace(T - 1, 0, steps).round().long().tolist()), reverse=True)
        self.a, self.c, self.s = [], [], []
        for k, t in enumerate(self.ts):
            ab_t = float(self.abar[t])
            ab_s = float(self.abar[self.ts[k + 1]]) if k + 1 < len(self.ts) else 1.0
            sig = eta * math.sqrt((1 - ab_s) / (1 - ab_t)) * math.sqrt(max(1 - ab_t / ab_s, 0.0))
            self.a.append(math.sqrt(ab_s / ab_t))
            self.c.append(math.sqrt(ab_s) * math.sqrt(1 - ab_t) / math.sqrt(ab_t) - math.sqrt(max(1 - ab_s - sig**2, 0.0)))
            self.s.append(sig)

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def unet_eps(self, x, t, embs: list) -> list:
        """One UNet call for every condition in ``embs`` at the same ``x``, ``t``."""
        k, n = len(embs), x.shape[0]
        with self.autocast():
            out = self.unet(torch.cat([x] * k), torch.cat([t] * k),
                            encoder_hidden_states=torch.cat([e.expand(n, -1, -1) for e in embs])).sample
        return list(out.float().chunk(k))

    def guided(self, x, t, cond):
        e_u, e_c = self.unet_eps(x, t, [self.e_null, cond])
        return e_u + self.g * (e_c - e_u)

    def sample(self, n, cond=None, plain=False, record=False):
        cond = self.e_ret if cond is None else cond
        x = torch.randn(n, *self.shape, device=self.device)
        states = [x]
        for k, t in enumerate(self.ts):
            tt = torch.full((n,), t, device=self.device, dtype=torch.long)
            e = self.unet_eps(x, tt, [cond])[0] if plain else self.guided(x, tt, cond)
            x = self.a[k] * x - self.c[k] * e + (self.s[k] * torch.randn_like(x) if self.s[k] > 0 else 0.0)
            states.append(x)
        return states if record else x

    def _stacked(self, states):
        ks = [k for k in range(len(self.ts)) if self.s[k] > 0]
        n = states[0].shape[0]
        X = torch.cat([states[k] for k in ks])
        Xn = torch.cat([states[k + 1] for k in ks])
        T = torch.cat([torch.full((n,), self.ts[k], dtype=torch.long, device=self.device) for k in ks])
        rows = lambda v: torch.tensor([v[k] for k in ks], device=self.device).repeat_interleave(n).view(-1, 1, 1, 1)
        return ks, X, Xn, T, rows(self.a), rows(self.c), rows([s**2 for s in self.s])

    def update(self, loss):
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if float(self.f.grad_clip) > 0:
            torch.nn.utils.clip_grad_norm_(self.params, float(self.f.grad_clip))
        self.opt.step()

    def step(self):
        getattr(self, f"{self.kind}_step")()

    def esd_step(self):
        with torch.no_grad():
            states = self.sample(self.n, record=True)
        ks, X, _, T, _, c, s2 = self._stacked(states)
        e_model = self.guided(X, T, self.e_ret)
        with torch.no_grad():
            self.unet.disable_adapters()
            e_u, e_r, *e_cs = self.unet_eps(X, T, [self.e_null, self.e_ret, *self.e_con])
            self.unet.enable_adapters()
            target = e_u + self.g * (e_r - e_u)
            for w, e_c in zip(self.mu, e_cs):
                target = target - w * (e_c - e_u)
        w = (c.flatten() ** 2) / (2 * s2.flatten())
        kl = (w * ((e_model - target) ** 2).flatten(1).sum(1)).view(len(ks), self.n).sum(0)
        self.update(kl.mean())

    def likelihood(self, x0):
        """Lemma 2: ``l_i = q_i / p_uncond`` at ``x0`` (stratified log-SNR timesteps, antithetic noise)."""
        L, R = int(self.f.likelihood_timesteps), int(self.f.likelihood_noise)
        lam = torch.log(self.abar / (1 - self.abar))
        wt = torch.zeros_like(lam)
        wt[1:] = (lam[:-1] - lam[1:]) / 2
        wt[0] = wt[1]
        cdf = torch.cumsum(wt / wt.sum(), 0)
        u = (torch.arange(L * R, dtype=torch.float64) % L + torch.rand(L * R, dtype=torch.float64)) / L
        t = torch.searchsorted(cdf, u).clamp(max=len(cdf) - 1)
        w = torch.full((L * R,), float(wt.sum()) / (L * R))
        e = torch.randn(L * R, *x0.shape, device=self.device)
        t, w, e = torch.cat([t, t]), torch.cat([w, w]) / 2, torch.cat([e, -e])
        n, k = x0.shape[0], len(t)
        trow = t.repeat_interleave(n).to(self.device)
        ab = self.abar.to(self.device)[trow].float().view(-1, 1, 1, 1)
        er = e.reshape(k * n, *x0.shape[1:])
        xt = ab.sqrt() * x0.repeat(k, 1, 1, 1) + (1 - ab).sqrt() * er
        e_u, *e_cs = self.unet_eps(xt, trow, [self.e_null, *self.e_con])
        err_u = ((er - e_u) ** 2).flatten(1).sum(1).view(k, n)
        llr = torch.stack([(w.to(self.device)[:, None] * (err_u - ((er - e_c) ** 2).flatten(1).sum(1).view(k, n))).sum(0)
                           for e_c in e_cs], 1)
        clip = self.f.likelihood_clip
        return torch.exp(llr).clamp(max=float(clip)) if clip else torch.exp(llr)

    def dpok_step(self):
        with torch.no_grad():
            states = self.sample(self.n, record=True)
            self.unet.disable_adapters()
            reward = (self.likelihood(states[-1]) * self.mu[None]).sum(1)
            self.unet.enable_adapters()
        ks, X, Xn, T, a, c, s2 = self._stacked(states)
        e_model = self.guided(X, T, self.e_ret)
        with torch.no_grad():
            self.unet.disable_adapters()
            e_ref = self.guided(X, T, self.e_ret)
            self.unet.enable_adapters()
        d = X[0].numel()
        r = (Xn - (a * X - c * e_model)).flatten(1)
        logp = (-(r**2).sum(1) / (2 * s2.flatten()) - 0.5 * d * torch.log(2 * torch.pi * s2.flatten()))
        logp = logp.view(len(ks), self.n).sum(0)
        w = (c.flatten() ** 2) / (2 * s2.flatten())
        kl = (w * ((e_model - e_ref) ** 2).flatten(1).sum(1)).view(len(ks), self.n).sum(0)
        adv = reward - reward.mean()
        self.update((adv * logp).mean() + float(self.f.kl_weight) * kl.mean())

    def denoising(self, x, reduce=True):
        n = x.shape[0]
        t = torch.randint(0, len(self.abar), (n,), device=self.device)
        e = torch.randn_like(x)
        ab = self.abar.to(self.device)[t].float().view(-1, 1, 1, 1)
        per = ((e - self.guided(ab.sqrt() * x + (1 - ab).sqrt() * e, t, self.e_ret)) ** 2).flatten(1).mean(1)
        return per.mean() if reduce else per

    def denoise_step(self):
        retain = self.denoising(self.retain_pool[torch.randint(0, len(self.retain_pool), (self.n,))])
        nf = min(int(self.f.forget_batch_size), len(self.forget))
        idx = torch.randint(0, len(self.forget), (nf,))
        per = self.denoising(self.forget[idx], reduce=False)
        sizes = len(self.forget) // len(self.e_con)
        forget = (self.mu[0] / sizes * per).sum() * (len(self.forget) / nf)
        self.update(retain - forget)
