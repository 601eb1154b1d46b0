"""acc + x ΔWᵀ for a sparse ΔW given as (flat index, values), without keeping a dense ΔW alive.

The dense [out, in] ΔW exists only inside forward and inside backward (rebuilt from index/values), so a
layer's sparse delta costs k numbers between the passes; the values' gradient is gathered at the k indices
from the transient dense gradient gᵀx.
"""
from __future__ import annotations

import torch
from torch import Tensor


def scatter_dense(index: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    out = torch.zeros(shape[0] * shape[1], dtype=values.dtype, device=values.device)
    return out.index_put_((index,), values).view(shape)


class SparseLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, acc: Tensor, index: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:  # type: ignore[override]
        w = scatter_dense(index, values, shape)
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.addmm(acc.reshape(-1, acc.shape[-1]), x2.to(w.dtype), w.t())
        ctx.save_for_backward(x, index, values)
        ctx.shape = shape
        return out.view(acc.shape)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, index, values = ctx.saved_tensors
        need_x, need_acc, _, need_v = ctx.needs_input_grad[:4]
        g2 = g.reshape(-1, g.shape[-1])
        gx = gv = None
        if need_x:
            gx = (g2.to(values.dtype) @ scatter_dense(index, values, ctx.shape)).view(x.shape).to(x.dtype)
        if need_v:
            x2 = x.reshape(-1, x.shape[-1]).to(values.dtype)
            gv = (g2.to(values.dtype).t() @ x2).view(-1).index_select(0, index)
        return gx, (g if need_acc else None), None, gv, None
