"""Attaching a LoRA delta whose starting factors come from data (EVA, CorDA, LoRA-GA).

Order of work, so that a failure leaves the model as it was: check the config and name and build every piece
(nothing on the model changes), compute the statistics, set each piece's factors, then install all at once.
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from ..runtime import check_new_name, build_pieces, install
from ..core.errors import ConfigError
from ..core.layouts import Layout, layout_of
from ..methods.lora.lora import LoRA, LoRAPiece
from ..core.piece import Piece

DATA_MODULES = ("Linear", "Conv1D")  # inputs are feature vectors (an Embedding's are indices)
Built = list[tuple[str, nn.Module, Piece]]


def check_lora(model: nn.Module, cfg: LoRA, name: str, owner: str) -> None:
    """ConfigError unless `cfg` is a LoRA config whose factors `owner` may set; DeltaNameError if `name` is taken."""
    if not isinstance(cfg, LoRA):
        raise ConfigError(f"{owner} initialises LoRA factors; pass a dt.LoRA config, got {type(cfg).__name__}")
    if cfg.init not in ("default", "given"):
        raise ConfigError(f"{owner} sets the LoRA factors itself; leave LoRA.init at 'default' (got {cfg.init!r})")
    check_new_name(model, name)


def build_lora(model: nn.Module, cfg: LoRA, paths: list[str] | None = None) -> tuple[Built, dict[str, tuple[nn.Module, Layout]]]:
    """Build (not install) the delta's pieces, and {path: (module, layout)} of its LoRA pieces, which must sit on
    Linear or Conv1D modules. Raises what attach would (ranks, targets), plus TargetError for other module types."""
    built = build_pieces(model, cfg, paths)
    lora = {}
    for path, module, piece in built:
        if isinstance(piece, LoRAPiece):
            lora[path] = (module, layout_of(module, path, DATA_MODULES))
    return built, lora


def install_factors(model: nn.Module, name: str, cfg: LoRA, built: Built, factors: Mapping[str, tuple[Tensor, Tensor]],
                    *, activate: bool, trainable: bool) -> nn.Module:
    """Give every LoRA piece its factors (A, B), then install the delta (all-or-nothing)."""
    for path, _, piece in built:
        if isinstance(piece, LoRAPiece):
            a, b = factors[path]
            piece.set_factors(a, b)
    return install(model, name, cfg, built, trainable=trainable, activate=activate)
