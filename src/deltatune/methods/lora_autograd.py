"""One autograd function for a LoRA branch on a dense-input module: y + s · drop(x) Aᵀ Bᵀ.

It saves only x (already alive for the rest of the graph) and the [N, r] projection; the dropout mask is
not stored but regenerated in backward from a seed, so dropout costs no activation memory.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _mask(x2: Tensor, p: float, seed: int) -> Tensor:
    gen = torch.Generator(device=x2.device)
    gen.manual_seed(seed)
    return torch.empty_like(x2).bernoulli_(1.0 - p, generator=gen).div_(1.0 - p)


class LoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, acc: Tensor, a: Tensor, b: Tensor, scale: float, p: float) -> Tensor:  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
        xd = x2 * _mask(x2, p, seed) if p > 0 else x2
        t = xd @ a.t()
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
        gt = (g2 @ b).mul_(scale) if (need_a or need_x) else None
        x2 = x.reshape(-1, x.shape[-1])
        mask = _mask(x2, p, ctx.seed) if (p > 0 and (need_a or need_x)) else None
        ga = gx = None
        if need_a:
            ga = gt.t() @ (x2 * mask if mask is not None else x2)
        if need_x:
            gx = gt @ a
            if mask is not None:
                gx.mul_(mask)
            gx = gx.view(x.shape)
        return gx, g, ga, gb, None, None
