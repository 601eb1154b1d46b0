"""PaCA (partial connection adaptation, Woo et al., ICLR 2025): train r randomly chosen input columns of each weight.

ΔW is zero outside a fixed, seeded set of r columns; inside them it is a trainable [out, r] block V, so the
module computes y = x Wᵀ + x[..., cols] Vᵀ. Backward needs only the partial activation x[..., cols] ([N, r])
for V's gradient — not the whole input as a LoRA branch does — which is PaCA's activation-memory saving.
The update is a SparseDelta on the rows × cols grid, so PaCA deltas merge, add and compose exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...core.config import DeltaConfig, check_count_or_fraction, register
from ...core.schema import Fraction, PositiveInt
from ...core.errors import TargetError, UnsupportedError
from ...core.layouts import Layout
from ...core.piece import Piece, add_to, master_dtype
from ...core.tensors import DeltaTensor, SparseDelta
from .sparse import check_index, path_seed


DEFAULT_R = 8


@register("paca")
@dataclass(frozen=True)
class PaCA(DeltaConfig):
    """r trainable input columns per targeted weight (default 8), or `fraction` of the columns, drawn from `seed`."""

    r: PositiveInt | None = None
    fraction: Fraction | None = None
    seed: int = 0
    bias: bool = False

    def __post_init__(self) -> None:
        if self.r is None and self.fraction is None:
            object.__setattr__(self, "r", DEFAULT_R)
        super().__post_init__()

    def validate(self) -> None:
        check_count_or_fraction("PaCA", ("r", self.r, "columns per weight"), ("fraction", self.fraction, "of the columns"))

    def columns(self, path: str, d_in: int) -> int:
        """r for the module at `path` whose weight has `d_in` input columns."""
        if self.fraction is not None:
            return max(1, round(self.fraction * d_in))
        if self.r > d_in:  # type: ignore[operator]
            raise TargetError(f"PaCA r={self.r} exceeds the {d_in} input columns of the weight at {path!r}; lower r "
                              f"or give fraction=")
        return int(self.r)  # type: ignore[arg-type]

    def piece_class(self, module: Any = None) -> type[Piece]:
        return PaCAPiece


def initial_columns(d_in: int, r: int, seed: int, path: str) -> Tensor:
    """Sorted indices of r input columns drawn without replacement from a per-module seed."""
    gen = torch.Generator().manual_seed(path_seed(seed, path))
    return torch.sort(torch.randperm(d_in, generator=gen)[:r]).values


class PaCAPiece(Piece):
    supported: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")
    mergeable: ClassVar[bool] = True

    def __init__(self, base: nn.Module, path: str, cfg: PaCA) -> None:
        super().__init__(base, path, cfg)
        w = self.layout.weight(base)
        self.dims = (int(w.shape[0]), int(w.shape[1]))
        r = cfg.columns(path, self.dims[1])
        dtype = master_dtype(w.dtype)
        self.register_buffer("shape", torch.tensor(self.dims, dtype=torch.int64))  # saved, so files need no model
        self.register_buffer("cols", initial_columns(self.dims[1], r, cfg.seed, path).to(w.device))
        self.block = nn.Parameter(torch.zeros(self.dims[0], r, dtype=dtype, device=w.device))  # ΔW[:, cols]
        self.add_bias_delta(self.layout.bias(base), cfg.bias, dtype)

    @property
    def r(self) -> int:
        return int(self.cols.numel())

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        # index_select saves only the index for its backward; the matmul saves the [N, r] partial input
        part = x.index_select(-1, self.cols).to(self.block.dtype)
        contrib = part @ self.block.t()
        if hasattr(self, "bias"):
            contrib = contrib + self.bias
        return add_to(acc, contrib)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, r={self.r}, shape={self.dims}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Refuse saved columns that do not fit this weight, before anything is copied."""
        cols = state_dict.get(prefix + "cols")
        if cols is not None:
            check_index(cols, self.dims[1], f"the PaCA delta at {self.path!r}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def update(cls, state: dict[str, Tensor], cfg: DeltaConfig, layout: Layout, weight: Tensor | None = None,
               bias: Tensor | None = None) -> tuple[DeltaTensor, Tensor | None]:
        dims = (int(state["shape"][0]), int(state["shape"][1]))
        return grid_delta(state["cols"], state["block"], dims), state.get("bias")

    @classmethod
    def tensors_to_state(cls, dw: DeltaTensor, db: Tensor | None, layout: Layout) -> dict[str, Tensor]:
        """The inverse of update: a SparseDelta whose entries are exactly every row of a set of columns."""
        if not isinstance(dw, SparseDelta):
            raise UnsupportedError(f"PaCA stores column blocks as a SparseDelta over rows × columns; got a "
                                   f"{type(dw).__name__}")
        out, d_in = dw.shape
        order = torch.argsort(dw.index)
        index, values = dw.index[order], dw.values[order]
        cols = index[index < d_in]
        if out * cols.numel() != index.numel() or not torch.equal(grid_index(cols, out, d_in), index):
            raise UnsupportedError("this SparseDelta is not a full block of columns (every row of a set of columns); "
                                   "store it with the sparse kind instead")
        state = {"shape": torch.tensor(dw.shape, dtype=torch.int64), "cols": cols.contiguous(),
                 "block": values.view(out, cols.numel()).contiguous()}
        if db is not None:
            state["bias"] = db.contiguous()
        return state


def grid_index(cols: Tensor, out: int, d_in: int) -> Tensor:
    """Flat row-major indices of rows 0..out-1 × `cols` (sorted cols give sorted indices)."""
    rows = torch.arange(out, dtype=torch.int64, device=cols.device)
    return (rows[:, None] * d_in + cols.to(torch.int64)[None, :]).reshape(-1)


def grid_delta(cols: Tensor, block: Tensor, dims: tuple[int, int]) -> SparseDelta:
    """ΔW with `block` [out, r] in columns `cols` and zeros elsewhere."""
    return SparseDelta(grid_index(cols, dims[0], dims[1]), block.reshape(-1).clone(), dims)
