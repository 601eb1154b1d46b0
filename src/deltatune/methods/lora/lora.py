"""LoRA and its options: rsLoRA scaling, DoRA, dropout, bias deltas, PiSSA/MiLoRA/OLoRA/gaussian inits."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.config import DeltaConfig, register
from ...core.errors import ConfigError, ShapeMismatchError, TargetError, UnsupportedError
from ...core.schema import Dropout, Finite, Patterns, PositiveInt, Range, Scale
from ...core.layouts import Layout
from ...core.piece import Piece, master_dtype
from ...core.targeting import pattern_value
from ...core.tensors import DeltaTensor, DenseDelta, LowRankDelta
from .autograd import LoRAFunction
from .inits import kaiming_a, qr_factors, svd_factors

Init = Literal["default", "gaussian", "pissa", "milora", "olora", "given"]
Bias = Literal["none", "lora_only"]
INITS = get_args(Init)
WEIGHT_INITS = ("pissa", "milora", "olora")
# inits whose starting factors (A0, B0) are kept as frozen buffers and subtracted, so ΔW(0) = 0: the weight-derived
# ones, and "given" (factors set by a data-driven initialiser through `set_factors`; alone it starts as "default")
OFFSET_INITS = WEIGHT_INITS + ("given",)
BIASES = get_args(Bias)


@register("lora")
@dataclass(frozen=True)
class LoRA(DeltaConfig):
    """ΔW = s · B A with s = alpha / r (or alpha / √r with rslora); DoRA rescales rows to a learned magnitude."""

    r: PositiveInt = 8
    alpha: Scale = 16.0
    dropout: Dropout = 0.0
    rslora: bool = False
    dora: bool = False
    bias: Bias = "none"
    init: Init = "default"
    rank_pattern: Annotated[dict[str, int], Patterns(Range(1))] = field(default_factory=dict)
    alpha_pattern: Annotated[dict[str, float], Patterns(Finite(nonzero=True))] = field(default_factory=dict)
    stores: ClassVar[type] = LowRankDelta

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def resolve(self, path: str) -> "LoRA":
        if not self.rank_pattern and not self.alpha_pattern:
            return self
        r = pattern_value(self.rank_pattern, path, self.r)
        alpha = pattern_value(self.alpha_pattern, path, self.alpha)
        return self.replace(r=r, alpha=float(alpha), rank_pattern={}, alpha_pattern={})  # type: ignore[return-value]

    def piece_class(self, module: Any = None) -> type[Piece]:
        return DoRAPiece if self.dora else LoRAPiece

    @classmethod
    def for_tensors(cls, tensors: dict[str, DeltaTensor], biases: dict[str, Tensor]) -> "LoRA":
        """A LoRA config storing these low-rank updates exactly: scale 1 (alpha = r), per-module ranks as patterns."""
        ranks = {p: int(t.A.shape[0]) for p, t in tensors.items() if isinstance(t, LowRankDelta)}
        r = max(ranks.values(), default=1)
        pattern = {re.escape(p): k for p, k in ranks.items() if k != r}
        return cls(targets=tuple(tensors), r=r, alpha=float(r), rank_pattern=pattern, bias="lora_only" if biases else "none",
                   alpha_pattern={k: float(v) for k, v in pattern.items()})


class LoRAPiece(Piece):
    supported: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D", "Embedding")
    mergeable: ClassVar[bool] = True
    low_rank: ClassVar[bool] = True

    def __init__(self, base: nn.Module, path: str, cfg: LoRA) -> None:
        if cfg.dora != self.needs_base:
            raise ConfigError(f"{type(self).__name__} does not build LoRA(dora={cfg.dora}) pieces; use cfg.piece_class(module)")
        super().__init__(base, path, cfg)
        w = self.layout.weight(base).detach()
        d_out, d_in = w.shape
        if cfg.r > min(d_out, d_in):
            raise TargetError(f"LoRA rank r={cfg.r} exceeds min(out={d_out}, in={d_in}) of module {path!r}; lower r or use rank_pattern")
        self.scale = cfg.scale
        self.p = cfg.dropout
        dtype = master_dtype(w.dtype)
        a, b = self._initial_factors(w, cfg, dtype)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(b)
        if cfg.init in OFFSET_INITS:
            self.register_buffer("init_A", a.clone())
            self.register_buffer("init_B", b.clone())
        if cfg.dora:
            self.magnitude = nn.Parameter(self._row_norm(w.to(dtype)))
            self._norm_key: tuple | None = None
            self._norm_cache: Tensor | None = None
        self.add_bias_delta(self.layout.bias(base), cfg.bias == "lora_only", dtype)

    def _initial_factors(self, w: Tensor, cfg: LoRA, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        d_out, d_in = w.shape
        if cfg.init == "pissa" or cfg.init == "milora":
            a, b = svd_factors(w, cfg.r, cfg.scale, minor=cfg.init == "milora")
        elif cfg.init == "olora":
            a, b = qr_factors(w, cfg.r)
        elif cfg.init == "gaussian":
            a = torch.randn(cfg.r, d_in, device=w.device) / cfg.r
            b = torch.zeros(d_out, cfg.r, device=w.device)
        elif self.layout.module_type == "Embedding":  # lookup tables: A = 0, B ~ N(0, 1)
            a = torch.zeros(cfg.r, d_in, device=w.device)
            b = torch.randn(d_out, cfg.r, device=w.device)
        else:
            a = kaiming_a(cfg.r, d_in, torch.float32, w.device)
            b = torch.zeros(d_out, cfg.r, device=w.device)
        return a.to(dtype).contiguous(), b.to(dtype).contiguous()

    # --- the low-rank factors in use -----------------------------------------------------------
    def factors(self) -> tuple[Tensor, Tensor]:
        """(A, B) of the whole update; with a weight-derived init, [A; A0] and [B, -B0] so ΔW(0) = 0."""
        if hasattr(self, "init_A"):
            return torch.cat([self.lora_A, self.init_A]), torch.cat([self.lora_B, -self.init_B], 1)
        return self.lora_A, self.lora_B

    @torch.no_grad()
    def set_factors(self, a: Tensor, b: Tensor) -> None:
        """Start from factors computed elsewhere (A [r, in], B [out, r]; data-driven inits). A piece with a frozen
        offset (init="given") keeps a copy of them, so ΔW stays 0 until training moves A or B."""
        if tuple(a.shape) != tuple(self.lora_A.shape) or tuple(b.shape) != tuple(self.lora_B.shape):
            raise ShapeMismatchError(f"LoRA factors for {self.path!r} must be A {tuple(self.lora_A.shape)} and B "
                                     f"{tuple(self.lora_B.shape)}, got {tuple(a.shape)} and {tuple(b.shape)}")
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)
        if hasattr(self, "init_A"):
            self.init_A.copy_(a)
            self.init_B.copy_(b)

    def fast_params(self):
        return (self.lora_B,)

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        a, b = self.factors()
        p = self.p if self.training else 0.0
        if self.cfg.dora:
            out = self._dora(x, base_out, acc, base, a, b, p)
        else:
            out = self._lora(x, acc, base, a, b, p)
        if hasattr(self, "bias"):
            out = out.add_(self.bias) if not torch.is_grad_enabled() else out + self.bias
        return out

    def _lora(self, x: Tensor, acc: Tensor, base: nn.Module, a: Tensor, b: Tensor, p: float) -> Tensor:
        dense = self.layout.module_type != "Embedding"
        same = acc.dtype == a.dtype and x.dtype == a.dtype
        # with dropout, grad-free training forwards (reentrant checkpointing) must draw the same masks as the
        # recomputation in backward, so they take the same path
        if dense and same and (torch.is_grad_enabled() or p > 0):
            return LoRAFunction.apply(x, acc, a, b, self.scale, p)
        if dense and same and acc.is_contiguous():  # inference: add s · x Aᵀ Bᵀ into the output in place
            t = self.layout.project(base, x.reshape(-1, x.shape[-1]), a)
            acc.view(-1, acc.shape[-1]).addmm_(t, b.t(), alpha=self.scale)
            return acc
        xin = x.to(a.dtype) if dense else x
        if p > 0 and dense:  # an Embedding's input is indices: no input dropout (as in PEFT)
            xin = F.dropout(xin, p, True)
        t = self.layout.project(base, xin, a)
        if same and not torch.is_grad_enabled() and acc.is_contiguous():
            acc.view(-1, acc.shape[-1]).addmm_(t.reshape(-1, t.shape[-1]), b.t(), alpha=self.scale)
            return acc
        return acc + (t @ b.t() * self.scale).to(acc.dtype)

    # --- DoRA: y = m / ‖W + sBA‖_row ⊙ (x (W + sBA)ᵀ) + bias ---------------------------------------
    @staticmethod
    def _row_norm(w: Tensor) -> Tensor:
        return torch.linalg.vector_norm(w, dim=1)

    def _weight_norm(self, base: nn.Module, a: Tensor, b: Tensor) -> Tensor:
        w = self.layout.weight(base)
        return self._row_norm(w.to(a.dtype) + self.scale * (b @ a)).detach()

    def _cached_norm(self, base: nn.Module, a: Tensor, b: Tensor) -> Tensor:
        w = base.weight
        key = (w.data_ptr(), w._version, self.lora_A.data_ptr(), self.lora_A._version, self.lora_B.data_ptr(),
               self.lora_B._version, a.shape[0])
        if self.training or self._norm_key != key or self._norm_cache is None:
            self._norm_cache = self._weight_norm(base, a, b)
            self._norm_key = key
        return self._norm_cache

    def _dora(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module, a: Tensor, b: Tensor, p: float) -> Tensor:
        bias = self.layout.bias(base)
        if not torch.is_grad_enabled() and p == 0:  # with dropout: the same path as in grad mode (same masks)
            mag = self.magnitude / self._cached_norm(base, a, b)
            if acc is base_out and acc.dtype == a.dtype == x.dtype and acc.is_contiguous():  # alone: in place
                t = self.layout.project(base, x.reshape(-1, x.shape[-1]), a)
                acc.view(-1, acc.shape[-1]).addmm_(t, b.t(), alpha=self.scale).mul_(mag)
                return acc.add_(bias * (1 - mag)) if bias is not None else acc
            t = self.layout.project(base, x.to(a.dtype), a)
            lora = t @ b.t()
            if acc is base_out and acc.dtype == lora.dtype:  # alone: one pass, in place
                acc.add_(lora, alpha=self.scale).mul_(mag)
                return acc.add_(bias * (1 - mag)) if bias is not None else acc
            plain = base_out - bias if bias is not None else base_out
            return acc.add_(((mag - 1) * plain + mag * self.scale * lora).to(acc.dtype))
        # A grad-mode forward precedes optimizer steps, and fused optimizers (HF Trainer's default) update
        # parameters without bumping their version counters: drop the inference cache here.
        self._norm_cache = None
        mag = self.magnitude / self._weight_norm(base, a, b)
        if p > 0:  # as in PEFT: with dropout the magnitude term uses the dropped input
            x = F.dropout(x.to(a.dtype), p, True)
            plain = self.layout.matmul(base, x, self.layout.weight(base).to(a.dtype))
        else:
            plain = base_out - bias if bias is not None else base_out
        lora = self.layout.project(base, x.to(a.dtype), a) @ b.t()
        return acc + ((mag - 1) * plain + mag * self.scale * lora).to(acc.dtype)

    def train(self, mode: bool = True) -> "LoRAPiece":
        if self.cfg.dora:  # parameters may have changed in ways version counters miss (fused optimizers)
            self._norm_cache = None
        return super().train(mode)

    # --- the update -----------------------------------------------------------------------------
    @classmethod
    def update(cls, state: dict[str, Tensor], cfg: LoRA, layout: Layout, weight: Tensor | None = None,
               bias: Tensor | None = None) -> tuple[DeltaTensor, Tensor | None]:
        return low_rank_update(state, cfg), state.get("bias")

    @classmethod
    def tensors_to_state(cls, dw: DeltaTensor, db: Tensor | None, layout: Layout) -> dict[str, Tensor]:
        if not isinstance(dw, LowRankDelta):
            raise UnsupportedError(f"LoRA stores low-rank updates; got a {type(dw).__name__} (refactor it with .svd(rank))")
        state = {"lora_A": dw.A.contiguous(), "lora_B": (dw.B * dw.scale).contiguous()}  # scale folded into B
        if db is not None:
            state["bias"] = db
        return state


def low_rank_update(state: dict[str, Tensor], cfg: LoRA) -> LowRankDelta:
    """s · B A from saved factors; with a frozen init offset, [A; A0] and [B, -B0] so ΔW(0) = 0."""
    a, b = state["lora_A"], state["lora_B"]
    if "init_A" in state:
        a, b = torch.cat([a, state["init_A"]]), torch.cat([b, -state["init_B"]], 1)
    return LowRankDelta(a, b, cfg.scale)


class DoRAPiece(LoRAPiece):
    """LoRA with dora=True: the update rescales rows of W + sBA, so it needs the base weight."""

    supported: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")
    needs_base: ClassVar[bool] = True
    low_rank: ClassVar[bool] = False

    @classmethod
    def update(cls, state: dict[str, Tensor], cfg: LoRA, layout: Layout, weight: Tensor | None = None,
               bias: Tensor | None = None) -> tuple[DeltaTensor, Tensor | None]:
        if weight is None:
            raise UnsupportedError("DoRA's update depends on the base weight; pass it (base=)")
        return dora_update(low_rank_update(state, cfg), state["magnitude"], weight), state.get("bias")


def dora_update(low: LowRankDelta, magnitude: Tensor, w: Tensor) -> DenseDelta:
    """DoRA's exact ΔW against base weight w: m ⊙ (W + sBA)/‖W + sBA‖_row − W."""
    dtype = torch.promote_types(low.A.dtype, torch.float32)  # half-precision files: cancel in float32, not bf16
    w = w.to(dtype)
    merged = w + low.to_dense().to(dtype)
    mag = magnitude.to(dtype) / torch.linalg.vector_norm(merged, dim=1)
    return DenseDelta(mag[:, None] * merged - w)
