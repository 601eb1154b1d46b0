"""One autograd function for a LoRA branch on a dense-input module: y + s · drop(x) Aᵀ Bᵀ.

It saves only x (already alive for the rest of the graph) and the [N, r] projection; the dropout mask is
not stored but regenerated in backward from a seed, so dropout costs no activation memory.

Dropout is inverted dropout with a 0/1 keep mask k. The mask is cut from full-range random 64-bit words,
16 bits per element (k = [u16 ≥ threshold]), which on CPU is about 3x cheaper than `uniform_` and 5x cheaper
than `bernoulli_`; the drop probability is therefore p rounded to a multiple of 2⁻¹⁶ (within 7.7e-6 of p).
The 1/(1-p) rescaling is applied to the [N, r] projection and its gradient instead of to the [N, in] input:
drop(x) Aᵀ = ((x ⊙ k) Aᵀ) / (1-p).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _keep(x2: Tensor, p: float, seed: int) -> Tensor:
    """The 0/1 keep mask (in x's dtype and shape) drawn from `seed`: the same mask on every call with the same seed."""
    gen = torch.Generator(device=x2.device)
    gen.manual_seed(seed)
    n = x2.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x2.device).random_(-2**63, None, generator=gen)
    lanes = words.view(torch.int16)[:n].view(x2.shape)  # n independent uniform 16-bit integers
    out = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    return torch.ge(lanes, round(p * 65536) - 32768, out=out)  # P(keep) = 1 - p


class LoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, acc: Tensor, a: Tensor, b: Tensor, scale: float, p: float) -> Tensor:  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])
        if p > 0:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            t = (_keep(x2, p, seed).mul_(x2) @ a.t()).mul_(1.0 / (1.0 - p))
        else:
            seed = 0
            t = x2 @ a.t()
        out = torch.addmm(acc.reshape(-1, acc.shape[-1]), t, b.t(), alpha=scale)
        ctx.save_for_backward(x, t, a, b)
        ctx.scale, ctx.p, ctx.seed = scale, p, seed
        return out.view(acc.shape)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, t, a, b = ctx.saved_tensors
        scale, p = ctx.scale, ctx.p
        g2 = g.reshape(-1, g.shape[-1])
        need_x, _, need_a, need_b = ctx.needs_input_grad[:4]
        gb = (g2.t() @ t).mul_(scale) if need_b else None
        ga = gx = None
        if need_a or need_x:
            x2 = x.reshape(-1, x.shape[-1])
            # gradient with respect to x ⊙ k (the dropout rescaling folded in)
            gt = (g2 @ b).mul_(scale / (1.0 - p) if p > 0 else scale)
            keep = _keep(x2, p, ctx.seed) if p > 0 else None
            if need_x:
                gx = gt @ a
                if keep is not None:
                    gx.mul_(keep)
                gx = gx.view(x.shape)
            if need_a:
                ga = gt.t() @ (keep.mul_(x2) if keep is not None else x2)
        return gx, g, ga, gb, None, None
