"""Bottleneck adapters: a small two-layer network U σ(D h + b_D) + b_U (D: d -> m, U: m -> d) added in series after
a module or in parallel to a feed-forward block. U starts at zero, so every adapter is the identity at first.

    Houlsby (Houlsby et al. 2019)         series, after the attention and the FFN output projections: h' = h + f(h)
    Pfeiffer (Pfeiffer et al. 2021)       series, after the FFN output projection only:               h' = h + f(h)
    ParallelAdapter (He et al. 2022)      parallel to the FFN block with input x:                     y' = y + s·f(x)
    AdaptFormer (Chen et al. 2022)        the parallel adapter with s = 0.1

Series adapters scale their branch by `scaling` (s, default 1): h' = h + s·f(h). With `original_ln_before` a series
adapter sits at the LayerNorm a post-LN block (BERT) applies to z = h + r (projection output plus residual) and reads
the normalised sum: z -> z + s·f(LN(z)), so the block returns LN(z + s·f(LN(z))) — AdapterHub's Pfeiffer
(`seq_bn`) placement; an input-position piece on the LayerNorm, which it evaluates with the module's own parameters.

Series adapters are output-position pieces on the projection modules. A parallel adapter is a weight-position
(additive, not mergeable) piece on the FFN block when its input is the block's first argument (Llama's `mlp`,
GPT-2's `mlp`); where a block adds its input to its output itself before a LayerNorm (BERT's
`BertOutput(hidden_states, input_tensor)`), adding the branch there equals transforming that argument
x -> x + s·f(x), an input-position piece on argument `input_arg`. targets="auto" takes the modules from
`sites.py` by the model's `config.model_type`. Per adapter: 2·d·m + m + d trainable parameters.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.config import DeltaConfig, TargetSpec, register
from ...core.errors import TargetError
from ...core.schema import Check, Finite, NoneMeans, OneOf, Positive, PositiveInt
from ...core.layouts import layout_of
from ...core.piece import Piece, master_dtype
from ...core.targeting import linear_types
from .sites import sites

NON_LINEARITIES: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "swish": F.silu, "silu": F.silu, "tanh": torch.tanh}
#: D's initialisation (U and both biases start at zero): "normal" N(0, 0.01²) as Houlsby et al.; "kaiming" the
#: uniform init of nn.Linear (a = √5), as the parallel adapter and AdaptFormer implementations
Init = Literal["normal", "kaiming"]
INITS = get_args(Init)
NonLinearity = Annotated[str, OneOf(sorted(NON_LINEARITIES))]


def _argument(a: int | str) -> bool:
    return (isinstance(a, int) and a >= 0) or (isinstance(a, str) and a.isidentifier())


#: ParallelAdapter.input_arg: where the targeted module takes the block's input
Argument = Annotated[int | str, Check(_argument, "an argument index (0 = the first) or a parameter name of the targeted "
                                                 "module's forward")]


@dataclass(frozen=True)
class BottleneckAdapter(DeltaConfig):
    """What every bottleneck adapter shares. Not registered itself: use Houlsby, Pfeiffer, ParallelAdapter or
    AdaptFormer. `bottleneck` (m), when given, overrides `reduction_factor` (m = d // reduction_factor)."""

    targets: TargetSpec = "auto"
    reduction_factor: Positive = 16.0
    bottleneck: Annotated[PositiveInt | None, NoneMeans("use reduction_factor")] = None
    non_linearity: NonLinearity = "relu"
    init: Init = "normal"
    scaling: Annotated[float, Finite()] = 1.0

    #: the roles of adapter_map.py that targets="auto" adapts
    roles: ClassVar[tuple[str, ...]] = ()

    def size(self, d: int) -> int:
        """The bottleneck width m for features d."""
        return self.bottleneck if self.bottleneck is not None else max(1, int(d // self.reduction_factor))

    def for_model(self, model: nn.Module) -> DeltaConfig:
        """targets="auto" made concrete from the architecture map: the modules of this method's roles."""
        if self.targets != "auto":
            return self
        found = sites(model, self.roles, type(self).__name__)
        return self.replace(targets="|".join(f"(?:{s.pattern})" for s in found))


@dataclass(frozen=True)
class _Series(BottleneckAdapter):
    #: at the block's LayerNorm, reading LN(h + r) and adding to its input (post-LN blocks; see the module doc)
    original_ln_before: bool = False

    #: targets="auto" with original_ln_before: the role of each role's LayerNorm
    NORMS: ClassVar[dict[str, str]] = {"attention_output": "attention_norm", "ffn_output": "ffn_norm"}

    def for_model(self, model: nn.Module) -> DeltaConfig:
        if self.targets != "auto" or not self.original_ln_before:
            return super().for_model(model)
        found = sites(model, tuple(self.NORMS[r] for r in self.roles), f"{type(self).__name__}(original_ln_before=True)")
        return self.replace(targets="|".join(f"(?:{s.pattern})" for s in found))

    def piece_class(self, module: Any = None) -> type[Piece]:
        return NormInputAdapterPiece if self.original_ln_before else SeriesAdapterPiece


@register("houlsby")
@dataclass(frozen=True)
class Houlsby(_Series):
    """Series adapters after the attention output projection and after the FFN output projection of every layer."""

    non_linearity: NonLinearity = "swish"
    roles: ClassVar[tuple[str, ...]] = ("attention_output", "ffn_output")


@register("pfeiffer")
@dataclass(frozen=True)
class Pfeiffer(_Series):
    """One series adapter per layer, after the FFN output projection."""

    roles: ClassVar[tuple[str, ...]] = ("ffn_output",)


@register("parallel_adapter")
@dataclass(frozen=True)
class ParallelAdapter(BottleneckAdapter):
    """A branch s·U σ(D x) parallel to each FFN block, x the block's input (argument `input_arg` of the module)."""

    reduction_factor: Positive = 2.0
    init: Init = "kaiming"
    scaling: Annotated[float, Finite()] = 4.0
    input_arg: Argument = 0

    roles: ClassVar[tuple[str, ...]] = ("ffn",)

    def for_model(self, model: nn.Module) -> DeltaConfig:
        if self.targets != "auto":
            return self
        (site,) = sites(model, self.roles, type(self).__name__)
        return self.replace(targets=site.pattern, input_arg=site.input_arg)

    def piece_class(self, module: Any = None) -> type[Piece]:
        return ParallelAdapterPiece if self.input_arg == 0 else ParallelInputPiece


@register("adaptformer")
@dataclass(frozen=True)
class AdaptFormer(ParallelAdapter):
    """AdaptFormer's AdaptMLP: the parallel adapter with a fixed scale 0.1, ReLU, no LayerNorm."""

    reduction_factor: Positive = 12.0
    scaling: Annotated[float, Finite()] = 0.1


def block_widths(module: nn.Module, path: str) -> tuple[int, int]:
    """(input, output) features of a Linear / Conv1D module, or of a block of them: its first one's input width
    and its last one's output width (LlamaMLP, GPT2MLP, BertOutput)."""
    from ...core.targeting import is_piece_module

    linears = [m for p, m in module.named_modules() if not is_piece_module(p) and isinstance(m, linear_types())]
    if not linears:
        raise TargetError(f"module {path!r} is a {type(module).__name__} with no Linear / Conv1D inside, so its feature "
                          f"size is unknown; target the projection modules or the blocks that hold them")
    first, last = linears[0], linears[-1]
    return layout_of(first, path).shape(first)[1], layout_of(last, path).shape(last)[0]


class AdapterPiece(Piece):
    """The bottleneck U σ(D h + b_D) + b_U, in the module's precision (float32 for half-precision modules)."""

    supported: ClassVar[tuple[str, ...] | None] = None  # projections or the blocks that hold them (block_widths)

    def __init__(self, base: nn.Module, path: str, cfg: BottleneckAdapter, d_in: int, d_out: int) -> None:
        super().__init__(base, path, cfg)
        m = cfg.size(d_out)
        ref = next((p for p in base.parameters() if p.is_floating_point()), None)  # not a quantised weight's bytes
        kw = {"dtype": master_dtype(ref.dtype) if ref is not None else torch.get_default_dtype(),
              "device": ref.device if ref is not None else None}
        # flat names: a delta file stores `<module path>.<name>`
        self.down_weight = nn.Parameter(torch.empty(m, d_in, **kw))
        self.down_bias = nn.Parameter(torch.zeros(m, **kw))
        self.up_weight = nn.Parameter(torch.zeros(d_out, m, **kw))
        self.up_bias = nn.Parameter(torch.zeros(d_out, **kw))
        with torch.no_grad():
            if cfg.init == "normal":
                nn.init.normal_(self.down_weight, std=1e-2)
            else:
                nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
        self.non_linearity = cfg.non_linearity
        self.features = d_out

    def branch(self, h: Tensor) -> Tensor:
        """U σ(D h + b_D) + b_U, in the piece's dtype."""
        z = F.linear(h.to(self.down_weight.dtype), self.down_weight, self.down_bias)
        return F.linear(NON_LINEARITIES[self.non_linearity](z), self.up_weight, self.up_bias)

    def extra_repr(self) -> str:
        m, d = self.down_weight.shape
        return f"path={self.path!r}, d={d}, m={m}, {self.non_linearity}"


class SeriesAdapterPiece(AdapterPiece):
    position: ClassVar[str] = "output"

    def __init__(self, base: nn.Module, path: str, cfg: BottleneckAdapter) -> None:
        d = block_widths(base, path)[1]
        super().__init__(base, path, cfg, d, d)

        self.scaling = float(cfg.scaling)

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        """h + s·(U σ(D h + b_D) + b_U) for the running output h."""
        return acc + (self.scaling * self.branch(acc)).to(acc.dtype)


class NormInputAdapterPiece(AdapterPiece):
    """On a LayerNorm: its input z -> z + s·f(LN(z)), LN the module itself (its weight, bias and eps)."""

    position: ClassVar[str] = "input"

    def __init__(self, base: nn.Module, path: str, cfg: BottleneckAdapter) -> None:
        if not isinstance(base, nn.LayerNorm) or len(base.normalized_shape) != 1:
            raise TargetError(f"a series adapter with original_ln_before=True goes on the LayerNorm of a post-LN block "
                              f"(e.g. BERT's 'output.LayerNorm'); {path!r} is a {type(base).__name__}")
        d = base.normalized_shape[0]
        super().__init__(base, path, cfg, d, d)
        self.scaling = float(cfg.scaling)

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        normed = F.layer_norm(acc, base.normalized_shape, base.weight, base.bias, base.eps)
        return acc + (self.scaling * self.branch(normed)).to(acc.dtype)


class ParallelAdapterPiece(AdapterPiece):
    """Adds s·f(x) to the block's output, x its first input."""

    def __init__(self, base: nn.Module, path: str, cfg: ParallelAdapter) -> None:
        super().__init__(base, path, cfg, *block_widths(base, path))
        self.scaling = float(cfg.scaling)

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        return acc + (self.scaling * self.branch(x)).to(acc.dtype)


class ParallelInputPiece(AdapterPiece):
    """Transforms argument `input_arg` x -> x + s·f(x), for blocks that add that argument to their output."""

    position: ClassVar[str] = "input"

    def __init__(self, base: nn.Module, path: str, cfg: ParallelAdapter) -> None:
        d = block_widths(base, path)[1]  # the argument joins the block's output, so it has the output's width
        super().__init__(base, path, cfg, d, d)
        self.scaling = float(cfg.scaling)
        self.input_arg = cfg.input_arg

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        return acc + (self.scaling * self.branch(acc)).to(acc.dtype)
