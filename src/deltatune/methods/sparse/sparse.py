"""Sparse: ΔW with k trainable (index, value) pairs per weight — the storage of LT-SFT, SpIEL and SHiRA.

Files hold `index` (int64, flat row-major in the [out, in] view) and `values`; the delta's weight update is
a SparseDelta, so sparse deltas add exactly, merge exactly and take part in every merge method.
With `regrow_every` set the entries move during training (SpIEL drop/regrow, see spiel.py); the schedule is
part of the config, so it is saved with the delta.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, get_args

import torch
from torch import Tensor, nn

from ...core.config import DeltaConfig, check_count_or_fraction, register
from ...core.schema import Fraction, NoneMeans, OneOf, Patterns, PositiveInt, Range
from ...core.errors import ConfigError, ShapeMismatchError, TargetError, UnsupportedError
from ...core.layouts import Layout
from ...core.piece import Piece, add_product, master_dtype
from ...core.targeting import pattern_value
from ...core.tensors import DeltaTensor, SparseDelta
from . import spiel
from .autograd import SparseLinearFunction, scatter_dense

Mask = Literal["random", "magnitude"]
MASKS = get_args(Mask)


@register("sparse")
@dataclass(frozen=True)
class Sparse(DeltaConfig):
    """k trainable entries per targeted weight, chosen by `mask` (seeded random, or largest |W|).

    Give `k` (entries per weight) or `density` (fraction of each weight); `k_pattern` overrides k per module
    (PEFT's pattern rule, as LoRA's rank_pattern).

    SpIEL: with `regrow_every` = N, every N training steps each weight drops its ⌊k·p⌋ smallest-|value| entries
    and regrows as many by a gradient score gathered over the last `regrow_window` steps: `regrow` =
    "accumulated" (SpIEL-AG, |Σ grad|) or "momentum" (SpIEL-MA, row × column second moments, memory-lean).
    p starts at `regrow_fraction` and decays to 0 over training by `regrow_decay` ("linear", "cosine",
    "constant"). Training loops call the pieces' step hooks (dt.train and train.callback.DeltaCallback do)."""

    k: PositiveInt | None = None
    density: Fraction | None = None
    mask: Mask = "random"
    seed: int = 0
    bias: bool = False
    k_pattern: Annotated[dict[str, int], Patterns(Range(1))] = field(default_factory=dict)
    stores: ClassVar[type] = SparseDelta
    regrow_every: Annotated[int | None, Range(1, unit="steps"), NoneMeans("no regrowth")] = None
    regrow: Annotated[str, OneOf(spiel.REGROWS)] = "accumulated"
    regrow_fraction: Fraction = 0.2
    regrow_decay: Annotated[str, OneOf(spiel.DECAYS)] = "linear"
    regrow_window: Annotated[int, Range(1, unit="steps")] = 5

    def validate(self) -> None:
        check_count_or_fraction("Sparse", ("k", self.k, "entries per weight"), ("density", self.density, "fraction"))
        if self.regrow_every is not None and self.regrow_window > self.regrow_every:
            raise ConfigError(f"Sparse.regrow_window={self.regrow_window} exceeds regrow_every={self.regrow_every}; "
                              f"statistics are gathered within each interval — lower regrow_window")

    def entries(self, path: str, numel: int) -> int:
        """k for the module at `path` whose weight has `numel` entries."""
        if self.density is not None and not self.k_pattern:
            return max(1, round(self.density * numel))
        k = int(pattern_value(self.k_pattern, path, self.k if self.k is not None else round(self.density * numel)))
        if k > numel:
            raise TargetError(f"Sparse k={k} exceeds the {numel} entries of the weight at {path!r}; lower k")
        return max(1, k)

    @classmethod
    def example(cls) -> "Sparse":
        return cls(density=0.1)  # k or density is required

    def piece_class(self, module: Any = None) -> type[Piece]:
        return SparsePiece

    @classmethod
    def for_tensors(cls, tensors: dict[str, DeltaTensor], biases: dict[str, Tensor]) -> "Sparse":
        ks = {p: t.nnz for p, t in tensors.items()}
        k = max(ks.values(), default=1)
        return cls(targets=tuple(tensors), k=k, bias=bool(biases),
                   k_pattern={re.escape(p): n for p, n in ks.items() if n != k})


def check_index(index: Tensor, size: int, where: str) -> None:
    """Saved positions must be integers in [0, size), each at most once; else the file is damaged."""
    if not index.numel():
        return
    if index.is_floating_point() or int(index.min()) < 0 or int(index.max()) >= size:
        raise ShapeMismatchError(f"{where} holds positions outside [0, {size}); the file is damaged or belongs to "
                                 f"another model")
    if torch.unique(index).numel() != index.numel():
        raise ShapeMismatchError(f"{where} holds repeated positions; each may appear once — the file is damaged")


def path_seed(seed: int, path: str) -> int:
    """A per-module seed that does not depend on Python's hash randomisation."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{path}".encode()).digest()[:7], "little")


def initial_index(w: Tensor, k: int, mask: str, seed: int, path: str) -> Tensor:
    """Sorted flat indices of the k entries chosen by `mask` for the weight w ([out, in] view)."""
    if mask == "magnitude":
        idx = torch.topk(w.detach().abs().reshape(-1).float(), k).indices
    else:
        gen = torch.Generator().manual_seed(path_seed(seed, path))
        idx = torch.randperm(w.numel(), generator=gen)[:k].to(w.device)
    return torch.sort(idx).values


class SparsePiece(Piece):
    supported: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")
    mergeable: ClassVar[bool] = True
    zero_if_missing: ClassVar[tuple[str, ...]] = ("bias",)  # merged/compressed files hold Δb only where it is not 0

    def __init__(self, base: nn.Module, path: str, cfg: Sparse) -> None:
        super().__init__(base, path, cfg)
        w = self.layout.weight(base)
        self.dims = (int(w.shape[0]), int(w.shape[1]))
        self.register_buffer("shape", torch.tensor(self.dims, dtype=torch.int64))  # saved, so files need no model
        k = cfg.entries(path, w.numel())
        dtype = master_dtype(w.dtype)
        self.register_buffer("index", initial_index(w, k, cfg.mask, cfg.seed, path))
        self.values = nn.Parameter(torch.zeros(k, dtype=dtype, device=w.device))
        self.add_bias_delta(self.layout.bias(base), cfg.bias, dtype)
        self._stats: spiel.GradientSum | spiel.RowColSquares | None = None  # only within a regrow window

    @property
    def k(self) -> int:
        return int(self.index.numel())

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        bias = getattr(self, "bias", None)
        if not torch.is_grad_enabled():
            return add_product(acc, x, scatter_dense(self.index, self.values, self.dims), bias)
        out = SparseLinearFunction.apply(x, acc, self.index, self.values, self.dims, self._stats)
        return out + bias.to(out.dtype) if bias is not None else out

    def extra_repr(self) -> str:
        return f"path={self.path!r}, k={self.k}, shape={self.dims}"

    # --- SpIEL drop/regrow (training hooks of the contract) -----------------------------------------
    def before_step(self, step: int, total: int | None = None) -> None:
        self._open_window(step, total)

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer | None, step: int, total: int | None = None) -> None:
        cfg = self.cfg
        every = cfg.regrow_every
        if every is not None and step % every == 0 and (total is None or step < total):
            stats, self._stats = self._stats, None
            if stats is not None and stats.count:
                n = spiel.count(self.k, spiel.fraction(cfg.regrow_fraction, cfg.regrow_decay, step, total))
                spiel.regrow(self.index, self.values, stats, n, optimizer)
        self._open_window(step, total)

    def _open_window(self, step: int, total: int | None) -> None:
        """Gather statistics in the step after `step` steps done when it leads up to a regrow; else free them."""
        cfg = self.cfg
        if cfg.regrow_every is not None and spiel.in_window(step, cfg.regrow_every, cfg.regrow_window, total):
            if self._stats is None:
                self._stats = spiel.new_stats(cfg.regrow)
        else:
            self._stats = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Refuse saved entries that do not fit this weight, before anything is copied."""
        index, shape = state_dict.get(prefix + "index"), state_dict.get(prefix + "shape")
        if shape is not None and tuple(int(s) for s in shape.tolist()) != self.dims:
            raise ShapeMismatchError(f"the sparse delta at {self.path!r} was saved for a weight of shape "
                                     f"{tuple(shape.tolist())}, this module's is {self.dims}; load it into the model "
                                     f"it was trained on")
        if index is not None:
            check_index(index, self.dims[0] * self.dims[1], f"the sparse delta at {self.path!r}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def update(cls, state: dict[str, Tensor], cfg: DeltaConfig, layout: Layout, weight: Tensor | None = None,
               bias: Tensor | None = None) -> tuple[DeltaTensor, Tensor | None]:
        # copies: SpIEL moves entries of a live piece in place
        dims = tuple(int(s) for s in state["shape"])
        return SparseDelta(state["index"].clone(), state["values"].clone(), dims), state.get("bias")

    @classmethod
    def tensors_to_state(cls, dw: DeltaTensor, db: Tensor | None, layout: Layout) -> dict[str, Tensor]:
        if not isinstance(dw, SparseDelta):
            raise UnsupportedError(f"Sparse stores sparse updates; got a {type(dw).__name__} (use SparseDelta.from_dense)")
        order = torch.argsort(dw.index)
        state = {"index": dw.index[order].contiguous(), "values": dw.values[order].contiguous(),
                 "shape": torch.tensor(dw.shape, dtype=torch.int64)}
        if db is not None:
            state["bias"] = db.contiguous()
        return state
