"""Ternary: a stored ΔW whose entries are 0 or ±one scale per module — the compact storage of ComPEFT results.

Files hold, per module (all in the [out, in] view of the weight, numel = out·in entries):

* `mask`  uint8 [⌈numel/8⌉]: which entries are non-zero, one bit per entry in row-major order. Little bit order:
  entry i is bit (i mod 8) of byte ⌊i/8⌋, i.e. `(mask[i // 8] >> (i % 8)) & 1`; padding bits are 0.
* `signs` uint8 [⌈nnz/8⌉]: one bit per non-zero entry, in mask order (increasing flat index), same bit order;
  1 = negative. nnz is the number of set bits in `mask`.
* `scale` float32 scalar: the magnitude s of every non-zero entry (ComPEFT's α·σ).
* `shape` int64 [2]: [out, in]; and, optionally, `bias` float32 [out], a Δb.

So ΔW[i] = mask_i · (−1)^sign · s, about numel/8 + nnz/8 + 20 bytes a module. There are no trainable parameters:
a ternary delta is a finished update, for shipping and serving; attached fresh (without a file) it is the zero
update (scale 0). To train further, convert it (`Delta.tensors()` gives SparseDelta updates).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig, register
from ..core.schema import Patterns, Range
from ..core.errors import CorruptFileError, ShapeMismatchError, TargetError, UnsupportedError
from ..core.layouts import Layout
from ..core.piece import Piece, add_product
from ..core.targeting import pattern_value
from ..core.tensors import DeltaTensor, SparseDelta


# --- bit packing (vectorised) ---------------------------------------------------------------------------
def pack_bits(bits: Tensor) -> Tensor:
    """A bool tensor of n entries (flattened) as uint8 [⌈n/8⌉]: entry i is bit i % 8 of byte i // 8."""
    flat = bits.reshape(-1).to(torch.uint8)
    n = flat.numel()
    padded = torch.zeros(math.ceil(n / 8) * 8, dtype=torch.uint8, device=flat.device)
    padded[:n] = flat
    shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    return torch.bitwise_left_shift(padded.view(-1, 8), shifts).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, n: int | None = None) -> Tensor:
    """The inverse of `pack_bits`: a bool tensor of the first n bits (default: all 8·len bits)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = torch.bitwise_and(torch.bitwise_right_shift(packed.reshape(-1, 1), shifts), 1).reshape(-1).bool()
    return bits if n is None else bits[:n]


def popcount(packed: Tensor) -> int:
    """Number of set bits."""
    return int(unpack_bits(packed).sum())


# --- the encoding -----------------------------------------------------------------------------------------
def one_magnitude(dw: DeltaTensor, where: str) -> float:
    """The common magnitude of the non-zero entries of a sparse update (0.0 if none); refuses anything else."""
    if not isinstance(dw, SparseDelta) or len(dw.shape) != 2:
        raise UnsupportedError(f"Ternary stores 2-D sparse updates whose non-zero entries are ±one scale; the update at "
                               f"{where!r} is a {type(dw).__name__} of shape {tuple(dw.shape)} — store it as kind "
                               f"'dense'/'sparse'/'lora', or compress it with method='compeft'")
    mags = dw.values.detach().abs().float()
    mags = mags[mags != 0]
    if not mags.numel():
        return 0.0
    lo, hi = float(mags.min()), float(mags.max())
    if lo != hi or not math.isfinite(hi):
        raise UnsupportedError(f"the update at {where!r} is not ternary: its non-zero entries have magnitudes from "
                               f"{lo:.6g} to {hi:.6g}, Ternary stores ±one scale per module — store it as kind "
                               f"'sparse', or compress it with method='compeft'")
    return hi


def encode(dw: SparseDelta, scale: float) -> dict[str, Tensor]:
    """mask, signs, scale and shape of a sparse update whose non-zero entries are ±scale (zeros are dropped)."""
    keep = dw.values != 0
    index, negative = dw.index[keep], dw.values[keep] < 0
    order = torch.argsort(index)
    bits = torch.zeros(math.prod(dw.shape), dtype=torch.bool, device=index.device)
    bits[index] = True
    return {"mask": pack_bits(bits), "signs": pack_bits(negative[order]),
            "scale": torch.tensor(scale, dtype=torch.float32), "shape": torch.tensor(dw.shape, dtype=torch.int64)}


def decode(mask: Tensor, signs: Tensor, dims: tuple[int, int], where: str) -> tuple[Tensor, Tensor]:
    """(sorted flat int64 index of the non-zero entries, bool: entry is negative); checks the bits are consistent."""
    numel = dims[0] * dims[1]
    if mask.dtype != torch.uint8 or signs.dtype != torch.uint8 or mask.dim() != 1 or signs.dim() != 1:
        raise CorruptFileError(f"the ternary delta at {where!r} needs 1-D uint8 mask and signs, got {mask.dtype} "
                               f"{tuple(mask.shape)} and {signs.dtype} {tuple(signs.shape)}; the file is damaged")
    if mask.numel() != math.ceil(numel / 8):
        raise ShapeMismatchError(f"the ternary delta at {where!r} has a {mask.numel()}-byte mask; a {dims} weight needs "
                                 f"{math.ceil(numel / 8)} — the file belongs to another model or is damaged")
    bits = unpack_bits(mask)
    index = torch.nonzero(bits, as_tuple=False).reshape(-1)
    nnz = index.numel()
    sign_bits = unpack_bits(signs)
    if (nnz and int(index[-1]) >= numel) or signs.numel() != math.ceil(nnz / 8) or bool(sign_bits[nnz:].any()):
        raise CorruptFileError(f"the ternary delta at {where!r} is inconsistent: its mask sets {nnz} bit(s) (padding "
                               f"bits must be 0) and needs {math.ceil(nnz / 8)} sign byte(s), the file holds "
                               f"{signs.numel()}; the file is damaged — compress the delta again")
    return index, sign_bits[:nnz]


def dims_of(shape: Tensor, where: str) -> tuple[int, int]:
    if shape.dtype.is_floating_point or shape.numel() != 2 or int(shape.min()) < 0:
        raise CorruptFileError(f"the ternary delta at {where!r} has shape {shape.tolist()}; expected [out, in]")
    return int(shape[0]), int(shape[1])


def to_sparse(state: dict[str, Tensor], where: str) -> SparseDelta:
    """The exact update of a saved ternary state: ±scale at the decoded indices."""
    dims = dims_of(state["shape"], where)
    index, negative = decode(state["mask"], state["signs"], dims, where)
    scale = state["scale"].float().reshape(())
    return SparseDelta(index, torch.where(negative, -scale, scale), dims)


# --- config and piece -----------------------------------------------------------------------------------
@register("ternary")
@dataclass(frozen=True)
class Ternary(DeltaConfig):
    """ΔW = ±scale on a bitmask of entries per module (see the module docstring); made by `Delta.from_tensors(...,
    kind="ternary")`, e.g. by ComPEFT. `k` is the number of non-zero entries per module, `k_pattern` overrides it per
    module (so the pieces know their sign-bit count before a file is read); `bias` adds a stored Δb."""

    packs: ClassVar[type] = SparseDelta
    k: Annotated[int, Range(0, unit="non-zero entries per module")] = 0
    k_pattern: Annotated[dict[str, int], Patterns(Range(0, unit="non-zero entries"))] = field(default_factory=dict)
    bias: bool = False

    def entries(self, path: str, numel: int) -> int:
        k = int(pattern_value(self.k_pattern, path, self.k))
        if k > numel:
            raise TargetError(f"Ternary k={k} exceeds the {numel} entries of the weight at {path!r}; the delta was made "
                              f"for another model")
        return k

    @classmethod
    def example(cls) -> "Ternary":
        return cls(k=4)  # k=0 holds no entry: a zero update

    def piece_class(self, module: Any = None) -> type[Piece]:
        return TernaryPiece

    @classmethod
    def for_tensors(cls, tensors: dict[str, DeltaTensor], biases: dict[str, Tensor]) -> "Ternary":
        ks = {}
        for path, dw in tensors.items():
            one_magnitude(dw, path)
            ks[path] = int((dw.values != 0).sum())  # type: ignore[attr-defined]
        k = Counter(ks.values()).most_common(1)[0][0] if ks else 0
        return cls(targets=tuple(tensors), k=k, bias=bool(biases),
                   k_pattern={re.escape(p): n for p, n in ks.items() if n != k})


class TernaryPiece(Piece):
    supported: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")
    mergeable: ClassVar[bool] = True
    zero_if_missing: ClassVar[tuple[str, ...]] = ("bias",)  # merged/compressed files hold Δb only where it is not 0

    def __init__(self, base: nn.Module, path: str, cfg: Ternary) -> None:
        super().__init__(base, path, cfg)
        w = self.layout.weight(base)
        self.dims = (int(w.shape[0]), int(w.shape[1]))
        k = cfg.entries(path, w.numel())
        bits = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
        bits[:k] = True  # a consistent placeholder until a file is loaded; scale 0 makes it the zero update
        self.register_buffer("mask", pack_bits(bits))
        self.register_buffer("signs", torch.zeros(math.ceil(k / 8), dtype=torch.uint8, device=w.device))
        self.register_buffer("scale", torch.zeros((), dtype=torch.float32, device=w.device))
        self.register_buffer("shape", torch.tensor(self.dims, dtype=torch.int64))
        bias = self.layout.bias(base)
        if cfg.bias and bias is not None:
            self.register_buffer("bias", torch.zeros(bias.shape, dtype=torch.float32, device=w.device))
        self._dense: tuple[tuple[Any, ...], Tensor] | None = None  # (buffer versions, ΔW) — not saved

    @property
    def k(self) -> int:
        return popcount(self.mask)


    def live_update(self, base: nn.Module, weight: Tensor | None = None,
                    bias: Tensor | None = None) -> tuple[DeltaTensor, Tensor | None]:
        self._dense = None  # asked for its update to be merged: the decoded copy for forward is not needed then
        return super().live_update(base, weight, bias)
    def _key(self) -> tuple[Any, ...] | None:
        """Identifies the buffers' current contents (rebuilt after load_state_dict, in-place edits or .to()), and
        whether inference mode is on: a ΔW made there cannot be saved for backward outside it."""
        try:
            buffers = tuple((t._version, t.data_ptr(), t.device) for t in (self.mask, self.signs, self.scale))
        except RuntimeError:  # buffers made in inference mode keep no version counter: do not cache
            return None
        return buffers, torch.is_inference_mode_enabled()

    def dense_weight(self) -> Tensor:
        """ΔW as a dense float32 [out, in] tensor, decoded once and kept until the buffers change."""
        key = self._key()
        if self._dense is not None and key is not None and self._dense[0] == key:
            return self._dense[1]
        w = to_sparse({"mask": self.mask, "signs": self.signs, "scale": self.scale, "shape": self.shape},
                      self.path).to_dense()
        self._dense = None if key is None else (key, w)
        return w

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        return add_product(acc, x, self.dense_weight(), getattr(self, "bias", None))

    def extra_repr(self) -> str:
        return f"path={self.path!r}, shape={self.dims}, signs={self.signs.numel()} bytes"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Refuse a saved state that does not fit this weight or whose bits disagree, before anything is copied."""
        shape = state_dict.get(prefix + "shape")
        if shape is not None and dims_of(shape, self.path) != self.dims:
            raise ShapeMismatchError(f"the ternary delta at {self.path!r} was saved for a weight of shape "
                                     f"{tuple(shape.tolist())}, this module's is {self.dims}; load it into the model "
                                     f"it was made for")
        mask, signs = state_dict.get(prefix + "mask"), state_dict.get(prefix + "signs")
        if mask is not None and signs is not None:
            decode(mask, signs, self.dims, self.path)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def update(cls, state: dict[str, Tensor], cfg: DeltaConfig, layout: Layout, weight: Tensor | None = None,
               bias: Tensor | None = None) -> tuple[DeltaTensor, Tensor | None]:
        return to_sparse(state, "a ternary module"), state.get("bias")

    @classmethod
    def tensors_to_state(cls, dw: DeltaTensor, db: Tensor | None, layout: Layout) -> dict[str, Tensor]:
        state = encode(dw, one_magnitude(dw, "a ternary module"))  # type: ignore[arg-type]
        if db is not None:
            state["bias"] = db.detach().float().contiguous()
        return state
