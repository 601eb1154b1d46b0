"""How a weight-bearing module stores its weight, seen as a linear map W of shape [out, in].

nn.Linear stores W as is, transformers' Conv1D stores W^T, nn.Embedding stores a [num, dim] table that acts
as W = table^T on one-hot inputs. Methods work in the [out, in] view and never ask which module they are on.
Normalisation modules (LayerNorm, RMSNorm: y = n(x) ⊙ γ + β) are the one 1-D case: their weight γ is a diagonal
map of n(x), kept as its diagonal, so their ΔW is a 1-D tensor of γ's shape (`NormLayout`; only methods that list
"Norm" in `supported` receive it).

Quantised linears (bitsandbytes `Linear4bit` NF4/FP4, `Linear8bitLt`; torchao int8 weight-only; `core/quant.py`) get
`QuantLinearLayout`, whose `module_type` is "QuantLinear". A piece that lists "Linear" in `supported` accepts them
too, unless it declares `quantized_hosts = False`: every method reads the base weight only through the layout
(`weight`, a dequantised copy here), computes with `x` and the module's output, and never writes the weight, so a
quantised linear is a Linear to it. Only merging writes the weight (`writable` is False: the slot dequantises, adds
and requantises).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import quant
from .errors import TargetError, UnsupportedError


class Layout:
    """Linear view of a module type."""

    module_type: str = ""
    #: the module multiplies a dense input by W (False for lookup tables): batched matmul fast paths apply
    dense_input: bool = True
    #: the module's weight parameter holds W (in its native layout) and merging may add to it in place; False for
    #: quantised weights, which merging dequantises, changes and requantises (`runtime/slot.py`)
    writable: bool = True

    @property
    def saved_type(self) -> str:
        """The module type delta files record (a quantised linear's delta is an ordinary Linear delta)."""
        return self.module_type

    def native_shape(self, module: nn.Module) -> tuple[int, ...]:
        """The shape of the weight in the module's own layout, as a full-precision weight would have it (what delta
        files record to check that a delta fits a model)."""
        return tuple(int(s) for s in module.weight.shape)

    def weight(self, module: nn.Module) -> Tensor:
        """W as [out, in]; a view of the module's parameter."""
        return module.weight

    def to_native(self, delta: Tensor) -> Tensor:
        """A [out, in] tensor in the module's own parameter layout."""
        return delta

    def from_native(self, native: Tensor) -> Tensor:
        """A tensor in the module's parameter layout as [out, in] (the layouts here are transposes or identity)."""
        return self.to_native(native)

    def bias(self, module: nn.Module) -> Tensor | None:
        return getattr(module, "bias", None)

    def shape(self, module: nn.Module) -> tuple[int, int]:
        out_f, in_f = self.weight(module).shape
        return int(out_f), int(in_f)

    def project(self, module: nn.Module, x: Tensor, a: Tensor) -> Tensor:
        """x A^T for A of shape [r, in]: the input side of a low-rank product."""
        return x @ a.t()

    def matmul(self, module: nn.Module, x: Tensor, w: Tensor) -> Tensor:
        """x W^T without bias, for any [out, in] weight."""
        return F.linear(x, w)

    def forward_with(self, module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """The module's own forward on `x` with `weight` (and `bias`, where given) in place of its parameters, in
        the module's native layout. Runs `forward` on a shallow stand-in: no hooks, the module itself untouched."""
        stand_in = object.__new__(type(module))
        stand_in.__dict__.update(module.__dict__)
        params = dict(module._parameters)
        params["weight"] = weight
        if bias is not None:
            params["bias"] = bias
        stand_in.__dict__["_parameters"] = params
        stand_in.__dict__.pop("forward", None)  # an instance-level forward (accelerate's hooks) is bound to `module`
        return type(module).forward(stand_in, x)


class LinearLayout(Layout):
    module_type = "Linear"


class QuantLinearLayout(LinearLayout):
    """A quantised linear (bitsandbytes 4-bit NF4/FP4 or 8-bit; torchao int8 weight-only): `weight` is a dequantised
    copy (reading only), the module's forward stays the quantised kernel. Its name is "QuantLinear"; it is accepted
    wherever "Linear" is (`layout_of`)."""

    module_type = "QuantLinear"
    writable = False
    saved_type = "Linear"  # type: ignore[assignment]

    def weight(self, module: nn.Module) -> Tensor:
        return quant.dequantized(module)

    def native_shape(self, module: nn.Module) -> tuple[int, ...]:
        return (int(module.out_features), int(module.in_features))

    def shape(self, module: nn.Module) -> tuple[int, int]:
        return int(module.out_features), int(module.in_features)

    def snapshot(self, module: nn.Module) -> quant.QuantizedWeight:
        """The exact stored (quantised) weight, for `restore`."""
        return quant.snapshot(module)

    def restore(self, module: nn.Module, saved: quant.QuantizedWeight) -> None:
        quant.restore(module, saved)

    def store(self, module: nn.Module, weight: Tensor) -> Tensor:
        """Requantise the dense [out, in] `weight` into the module; returns the rounding error (stored − wanted)."""
        quant.requantize(module, weight)
        return self.weight(module).to(weight.dtype) - weight

    def dense_module(self, module: nn.Module) -> nn.Linear:
        """A full-precision nn.Linear computing what the module computes: the dequantised weight, the same bias."""
        w = self.weight(module).detach()
        dense = nn.Linear(w.shape[1], w.shape[0], bias=module.bias is not None, device="meta")
        dense.weight = nn.Parameter(w.clone(), requires_grad=False)
        if module.bias is not None:
            dense.bias = nn.Parameter(module.bias.detach().clone().to(w.dtype), requires_grad=module.bias.requires_grad)
        dense.train(module.training)
        return dense

    def forward_with(self, module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        bias = module.bias if bias is None else bias
        out = F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
        return out


class Conv1DLayout(Layout):
    module_type = "Conv1D"

    def weight(self, module: nn.Module) -> Tensor:
        return module.weight.t()

    def to_native(self, delta: Tensor) -> Tensor:
        return delta.t()


class EmbeddingLayout(Layout):
    module_type = "Embedding"
    dense_input = False

    def weight(self, module: nn.Module) -> Tensor:
        return module.weight.t()

    def to_native(self, delta: Tensor) -> Tensor:
        return delta.t()

    def bias(self, module: nn.Module) -> Tensor | None:
        return None

    def project(self, module: nn.Module, x: Tensor, a: Tensor) -> Tensor:
        return F.embedding(x, a.t(), module.padding_idx, module.max_norm, module.norm_type,
                           module.scale_grad_by_freq, module.sparse)

    def matmul(self, module: nn.Module, x: Tensor, w: Tensor) -> Tensor:
        return F.embedding(x, w.t(), module.padding_idx, module.max_norm, module.norm_type,
                           module.scale_grad_by_freq, module.sparse)


class NormLayout(Layout):
    """LayerNorm / RMSNorm-style modules: the weight is the 1-D scale γ (no [out, in] matrix)."""

    module_type = "Norm"

    def shape(self, module: nn.Module) -> tuple[int, ...]:  # type: ignore[override]
        return tuple(int(s) for s in module.weight.shape)

    def project(self, module: nn.Module, x: Tensor, a: Tensor) -> Tensor:
        raise UnsupportedError("a normalisation module's weight is a 1-D scale, not a matrix: it has no input projection")

    def matmul(self, module: nn.Module, x: Tensor, w: Tensor) -> Tensor:
        raise UnsupportedError("a normalisation module's weight is a 1-D scale, not a matrix: use forward_with")


NORM_SUFFIXES = ("LayerNorm", "RMSNorm")


def is_norm(module: nn.Module) -> bool:
    """A normalisation over the last dimension followed by an elementwise affine map with a 1-D weight (and an
    optional 1-D bias): nn.LayerNorm, nn.RMSNorm, or a class whose name ends in LayerNorm / RMSNorm (LlamaRMSNorm,
    T5LayerNorm, ...). BatchNorm, GroupNorm and channel-first norms (LayerNorm2d) are not of this kind; the class is
    checked by name, not isinstance, so a subclass with another name (and maybe another axis) is not taken either."""
    weight = module._parameters.get("weight") if isinstance(module, nn.Module) else None
    bias = module._parameters.get("bias") if weight is not None else None
    if weight is None or weight.dim() != 1 or (bias is not None and bias.shape != weight.shape):
        return False
    return type(module) in (nn.LayerNorm, nn.RMSNorm) or type(module).__name__.endswith(NORM_SUFFIXES)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def layout_of(module: nn.Module, path: str = "?", allowed: tuple[str, ...] = ("Linear", "Conv1D", "Embedding"),
              quantized: bool = True) -> Layout:
    """The layout of `module`, or TargetError naming the module and the supported types. A quantised linear is
    accepted where "QuantLinear" is allowed, or "Linear" is and `quantized` (the piece's `quantized_hosts`) is True."""
    conv1d = _conv1d_type()
    layout: Layout | None = None
    if quant.quant_kind(module) is not None:
        if "QuantLinear" in allowed or ("Linear" in allowed and quantized):
            return QuantLinearLayout()
        raise TargetError(
            f"module {path!r} is a quantised {type(module).__name__}; this method cannot run on a quantised layer "
            f"(it adapts {', '.join(allowed)} modules with a full-precision weight). Exclude the module, or attach it "
            f"to a full-precision base (quantised modules: docs/quantization.md).")
    if isinstance(module, nn.Linear):
        layout = LinearLayout()
    elif conv1d is not None and isinstance(module, conv1d):
        layout = Conv1DLayout()
    elif isinstance(module, nn.Embedding):
        layout = EmbeddingLayout()
    elif is_norm(module):
        layout = NormLayout()
    if layout is None or layout.module_type not in allowed:
        raise TargetError(
            f"module {path!r} is a {type(module).__name__}; this method adapts {', '.join(allowed)} modules. "
            f"Narrow `targets` or add it to `exclude`."
        )
    return layout


def layout_by_name(module_type: str) -> Layout:
    for cls in (LinearLayout, Conv1DLayout, EmbeddingLayout, NormLayout, QuantLinearLayout):
        if cls.module_type == module_type:
            return cls()
    raise TargetError(f"unknown module type {module_type!r}; known: Linear, Conv1D, Embedding, Norm, QuantLinear")


def weight_shape(module: nn.Module) -> tuple[int, ...] | None:
    """The module's weight shape in its own layout as a full-precision weight would have it (None without weight)."""
    if quant.quant_kind(module) is not None:
        return QuantLinearLayout().native_shape(module)
    w = getattr(module, "weight", None)
    return None if w is None else tuple(int(s) for s in w.shape)


def as_2d(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def dtype_of(module: nn.Module) -> torch.dtype:
    if quant.quant_kind(module) is not None:
        return quant.compute_dtype(module)
    return module.weight.dtype
