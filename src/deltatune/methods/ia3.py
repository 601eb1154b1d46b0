"""(IA)3: learned vectors that rescale activations — keys and values (module outputs) and the FFN input."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig, Targets, TargetSpec, register
from ..core.errors import ConfigError, UnsupportedError
from ..core.schema import ModuleSpec, NoneMeans
from ..core.layouts import Layout
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
    feedforward: Annotated[Targets | None, ModuleSpec(), NoneMeans("no module's input is scaled")] = ("down_proj",)

    def scales_input(self, path: str) -> bool:
        return bool(self.feedforward) and matches(self.feedforward, path)

    def resolve(self, path: str) -> "IA3":
        """The config of one module: `feedforward` is (path,) when it scales that module's input, else ()."""
        return self.replace(targets=(path,), feedforward=(path,) if self.scales_input(path) else ())  # type: ignore[return-value]

    def piece_class(self, module: Any = None) -> type[Piece]:
        # the config is the module's own (see resolve): `feedforward` is set exactly when it scales the input
        return IA3InputPiece if self.feedforward else IA3Piece


class IA3Piece(Piece):
    """l ⊙ h on the module's output; W' = diag(l) W, b' = l ⊙ b: an update that depends on W."""

    supported: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")
    position: ClassVar[str] = "output"
    mergeable: ClassVar[bool] = True
    needs_base: ClassVar[bool] = True

    def __init__(self, base: nn.Module, path: str, cfg: IA3) -> None:
        if cfg.scales_input(path) != (self.position == "input"):
            raise ConfigError(f"{type(self).__name__} scales the module's {self.position}, not what IA3 asks at {path!r}; "
                              f"build pieces with cfg.for_module(path).piece_class(module)")
        super().__init__(base, path, cfg)
        d_out, d_in = self.layout.shape(base)
        self.features = d_in if self.position == "input" else d_out
        self.ia3_l = nn.Parameter(torch.ones(self.features, dtype=master_dtype(self.layout.weight(base).dtype),
                                             device=base.weight.device))

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        return acc * self.ia3_l.to(acc.dtype)

    @classmethod
    def update(cls, state: dict[str, Tensor], cfg: IA3, layout: Layout, weight: Tensor | None = None,
               bias: Tensor | None = None) -> tuple[DeltaTensor, Tensor | None]:
        if weight is None:
            raise UnsupportedError("(IA)3's update rescales the base weight; pass it (base=)")
        l = state["ia3_l"]
        db = None if bias is None or cls.position == "input" else (l - 1) * bias.to(l.dtype)
        return _update(l, cls.position, weight), db


class IA3InputPiece(IA3Piece):
    """l ⊙ x on the module's input (the FFN's down projection); W' = W diag(l), the bias unchanged."""

    position: ClassVar[str] = "input"


def _update(l: Tensor, position: str, w: Tensor) -> DenseDelta:
    dtype = torch.promote_types(l.dtype, torch.float32)
    w = w.to(dtype)
    s = (l.to(dtype) - 1)
    return DenseDelta(w * s[None, :] if position == "input" else w * s[:, None])
