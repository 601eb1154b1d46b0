"""(IA)3: learned vectors that rescale activations — keys and values (module outputs) and the FFN input."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig, Targets, TargetSpec, register
from ..core.schema import ModuleSpec
from ..core.layouts import Layout, layout_of
from ..core.piece import Piece, master_dtype
from ..core.targeting import matches
from ..core.tensors import DeltaTensor, DenseDelta


@register("ia3")
@dataclass(frozen=True)
class IA3(DeltaConfig):
    """h' = l ⊙ h on the outputs of `targets` (keys, values), x' = l ⊙ x on the inputs of the `feedforward` ones
    (the FFN's down projection); every l starts at 1 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning
    is Better and Cheaper than In-Context Learning")."""

    targets: TargetSpec = ("k_proj", "v_proj", "down_proj")
    feedforward: Annotated[Targets, ModuleSpec()] = ("down_proj",)

    def scales_input(self, path: str) -> bool:
        return bool(self.feedforward) and matches(self.feedforward, path)

    def resolve(self, path: str) -> "IA3":
        """The config of one module: `feedforward` is (path,) when it scales that module's input, else ()."""
        return self.replace(targets=(path,), feedforward=(path,) if self.scales_input(path) else ())  # type: ignore[return-value]

    def piece_class(self, module: Any = None) -> type[Piece]:
        return IA3Piece


class IA3Piece(Piece):
    supported: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")

    def __init__(self, base: nn.Module, path: str, cfg: IA3) -> None:
        super().__init__(base, path, cfg)
        self.layout = layout_of(base, path, self.supported)
        d_out, d_in = self.layout.shape(base)
        self.position = "input" if cfg.scales_input(path) else "output"
        self.features = d_in if self.position == "input" else d_out
        self.ia3_l = nn.Parameter(torch.ones(self.features, dtype=master_dtype(self.layout.weight(base).dtype),
                                             device=base.weight.device))

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        return acc * self.ia3_l.to(acc.dtype)

    # W' = diag(l) W (outputs) or W diag(l) (inputs): a weight update that depends on W
    @property
    def weight_dependent(self) -> bool:
        return True

    def delta_weight(self, base: nn.Module, weight: Tensor | None = None) -> DeltaTensor:
        w = (self.layout.weight(base) if weight is None else weight).detach()
        return _update(self.ia3_l.detach(), self.position, w)

    def delta_bias(self, base: nn.Module, bias: Tensor | None = None) -> Tensor | None:
        b = self.layout.bias(base) if bias is None else bias
        if b is None or self.position == "input":
            return None
        return ((self.ia3_l.detach() - 1) * b.detach().to(self.ia3_l.dtype))

    @classmethod
    def state_to_delta(cls, state: dict[str, Tensor], cfg: IA3, layout: Layout, weight: Tensor | None = None,
                       bias: Tensor | None = None) -> tuple[DeltaTensor | None, Tensor | None]:
        if weight is None:
            return None, None
        l = state["ia3_l"]
        position = "input" if cfg.feedforward else "output"  # cfg is the module's own (see resolve)
        db = None if bias is None or position == "input" else (l - 1) * bias.to(l.dtype)
        return _update(l, position, weight), db


def _update(l: Tensor, position: str, w: Tensor) -> DenseDelta:
    dtype = torch.promote_types(l.dtype, torch.float32)
    w = w.to(dtype)
    s = (l.to(dtype) - 1)
    return DenseDelta(w * s[None, :] if position == "input" else w * s[:, None])
