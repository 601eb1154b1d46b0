"""How a weight-bearing module stores its weight, seen as a linear map W of shape [out, in].

nn.Linear stores W as is, transformers' Conv1D stores W^T, nn.Embedding stores a [num, dim] table that acts
as W = table^T on one-hot inputs. Methods work in the [out, in] view and never ask which module they are on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import TargetError


class Layout:
    """Linear view of a module type."""

    module_type: str = ""

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


class LinearLayout(Layout):
    module_type = "Linear"


class Conv1DLayout(Layout):
    module_type = "Conv1D"

    def weight(self, module: nn.Module) -> Tensor:
        return module.weight.t()

    def to_native(self, delta: Tensor) -> Tensor:
        return delta.t()


class EmbeddingLayout(Layout):
    module_type = "Embedding"

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


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def layout_of(module: nn.Module, path: str = "?", allowed: tuple[str, ...] = ("Linear", "Conv1D", "Embedding")) -> Layout:
    """The layout of `module`, or TargetError naming the module and the supported types."""
    conv1d = _conv1d_type()
    layout: Layout | None = None
    if isinstance(module, nn.Linear):
        layout = LinearLayout()
    elif conv1d is not None and isinstance(module, conv1d):
        layout = Conv1DLayout()
    elif isinstance(module, nn.Embedding):
        layout = EmbeddingLayout()
    if layout is None or layout.module_type not in allowed:
        raise TargetError(
            f"module {path!r} is a {type(module).__name__}; this method adapts {', '.join(allowed)} modules. "
            f"Narrow `targets` or add it to `exclude`."
        )
    return layout


def layout_by_name(module_type: str) -> Layout:
    for cls in (LinearLayout, Conv1DLayout, EmbeddingLayout):
        if cls.module_type == module_type:
            return cls()
    raise TargetError(f"unknown module type {module_type!r}; known: Linear, Conv1D, Embedding")


def as_2d(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def dtype_of(module: nn.Module) -> torch.dtype:
    return module.weight.dtype
