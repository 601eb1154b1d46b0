"""LoftQ: quantise a base and start its LoRA so that Q + s·B A approximates the full-precision weight (Li et al. 2023,
"LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models", arXiv:2310.08659).

For each targeted weight W, starting from B A = 0, `iters` times:

    Q      = dequant(quant(W − s·B A))              the quantised base (NF4 / FP4 / int8, the module's own scheme)
    s·B A  = best rank-r approximation of W − Q      (SVD: B = U_r √S_r / √s, A = √S_r V_rᵀ / √s)

The model's linears are then quantised (`dt.quantize`), the targeted ones from W − s·B A, and the LoRA delta is
attached with those factors. Unlike the other inits the delta does not start at zero: it starts as the part of W the
quantisation loses, so it belongs to this quantised base (a different base gives different factors).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..core import quant
from ..core.errors import ConfigError
from ..core.quantize import quantize
from ..methods.lora.lora import LoRA, LoRAPiece
from .lora_factors import build_lora, check_lora, install_factors


def _roundtrip(w: Tensor, scheme: str, double_quant: bool) -> Tensor:
    """dequant(quant(w)) with bitsandbytes' own functions, as dt.quantize stores it."""
    fn = quant.bnb().functional
    if scheme == "int8":
        cb, scb, _ = fn.int8_vectorwise_quant(w.to(torch.float16).contiguous())  # as Int8Params does
        return cb.float() * (scb.float()[:, None] / 127.0)
    q, state = fn.quantize_4bit(w.contiguous(), quant_type=scheme, compress_statistics=double_quant)
    return fn.dequantize_4bit(q, state)


def loftq_factors(w: Tensor, r: int, scale: float, scheme: str = "nf4", iters: int = 1,
                  double_quant: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(A [r, in], B [out, r], W − s·B A: the weight to quantise) for one full-precision weight W [out, in]."""
    w = w.detach().float()
    a = w.new_zeros(r, w.shape[1])
    b = w.new_zeros(w.shape[0], r)
    for _ in range(iters):
        q = _roundtrip(w - scale * (b @ a), scheme, double_quant)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        root = s[:r].sqrt()
        b = u[:, :r] * root / scale ** 0.5
        a = root[:, None] * vh[:r] / scale ** 0.5
    return a, b, w - scale * (b @ a)


@torch.no_grad()
def loftq(model: nn.Module, cfg: LoRA, name: str = "default", *, scheme: str = "nf4", iters: int = 1,
          exclude: str | Sequence[str] = (), double_quant: bool = True, activate: bool = True,
          trainable: bool = True) -> dict:
    """Quantise the full-precision `model` in place (`dt.quantize(model, scheme, exclude)`) and attach LoRA delta
    `name` (config `cfg`, Linear targets) initialised by LoftQ with `iters` alternations.

    Returns the reconstruction report: {"modules": {path: {"loftq": ‖W − (Q + s·BA)‖/‖W‖, "plain": ‖W − Q₀‖/‖W‖}},
    "total": {"loftq": ..., "plain": ...}}, where Q₀ is the plain quantisation of W. Everything is computed before
    the model changes; a bad config, name, scheme or target raises with the model untouched."""
    check_lora(model, cfg, name, "dt.init.loftq")
    if cfg.dora:
        raise ConfigError("dt.init.loftq initialises plain LoRA factors; DoRA (dora=True) is not supported")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ConfigError(f"dt.init.loftq: iters must be an integer >= 1, got {iters!r}")
    if scheme not in quant.SCHEMES:
        raise ConfigError(f"dt.init.loftq: scheme must be one of {quant.SCHEMES}, got {scheme!r}")
    quant.bnb()
    built, lora = build_lora(model, cfg)  # checks targets and ranks; nothing on the model changes
    if any(quant.quant_kind(m) is not None for m, _ in lora.values()):
        raise ConfigError("dt.init.loftq needs the full-precision model (it chooses the quantised weights itself)")
    factors, residual, report = {}, {}, {}
    tot = {"loftq": 0.0, "plain": 0.0, "norm": 0.0}
    pieces = {p: piece for p, _, piece in built if isinstance(piece, LoRAPiece)}
    for path, (module, layout) in lora.items():
        piece = pieces[path]
        w = layout.weight(module).detach().float()
        a, b, rest = loftq_factors(w, piece.lora_A.shape[0], piece.scale, scheme, iters, double_quant)
        q = _roundtrip(rest, scheme, double_quant)
        err = float(torch.linalg.vector_norm(w - q - piece.scale * (b @ a)))
        plain = float(torch.linalg.vector_norm(w - _roundtrip(w, scheme, double_quant)))
        norm = float(torch.linalg.vector_norm(w))
        report[path] = {"loftq": err / max(norm, 1e-30), "plain": plain / max(norm, 1e-30)}
        tot["loftq"] += err ** 2
        tot["plain"] += plain ** 2
        tot["norm"] += norm ** 2
        factors[path] = (a, b)
        residual[path] = layout.to_native(rest).to(module.weight.dtype)
    originals = {p: lora[p][0].weight.detach().clone() for p in residual}
    try:
        for p, rest in residual.items():
            lora[p][0].weight.copy_(rest)
        quantize(model, scheme, exclude, double_quant=double_quant)
    except BaseException:
        for p, w in originals.items():
            lora[p][0].weight.copy_(w)
        raise
    missing = [p for p in residual if quant.quant_kind(model.get_submodule(p)) is None]
    if missing:  # excluded from quantisation: keep the full-precision weight, factors start at zero there
        for p in missing:
            model.get_submodule(p).weight.copy_(originals[p])
            factors[p] = (factors[p][0], torch.zeros_like(factors[p][1]))
            report[p]["loftq"] = report[p]["plain"] = 0.0
    built, _ = build_lora(model, cfg)
    install_factors(model, name, cfg, built, factors, activate=activate, trainable=trainable)
    norm = max(tot["norm"], 1e-30) ** 0.5
    return {"modules": report, "total": {"loftq": tot["loftq"] ** 0.5 / norm, "plain": tot["plain"] ** 0.5 / norm}}
