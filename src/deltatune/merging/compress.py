"""Compressing a delta module by module: ComPEFT (top-k entries, ternary values) and SVD rank reduction.

`compress(delta, "compeft")` keeps, per tensor, the k = density·numel entries of largest |·| and replaces each by
α·σ·sign, σ the standard deviation of the original tensor (Yadav et al. 2023, "ComPEFT"). On ΔW the result is a
ternary delta (a 1-bit mask, one sign bit per kept entry and one scale: methods/ternary.py); on the factors of a
low-rank delta (A and B separately) it stays a low-rank delta.
`compress(delta, "svd")` and `to_lora(delta)` factor every update into a low-rank one (Eckart–Young optimal).
Both return the new Delta and a `Report`: bytes the files hold before and after, and ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..core.config import packed_kind, storage_kind
from ..io.delta import BaseWeights, Delta, base_lookup
from ..core.errors import ConfigError, NotSmallerWarning
from ..core.tensors import DeltaTensor, LowRankDelta, SparseDelta

METHODS = ("compeft", "svd")
TARGETS = ("delta_w", "factors")
#: bytes of the one scale an ideal ternary encoding stores per tensor (float32)
SCALE_BYTES = 4


# --- report ------------------------------------------------------------------------------------------
@dataclass
class ModuleReport:
    """One module: what its files hold before/after and how far the new update is from the old one."""

    path: str
    kind: str                       # storage kind of the result, e.g. "ternary", "lora" or "dense"
    original_bytes: int
    bytes: int
    norm: float                     # ‖ΔW‖_F
    error: float                    # ‖ΔW − ΔŴ‖_F
    rank: int | None = None
    nnz: int | None = None
    ternary_bytes: int | None = None  # a ternary encoding not written (ComPEFT on factors), see docs/merging.md

    @property
    def rel_error(self) -> float:
        return _relative(self.error, self.norm)


@dataclass
class Report:
    """Per-module rows, totals and free-form notes (skipped modules, changes a delta cannot hold)."""

    title: str
    modules: list[ModuleReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def original_bytes(self) -> int:
        return sum(m.original_bytes for m in self.modules)

    @property
    def bytes(self) -> int:
        return sum(m.bytes for m in self.modules)

    @property
    def ratio(self) -> float:
        """Original bytes over compressed bytes (> 1 means smaller)."""
        return self.original_bytes / self.bytes if self.bytes else math.inf

    @property
    def rel_error(self) -> float:
        """‖ΔW − ΔŴ‖_F / ‖ΔW‖_F over all modules together."""
        return _relative(math.sqrt(sum(m.error ** 2 for m in self.modules)), math.sqrt(sum(m.norm ** 2 for m in self.modules)))

    @property
    def smaller(self) -> bool:
        """True when the result's tensors take fewer bytes than the input's."""
        return self.bytes < self.original_bytes

    @property
    def ternary_bytes(self) -> int | None:
        if not self.modules or any(m.ternary_bytes is None for m in self.modules):
            return None
        return sum(m.ternary_bytes for m in self.modules)  # type: ignore[misc]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"title": self.title, "original_bytes": self.original_bytes, "bytes": self.bytes,
                               "ratio": self.ratio, "rel_error": self.rel_error, "notes": list(self.notes),
                               "modules": [{**asdict(m), "rel_error": m.rel_error} for m in self.modules]}
        if self.ternary_bytes is not None:
            out["ternary_bytes"] = self.ternary_bytes
            out["ternary_ratio"] = self.original_bytes / self.ternary_bytes
        return out

    def render(self) -> str:
        width = max([len("module")] + [len(m.path) for m in self.modules])
        lines = [self.title, f"{'module':<{width}}  {'kind':<6} {'rank/nnz':>9} {'bytes before':>13} {'bytes after':>12} {'rel. error':>11}"]
        for m in self.modules:
            size = m.rank if m.rank is not None else m.nnz
            lines.append(f"{m.path:<{width}}  {m.kind:<6} {'-' if size is None else size:>9} {m.original_bytes:>13,} "
                         f"{m.bytes:>12,} {m.rel_error:>11.3e}")
        lines.append(f"total: {self.original_bytes:,} -> {self.bytes:,} bytes (size ratio {self.ratio:.2f}x), "
                     f"relative error {self.rel_error:.3e}")
        if self.ternary_bytes is not None:
            lines.append(f"a ternary encoding of these tensors would hold {self.ternary_bytes:,} bytes "
                         f"(ratio {self.original_bytes / self.ternary_bytes:.2f}x)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _relative(error: float, norm: float) -> float:
    if norm > 0:
        return error / norm
    return 0.0 if error == 0 else math.inf


def state_bytes(state: dict[str, Tensor]) -> int:
    """Bytes of a module's saved tensors (what the safetensors file holds for it, headers aside)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def distance(old: DeltaTensor, new: DeltaTensor) -> tuple[float, float]:
    """(‖old‖_F, ‖old − new‖_F), in float64."""
    ref = old.to_dense().double()
    return float(torch.linalg.vector_norm(ref)), float(torch.linalg.vector_norm(ref - new.to_dense().double()))


# --- option checks ---------------------------------------------------------------------------------
def check_rank_options(rank: int | None, energy: float | None, *, required: bool) -> None:
    """rank is a positive integer, energy a fraction in (0, 1]; at most one of them (exactly one if required)."""
    if rank is not None and energy is not None:
        raise ConfigError(f"give either rank ({rank!r}) or energy ({energy!r}), not both: rank caps every module's "
                          f"rank, energy picks each module's rank from its singular values")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    if energy is not None and (not isinstance(energy, (int, float)) or isinstance(energy, bool)
                               or not 0.0 < energy <= 1.0):
        raise ConfigError(f"energy must be a fraction in (0, 1] of each update's squared Frobenius norm, got {energy!r}")
    if required and rank is None and energy is None:
        raise ConfigError("give a rank (e.g. rank=8) or an energy fraction (e.g. energy=0.9) for the SVD")


def _check_compeft(density: float, alpha: float, on: str) -> None:
    if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be a fraction in (0, 1] of each tensor's entries, got {density!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"alpha must be a finite positive number (ComPEFT's scale; 1.0 by default), got {alpha!r}")
    if on not in TARGETS:
        raise ConfigError(f"on must be one of {TARGETS} (compress ΔW itself, or the A and B factors), got {on!r}")


# --- ComPEFT ---------------------------------------------------------------------------------------
def ternarize(x: Tensor, density: float, alpha: float) -> tuple[Tensor, Tensor]:
    """ComPEFT on one tensor: flat indices (sorted, int64) of the k = round(density·numel) entries of largest |x|
    and their values α·σ·sign(x), σ = std of all of x (Bessel-corrected). Exactly k entries are kept (a kept entry
    that is 0 — only when x has fewer than k non-zeros — stores 0), so every tensor keeps a valid sparse shape."""
    flat = x.detach().reshape(-1).float()
    k = min(flat.numel(), max(1, round(density * flat.numel())))
    sigma = flat.std(correction=1 if flat.numel() > 1 else 0)
    index = torch.topk(flat.abs(), k, sorted=False).indices
    sign = torch.sign(flat[index])
    order = torch.argsort(index)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    return index[order], (alpha * sigma * sign[order]).to(dtype)


def ternary_bytes(numel: int, nnz: int) -> int:
    """An ideal ternary encoding: a 1-bit kept/dropped mask, one sign bit per kept entry and one float32 scale."""
    return math.ceil(numel / 8) + math.ceil(nnz / 8) + SCALE_BYTES


def _dense_ternary(x: Tensor, density: float, alpha: float) -> Tensor:
    index, values = ternarize(x, density, alpha)
    out = torch.zeros(x.numel(), dtype=values.dtype, device=x.device)
    out[index] = values
    return out.reshape(x.shape)


def compeft_delta_w(dw: DeltaTensor, density: float, alpha: float) -> tuple[SparseDelta, None]:
    """ComPEFT on the whole update ΔW: a SparseDelta of values ±α·σ (stored by the kind that packs such updates, ternary; nothing left unwritten)."""
    index, values = ternarize(dw.to_dense(), density, alpha)
    return SparseDelta(index, values, dw.shape), None


def compeft_factors(dw: DeltaTensor, density: float, alpha: float, path: str = "?") -> tuple[LowRankDelta, int]:
    """ComPEFT on A and B of a low-rank update separately (each with its own σ); the scale is kept."""
    if not isinstance(dw, LowRankDelta):
        raise ConfigError(f"on='factors' needs a low-rank update, but the update at {path!r} is a "
                          f"{type(dw).__name__}; use on='delta_w' for this delta")
    a, b = _dense_ternary(dw.A, density, alpha), _dense_ternary(dw.B, density, alpha)
    size = ternary_bytes(a.numel(), int((a != 0).sum())) + ternary_bytes(b.numel(), int((b != 0).sum()))
    return LowRankDelta(a, b, dw.scale), size


# --- SVD ---------------------------------------------------------------------------------------------
def choose_rank(s: Tensor, rank: int | None, energy: float | None, shape: tuple[int, ...]) -> int:
    """How many singular values (sorted, descending) to keep: the rank cap, the smallest rank whose share of
    Σ s² reaches `energy`, or (neither) the numerical rank — lossless up to float32 round-off."""
    n = s.numel()
    if rank is not None:
        return max(1, min(rank, n))
    power = s.double().square()
    total = float(power.sum())
    if total == 0 or n == 0:
        return 1
    if energy is not None:
        share = torch.cumsum(power, 0) / total
        return min(n, int((share < energy - 1e-12).sum()) + 1)
    tol = float(s.max()) * max(shape) * torch.finfo(torch.float32).eps
    return max(1, int((s > tol).sum()))


def low_rank(dw: DeltaTensor, rank: int | None = None, energy: float | None = None) -> LowRankDelta:
    """The best low-rank approximation of `dw` (Eckart–Young) at the rank `choose_rank` picks; scale 1."""
    full = dw.svd(min(dw.shape))  # every singular triplet: A = √s·Vᵀ, B = U·√s (QR-reduced for low-rank input)
    s = full.A.double().square().sum(1)  # rows of Vᵀ are unit vectors, so ‖A_i‖² = s_i
    k = choose_rank(s, rank, energy, dw.shape)
    return LowRankDelta(full.A[:k].contiguous(), full.B[:, :k].contiguous(), 1.0)


# --- the generic driver ----------------------------------------------------------------------------
Convert = Callable[[str, DeltaTensor], tuple[DeltaTensor, int | None]]


def convert(delta: Delta, fn: Convert, title: str, base: BaseWeights = None, progress: bool = False,
            kind: str | None = None) -> tuple[Delta, Report]:
    """Apply `fn(path, ΔW) -> (ΔŴ, ideal bytes or None)` to every module; the result keeps the biases and the base
    identity and is stored by the kind of ΔŴ, or by `kind` (see `Delta.from_tensors`). Nothing is written; errors
    leave `delta` as it was."""
    from ..core.progress import Progress

    lookup = base_lookup(base, delta.module_types)
    tensors: dict[str, DeltaTensor] = {}
    biases: dict[str, Tensor] = {}
    rows: dict[str, ModuleReport] = {}
    whole = {p: st for p, st in delta.state.items() if delta.config.saves_whole(p)}  # e.g. a new head: kept as is
    with Progress(len(delta.state), enabled=progress, description=title.split(":")[0]) as bar:
        for i, path in enumerate(p for p in delta.state if p not in whole):
            dw, db = delta.update(path, lookup)
            new, ideal = fn(path, dw)
            norm, error = distance(dw, new)
            tensors[path] = new
            if db is not None:
                biases[path] = db
            rows[path] = ModuleReport(path, kind or storage_kind(type(new)), state_bytes(delta.state[path]), 0, norm, error,
                                      rank=new.rank if isinstance(new, LowRankDelta) else None,
                                      nnz=new.nnz if isinstance(new, SparseDelta) else None, ternary_bytes=ideal)
            bar.update(i + 1)
    if not tensors:
        raise ConfigError(f"delta {delta.name!r} holds no module; nothing to compress")
    out = Delta.from_tensors(delta.name, tensors, biases, module_types=delta.module_types, base=delta.base,
                             whole=whole, modules_to_save=delta.config.modules_to_save, kind=kind)
    for path, row in rows.items():
        row.bytes = state_bytes(out.state[path])
    return out, Report(title, list(rows.values()))


def compress(delta: Delta, method: str = "compeft", *, density: float = 0.1, alpha: float = 1.0,
             on: str = "delta_w", rank: int | None = None, energy: float | None = None, base: BaseWeights = None,
             progress: bool = False) -> tuple[Delta, Report]:
    """Compress every module of a linear delta.

    method="compeft": per tensor keep the top `density` fraction by |·| as α·σ·sign (σ = std of the original
    tensor); on="delta_w" stores a ternary delta, on="factors" compresses A and B of a low-rank delta and stays
    low-rank. method="svd": a low-rank delta of rank ≤ `rank`, or of the smallest rank keeping `energy` of each
    ‖ΔW‖². `base` (a model, a model directory or path -> (W, b)) is needed for updates that depend on the base
    weights (DoRA, full copies).

    A result that is not smaller than the input (report.smaller False) gets a note in the report and a
    `NotSmallerWarning`."""
    result, report = _compress(delta, method, density=density, alpha=alpha, on=on, rank=rank, energy=energy,
                               base=base, progress=progress)
    if not report.smaller:
        message = not_smaller_message(report, method, on)
        report.notes.append(message)
        warnings.warn(NotSmallerWarning(message), stacklevel=2)
    return result, report


def not_smaller_message(report: Report, method: str, on: str) -> str:
    """Why a compression that did not shrink its input is useless, and what to try instead."""
    if method == "svd":
        hint = "give a lower rank or energy"
    elif on == "factors":
        hint = ("ComPEFT on the factors keeps them dense (the ternary encoding in the report is not written); use "
                "method svd with a lower rank for a low-rank delta")
    else:
        hint = ("ComPEFT on delta_w stores a mask over every entry of ΔW, which can exceed a low-rank delta's factors; "
                "use method svd with a lower rank for a low-rank delta, or a lower density")
    return (f"the compressed delta is not smaller than its input: {report.bytes:,} bytes for {report.original_bytes:,} "
            f"(size ratio {report.ratio:.2f}x) at relative error {report.rel_error:.3g}; {hint}")


def _compress(delta: Delta, method: str = "compeft", *, density: float = 0.1, alpha: float = 1.0,
              on: str = "delta_w", rank: int | None = None, energy: float | None = None, base: BaseWeights = None,
              progress: bool = False) -> tuple[Delta, Report]:
    """`compress` without the size check."""
    if method not in METHODS:
        raise ConfigError(f"unknown compression method {method!r}; choose one of {METHODS}")
    if method == "svd":
        check_rank_options(rank, energy, required=True)
        return convert(delta, lambda path, dw: (low_rank(dw, rank, energy), None),
                       f"svd: rank {rank}" if rank is not None else f"svd: energy {energy}", base, progress)
    _check_compeft(density, alpha, on)
    if rank is not None or energy is not None:
        raise ConfigError("rank/energy apply to method='svd'; ComPEFT takes density, alpha and on")
    title = f"compeft: density {density}, alpha {alpha}, on {on}"
    if on == "factors":
        return convert(delta, lambda path, dw: compeft_factors(dw, density, alpha, path), title, base, progress)
    return convert(delta, lambda path, dw: compeft_delta_w(dw, density, alpha), title, base, progress, kind=packed_kind(SparseDelta))


def to_lora(delta: Delta, rank: int | None = None, energy: float | None = None, base: BaseWeights = None,
            progress: bool = False) -> tuple[Delta, Report]:
    """Any linear delta (dense, sparse, low-rank with a weight-derived init, DoRA or full copies given `base`) as a
    plain low-rank delta: rank cap, energy fraction, or neither for the lossless numerical rank."""
    check_rank_options(rank, energy, required=False)
    what = f"rank {rank}" if rank is not None else f"energy {energy}" if energy is not None else "numerical rank"
    return convert(delta, lambda path, dw: (low_rank(dw, rank, energy), None), f"to_lora: {what}", base, progress)


__all__ = ["METHODS", "ModuleReport", "Report", "choose_rank", "compress", "low_rank", "not_smaller_message", "ternarize",
           "to_lora"]
