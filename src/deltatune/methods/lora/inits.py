"""Initial LoRA factors. Weight-derived inits (PiSSA, MiLoRA, OLoRA) return factors (A0, B0) whose product
the piece subtracts again, so the delta is exactly zero at step 0 and the base weights are never modified."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def kaiming_a(r: int, d_in: int, dtype: torch.dtype, device) -> Tensor:
    a = torch.empty(r, d_in, dtype=dtype, device=device)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a


def svd_factors(w: Tensor, r: int, scale: float, minor: bool) -> tuple[Tensor, Tensor]:
    """Principal (PiSSA) or minor (MiLoRA) rank-r SVD part of W as (A, B) with scale·B·A = U_r S_r V_rᵀ."""
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    sl = slice(s.numel() - r, s.numel()) if minor else slice(0, r)
    root = (s[sl] / scale).sqrt()
    return root[:, None] * vh[sl], u[:, sl] * root[None, :]


def qr_factors(w: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """OLoRA: W = QR; B = Q[:, :r], A = R[:r]."""
    q, rr = torch.linalg.qr(w.float())
    return rr[:r].contiguous(), q[:, :r].contiguous()
