"""The per-module contract every method honours. Generic code (hosts, merge, files, arithmetic) uses only this."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn

from .config import DeltaConfig
from .errors import UnsupportedError
from .layouts import Layout
from .tensors import DeltaTensor


class Piece(nn.Module, ABC):
    """One delta's trainable state on one module of the model.

    Subclasses implement `forward`, and, when the update is a change of the module's weight and bias,
    `delta_weight`/`delta_bias` — that single capability buys merge/unmerge, arithmetic, merging of many
    deltas, compression and the multi-delta serving path.
    """

    #: module types (layout names) this method can adapt
    supported: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D", "Embedding")
    #: where the piece acts (DESIGN.md "positions"): "weight" — adds f(x) to the module's output, f linear in x for
    #: mergeable pieces (LoRA, sparse, ...); "output" — transforms the module's output h -> g(h) ((IA)3 on keys,
    #: series adapters); "input" — transforms the module's input x -> s(x) before it runs ((IA)3 on the FFN input)
    #: or adds a parallel branch; "attention" — extra keys/values or virtual tokens, applied by the method's own
    #: mechanism (the host's hooks skip such pieces). Composition blocks (compose.py) have one formula per position.
    position: ClassVar[str] = "weight"
    #: False for pieces that pick their own update per example (Poly by task id): Route cannot hand them row subsets
    routable: ClassVar[bool] = True
    #: for "input" pieces: which argument of the module's forward they transform, an index or a parameter name
    #: (BertOutput(hidden_states, input_tensor): 1 is the residual input); may be set per instance
    input_arg: int | str = 0
    #: saved entries that may be absent from a file and then mean zero (a Δb where the file has none)
    zero_if_missing: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base: nn.Module, path: str, cfg: DeltaConfig) -> None:
        super().__init__()
        self.path = path
        self.cfg = cfg

    @abstractmethod
    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        """Return `acc` plus this piece's contribution for input x.

        `base_out` is the frozen module's output and must not be written; `acc` may be updated in place
        when grad is disabled (the host passes the same tensor for both when this piece is alone).
        """

    # --- linear mergeability --------------------------------------------------------------------
    @property
    def mergeable(self) -> bool:
        return type(self).delta_weight is not Piece.delta_weight

    @property
    def weight_dependent(self) -> bool:
        """True when ΔW depends on the base weight (DoRA, full copies); merges then keep the exact update."""
        return False

    def delta_weight(self, base: nn.Module, weight: Tensor | None = None) -> DeltaTensor:
        """ΔW in the [out, in] view, computed against `weight` (default: the module's current weight).

        Optional capability: pieces that are not a weight update keep this default (`mergeable` is False)."""
        raise UnsupportedError(f"{type(self).__name__} at {self.path!r} is not a weight update; it cannot be "
                               f"merged or expressed as ΔW")

    def delta_bias(self, base: nn.Module, bias: Tensor | None = None) -> Tensor | None:
        """Δb, computed against `bias` (default: the module's current bias); None when the piece has none.
        Default: the piece's own `bias` tensor (see `add_bias_delta`), which is a Δb."""
        b = getattr(self, "bias", None)
        return None if b is None else b.detach()

    def add_bias_delta(self, base_bias: Tensor | None, wanted: bool, dtype: torch.dtype) -> None:
        """A trainable Δb (zeros) as `self.bias`, when `wanted` and the module has a bias to change."""
        if wanted and base_bias is not None:
            self.bias = nn.Parameter(torch.zeros_like(base_bias, dtype=dtype))

    # --- training helpers -------------------------------------------------------------------------
    def fast_params(self) -> Iterable[nn.Parameter]:
        """Parameters that LoRA+-style optimisers give a larger learning rate. Default: none."""
        return ()

    def before_step(self, step: int, total: int | None = None) -> None:
        """Training loops call this before each training step; `step` is the number of optimizer steps done so
        far, `total` the planned number when known. Optional capability (e.g. SpIEL opens a regrow window)."""

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer | None, step: int, total: int | None = None) -> None:
        """Training loops call this after each optimizer step; `step` counts the steps done, this one included.
        Optional capability (e.g. SpIEL drops and regrows entries and resets their optimizer state)."""

    def regularizer(self) -> Tensor | None:
        """A term training adds to the loss (already weighted by the method's own coefficient), or None.
        Optional capability (orthogonality penalties of SORSA and AdaLoRA)."""
        return None

    @classmethod
    def link(cls, pieces: Sequence["Piece"]) -> None:
        """Called once per delta with all its pieces of this class, right after they are built (attach, load), so
        pieces that share state across modules can connect (a global rank budget). Optional capability."""

    def install(self, model: nn.Module, module: nn.Module) -> None:
        """Called once the piece sits on `module` of `model` (attach, load). Pieces applied by a mechanism of their
        own ("attention" position: prompt and prefix tuning) register its hooks here. Optional; undone by `uninstall`."""

    def uninstall(self, model: nn.Module, module: nn.Module) -> None:
        """Undo `install`; called before the piece leaves the model (detach, unload, a failed attach)."""

    # --- files without a model ------------------------------------------------------------------
    @classmethod
    def state_to_delta(cls, state: dict[str, Tensor], cfg: DeltaConfig, layout: Layout,
                       weight: Tensor | None = None, bias: Tensor | None = None) -> tuple[DeltaTensor | None, Tensor | None]:
        """(ΔW, Δb) from a saved state, without a model.

        `weight`/`bias` are the base module's ([out, in] view), when the caller has them; pieces whose update
        depends on the base (weight_dependent) return (None, None) without them. Default: not a weight update."""
        return None, None

    @classmethod
    def tensors_to_state(cls, dw: DeltaTensor, db: Tensor | None, layout: Layout) -> dict[str, Tensor]:
        """The saved state of a piece whose update is exactly (dw, db): the inverse of state_to_delta, for
        methods that can store any update of one delta-tensor kind (see `Delta.from_tensors`)."""
        raise UnsupportedError(f"{cls.__name__} cannot store an arbitrary {type(dw).__name__}")

    def extra_repr(self) -> str:
        return f"path={self.path!r}"


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a piece trains in on a module of `dtype`: float32 for half-precision modules, else the same."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def add_product(acc: Tensor, x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """acc + x wᵀ (+ bias) for an [out, in] weight w: in place into `acc` when grad is off and dtypes allow
    (inference, the piece running alone or on the host's copy), else out of place."""
    x2 = x.reshape(-1, x.shape[-1]).to(w.dtype)
    if not torch.is_grad_enabled() and acc.dtype == w.dtype and acc.is_contiguous():
        acc.view(-1, acc.shape[-1]).addmm_(x2, w.t())
        return acc.add_(bias) if bias is not None else acc
    y = x2 @ w.t()
    if bias is not None:
        y = y + bias  # in the piece's precision, then cast once: a half-precision model stays in its dtype
    return acc + y.view(acc.shape).to(acc.dtype)
