"""acc + x ΔWᵀ for a sparse ΔW given as (flat index, values), without keeping anything of size out × in alive.

Between forward and backward the function keeps x (one [N, in] activation per adapted module, as LoRA keeps;
a frozen base layer alone would not), index and values: k numbers and k indices, nothing of size out × in. Two ways to compute, chosen per call:

* dense: ΔW is scattered into a transient dense [out, in] tensor in forward and again in backward (for x's
  gradient); the values' gradient is gathered at the k indices from the transient dense gᵀx. At most one
  out × in temporary exists at a time, and only while this layer is computed.
* csr: ΔW is a CSR matrix built from (index, values) (O(k) work and memory); forward and x's gradient are
  sparse × dense products and the values' gradient is a sampled dense product (SDDMM) at the k positions, so
  no out × in tensor exists at all. It wins at low density (see `use_csr`).

While regrowth statistics are being gathered (`stats` is not None, only in the few steps before a regrow) the
dense gᵀx is computed in backward, handed to `stats.add` and dropped (see spiel.py).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Protocol

import torch
from torch import Tensor

#: densities k / (out·in) up to which the CSR path is used. `bench/sparse.py --paths` times both paths (forward +
#: backward of this function alone, N = 1024 rows, SmolLM2-135M's projection shapes). With 1 thread CSR took
#: 0.3-0.8x dense's time up to 1 % density, 0.5-0.8x at 2-4 % and 0.6-1.5x at 8 %; with 2 threads dense gains
#: more from the second core and the crossover moved to 2-4 % ([576, 576]: 25 ms dense, 16-19 ms CSR up to 2 %,
#: equal at 4 %, 40 ms CSR at 8 %). 2 % keeps CSR where it wins on both.
CSR_MAX_DENSITY = 0.02


class GradSink(Protocol):
    def add(self, grad: Tensor) -> None:
        """Take one backward's dense gradient of ΔW ([out, in]); it must not be kept by reference."""


def scatter_dense(index: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    out = torch.zeros(shape[0] * shape[1], dtype=values.dtype, device=values.device)
    return out.index_put_((index,), values).view(shape)


def use_csr(k: int, shape: tuple[int, int], device: torch.device) -> bool:
    """Whether the CSR path is the faster one for k entries in a weight of `shape` (CPU only)."""
    return device.type == "cpu" and k <= CSR_MAX_DENSITY * shape[0] * shape[1]


def _csr(index: Tensor, values: Tensor, shape: tuple[int, int], transpose: bool = False) -> tuple[Tensor, Tensor]:
    """ΔW (or ΔWᵀ) as a CSR tensor, and the order that maps its stored values back to slots of `values`."""
    rows, cols = index // shape[1], index % shape[1]
    if transpose:
        rows, cols, shape = cols, rows, (shape[1], shape[0])
    order = torch.argsort(rows * shape[1] + cols)
    crow = torch._convert_indices_from_coo_to_csr(rows[order], shape[0])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the operations used here are exact
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols[order], values[order], shape), order


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off on the devices that have it (cpu, cuda); nothing elsewhere (e.g. meta tensors)."""
    return torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else contextlib.nullcontext()


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


class SparseLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, acc: Tensor, index: Tensor, values: Tensor, shape: tuple[int, int],  # type: ignore[override]
                stats: GradSink | None = None, csr: bool | None = None) -> Tensor:
        csr = use_csr(index.numel(), shape, values.device) if csr is None else csr
        x2 = _flat(x).to(values.dtype)
        # the products run in the values' dtype, also under autocast (which has no bf16 sparse CSR kernel on
        # the CPU); the result is added in the output's dtype
        with _no_autocast(x.device.type):
            if csr:
                w, _ = _csr(index, values, shape)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    delta = torch.sparse.mm(w, x2.t()).t()  # [N, out], a transposed view
                out = _flat(acc) + delta.to(acc.dtype)
            else:
                w = scatter_dense(index, values, shape)
                if acc.dtype == w.dtype:
                    out = torch.addmm(_flat(acc), x2, w.t())
                else:
                    out = _flat(acc) + (x2 @ w.t()).to(acc.dtype)
                del w
        ctx.save_for_backward(x, index, values)
        ctx.shape, ctx.stats, ctx.csr = shape, stats, csr
        return out.view(acc.shape)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, index, values = ctx.saved_tensors
        shape, stats, csr = ctx.shape, ctx.stats, ctx.csr
        need_x, need_acc, _, need_v = ctx.needs_input_grad[:4]
        g2 = _flat(g).to(values.dtype)
        gx = gv = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if need_x:
                if csr:
                    wt, _ = _csr(index, values, shape, transpose=True)
                    gx = torch.sparse.mm(wt, g2.t()).t()
                else:
                    gx = g2 @ scatter_dense(index, values, shape)
                gx = gx.reshape(x.shape).to(x.dtype)
            if need_v or stats is not None:
                x2 = _flat(x).to(values.dtype)
                if csr and stats is None:
                    w, order = _csr(index, values, shape)
                    sampled = torch.sparse.sampled_addmm(w, g2.t(), x2, beta=0.0).values()
                    gv = torch.empty_like(sampled).index_put_((order,), sampled)
                else:
                    dense = g2.t() @ x2  # [out, in], transient
                    if stats is not None:
                        stats.add(dense)
                    gv = dense.view(-1).index_select(0, index)
                    del dense
        return gx, (g if need_acc else None), None, (gv if need_v else None), None, None, None
