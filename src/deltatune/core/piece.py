"""The per-module contract every method honours. Generic code (hosts, merge, files, arithmetic) uses only this."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn

from .config import DeltaConfig
from .errors import UnsupportedError
from .layouts import Layout, layout_of
from .tensors import DeltaTensor


POSITIONS = ("input", "weight", "output", "attention", "block")  # block: run only by a composition block (a fusion layer)


class Piece(nn.Module, ABC):
    """One delta's state on one module of the model: the contract every method honours.

    Generic code (the runtime's hooks, merging, files, arithmetic, composition blocks) uses only what is listed
    here. A method declares what it can do in class attributes; nothing is inferred from which methods a subclass
    overrides. Declarations are checked when the class is defined, so a contradiction fails at import, naming the
    class.

    Declared (class attributes):

    * ``supported`` — module types (layout names: "Linear", "Conv1D", "Embedding", "Norm") the method adapts; the
      base ``__init__`` sets ``self.layout`` from it (a TargetError naming the module otherwise). ``None``: any
      module, no weight view (bottleneck adapters on a block, prompts); ``self.layout`` is then None.
    * ``quantized_hosts`` — with "Linear" in ``supported``, the piece also adapts quantised linears (bitsandbytes
      4-bit / 8-bit, layout "QuantLinear": the weight is a read-only dequantised view). Default True; False for a
      piece that would copy or rewrite the base weight (a trained full copy).
    * ``position`` — where the piece acts: "weight" (adds f(x) to the module's output), "output" (h -> g(h)),
      "input" (x -> s(x) before the module runs), "attention" (extra keys/values or tokens, by the method's own
      ``install`` hooks), "block" (run only by a composition block: a fusion layer under Fuse). Composition blocks have one formula per position (docs/composition.md).
    * ``mergeable`` — the piece is a change (ΔW, Δb) of the module's weight and bias, given by ``update``. It buys
      merge/unmerge, ``Delta.tensors()`` and arithmetic, merging of many deltas, compression and extraction.
    * ``needs_base`` — ``update`` needs the base weight and bias (DoRA, full copies, (IA)3, SSF): merges then keep
      the exact update they added, and detached deltas need ``base=`` to express it.
    * ``needs_shape`` — ``update`` needs only the base weight's shape (BitFit: ΔW = 0, Δb saved): it receives
      `weight`/`bias` as with needs_base and detached deltas need ``base=``, but merges treat the update as
      independent of the base (merged deltas unmerge in any order).
    * ``low_rank`` — ``update`` may return a ``LowRankDelta`` that does not depend on the base: Route's batched fast
      path stacks such factors (requires mergeable, not needs_base).
    * ``routable`` — False for pieces that pick their own update per example (Poly by task id).
    * ``fuses`` — the piece is a fusion layer: ``fuse(h, candidates)`` mixes the outputs of several deltas (Fuse).
    * ``keywords`` — per-call keywords the piece reads with ``core.calls.batch_value`` (``model(x, task_ids=t)``); the runtime
      takes them off the model's call while such a piece is attached.
    * ``input_arg`` — for "input" pieces, which argument of the module's forward they transform (may be set per
      instance: BertOutput's residual input is 1).
    * ``zero_if_missing`` — saved entries that may be absent from a file and then mean zero.

    Must provide: ``forward``; ``update`` when mergeable; ``fuse`` when fuses. May provide: ``tensors_to_state``
    (storage kinds), ``fast_params``, ``before_step`` / ``after_optimizer_step`` / ``regularizer`` (training),
    ``link`` (state shared across one delta's pieces), ``install`` / ``uninstall`` (mechanisms of its own).
    Everything a piece registers as a parameter or persistent buffer is saved; nothing else is.
    """

    supported: ClassVar[tuple[str, ...] | None] = ("Linear", "Conv1D", "Embedding")
    quantized_hosts: ClassVar[bool] = True
    position: ClassVar[str] = "weight"
    mergeable: ClassVar[bool] = False
    needs_base: ClassVar[bool] = False
    needs_shape: ClassVar[bool] = False
    low_rank: ClassVar[bool] = False
    routable: ClassVar[bool] = True
    fuses: ClassVar[bool] = False
    keywords: ClassVar[tuple[str, ...]] = ()
    input_arg: int | str = 0
    zero_if_missing: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__name__
        if cls.position not in POSITIONS:
            raise TypeError(f"{name}.position must be one of {POSITIONS}, got {cls.position!r}")
        if not isinstance(cls.__dict__.get("update", Piece.__dict__["update"]), classmethod):
            raise TypeError(f"{name}.update must be a classmethod update(cls, state, cfg, layout, weight, bias)")
        if cls.mergeable and cls.update.__func__ is Piece.update.__func__:  # type: ignore[attr-defined]
            raise TypeError(f"{name} declares mergeable = True but defines no update(state, cfg, layout, weight, bias)")
        if cls.mergeable and cls.supported is None:
            raise TypeError(f"{name} declares mergeable = True but supported = None: an update needs a weight view "
                            f"(name the module types it adapts)")
        if not isinstance(cls.keywords, tuple) or not all(isinstance(k, str) and k.isidentifier() for k in cls.keywords):
            raise TypeError(f"{name}.keywords must be a tuple of keyword names, e.g. ('task_ids',), got {cls.keywords!r}")
        if (cls.needs_base or cls.needs_shape or cls.low_rank) and not cls.mergeable:
            raise TypeError(f"{name} declares needs_base, needs_shape or low_rank, which describe an update; declare "
                            f"mergeable = True")
        if cls.low_rank and cls.needs_base:
            raise TypeError(f"{name} declares low_rank and needs_base: the fast path needs an update independent of the base")
        if cls.fuses and cls.fuse is Piece.fuse:
            raise TypeError(f"{name} declares fuses = True but defines no fuse(h, candidates)")

    def __init__(self, base: nn.Module, path: str, cfg: DeltaConfig) -> None:
        super().__init__()
        self.path = path
        self.cfg = cfg
        self.layout: Layout | None = None if self.supported is None else \
            layout_of(base, path, self.supported, self.quantized_hosts)

    @abstractmethod
    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        """Return `acc` plus this piece's contribution for input x (weight position), or the transformed value
        (input/output position: `acc` is the running value).

        `base_out` is the frozen module's output and must not be written; `acc` may be updated in place
        when grad is disabled (the host passes the same tensor for both when this piece is alone).
        """

    # --- the update: one formula, used live and detached ------------------------------------------
    @classmethod
    def update(cls, state: dict[str, Tensor], cfg: DeltaConfig, layout: Layout, weight: Tensor | None = None,
               bias: Tensor | None = None) -> tuple[DeltaTensor, Tensor | None]:
        """(ΔW in the [out, in] view, Δb or None) from the piece's saved tensors `state` (parameters and persistent
        buffers, detached) and its module's config. `weight` / `bias` are the base module's ([out, in] view); they
        are given exactly when the class declares `needs_base` (or `needs_shape`).

        The one place a mergeable method writes its update: attached pieces (merge, Route's bank, Arrow) and
        detached deltas (files, merging, compression, extraction) both call it."""
        raise UnsupportedError(f"{cls.__name__} is not a weight update (it declares mergeable = False); it cannot be "
                               f"merged or expressed as ΔW")

    def saved_state(self) -> dict[str, Tensor]:
        """The tensors a file holds for this piece, detached: what `update` receives on the live path."""
        return {k: v.detach() for k, v in self.state_dict(keep_vars=True).items()}

    def live_update(self, base: nn.Module, weight: Tensor | None = None,
                    bias: Tensor | None = None) -> tuple[DeltaTensor, Tensor | None]:
        """`update` for this attached piece; `weight`/`bias` (default: the module's current ones) matter only when the
        class declares needs_base or needs_shape."""
        if not self.mergeable:
            type(self).update({}, self.cfg, self.layout)  # raises the clear error
        if self.needs_base or self.needs_shape:
            layout = self.layout
            weight = (layout.weight(base) if weight is None else weight).detach()
            if bias is None:
                bias = layout.bias(base)
                bias = None if bias is None else bias.detach()
        else:
            weight = bias = None
        return self.update(self.saved_state(), self.cfg, self.layout, weight, bias)  # type: ignore[arg-type]

    def delta_weight(self, base: nn.Module, weight: Tensor | None = None) -> DeltaTensor:
        """ΔW in the [out, in] view (see `live_update`)."""
        return self.live_update(base, weight)[0]

    def delta_bias(self, base: nn.Module, bias: Tensor | None = None) -> Tensor | None:
        """Δb, or None when the piece does not change the bias (see `live_update`)."""
        return self.live_update(base, None, bias)[1]

    def add_bias_delta(self, base_bias: Tensor | None, wanted: bool, dtype: torch.dtype) -> None:
        """A trainable Δb (zeros) as `self.bias`, when `wanted` and the module has a bias to change."""
        if wanted and base_bias is not None:
            self.bias = nn.Parameter(torch.zeros_like(base_bias, dtype=dtype))

    @classmethod
    def tensors_to_state(cls, dw: DeltaTensor, db: Tensor | None, layout: Layout) -> dict[str, Tensor]:
        """The saved state of a piece whose update is exactly (dw, db): the inverse of `update`, for methods whose
        config declares `stores` (they can hold any update of one delta-tensor type; see `Delta.from_tensors`)."""
        raise UnsupportedError(f"{cls.__name__} cannot store an arbitrary {type(dw).__name__}")

    # --- fusion -----------------------------------------------------------------------------------
    def fuse(self, h: Tensor, candidates: list[Tensor]) -> Tensor:
        """For pieces that declare `fuses`: the value after attending over `candidates` (each delta's output) given
        the value h before them."""
        raise UnsupportedError(f"{type(self).__name__} at {self.path!r} is not a fusion layer (fuses = False)")

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

    def extra_repr(self) -> str:
        return f"path={self.path!r}"


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a piece trains in on a module of `dtype`: float32 for half-precision modules, else the same."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def add_to(acc: Tensor, y: Tensor) -> Tensor:
    """acc + y in acc's dtype: in place when grad is off (inference: the piece runs alone or on the host's copy)."""
    if torch.is_grad_enabled():
        return acc + y.to(acc.dtype)
    return acc.add_(y.to(acc.dtype))


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
