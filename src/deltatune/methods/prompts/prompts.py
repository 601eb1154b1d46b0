"""Prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021): the attention position.

* `PromptTuning(n_tokens)`: n trainable virtual token embeddings P [n, d_model] inserted into the input embeddings
  (at `insert_at`, default 0: before the input). Trainable parameters: n·d_model.
* `PrefixTuning(n_tokens)`: per adapted attention module, n trainable keys and values K, V [kv_heads, n, head_dim]
  put in front of the attention's keys and values, attention_i = softmax(q_i [K; K_x]ᵀ / √d) [V; V_x]. With
  grouped-query attention the prefix has the key/value head count. Trainable parameters per layer: 2·n·d_kv,
  d_kv = kv_heads·head_dim. Real tokens keep their positions (the prefix has none). With `projection=h` the prefix
  is reparameterised during training as [K; V] = tanh(E W1ᵀ + b1) W2ᵀ + b2 (E [n, d_model], one MLP per layer);
  saved deltas hold the resulting plain prefixes.

Neither is a weight update (mergeable = False). The pieces hold the tensors; the hooks that apply
them live in hooks.py and read the active composition at call time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor, nn

from ...core.config import DeltaConfig, TargetSpec, register
from ...core.schema import NonNegativeInt, PositiveInt
from ...core.errors import StateError, TargetError
from ...core.piece import Piece, master_dtype
from .hooks import acquire, forward_parameters, prefix_hooks, prompt_hooks, release

PromptInit = Literal["vocab", "random"]
PROMPT_INITS = get_args(PromptInit)
#: the input embeddings of common transformers models (the piece checks it is the model's input embedding)
INPUT_EMBEDDINGS = r"(.*\.)?(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)"
#: the self-attention modules of common transformers models (Llama/Mistral/Qwen, GPT-2, BERT, Falcon)
SELF_ATTENTION = r".*\.(self_attn|attn|attention\.self|self_attention)"


@register("prompt")
@dataclass(frozen=True)
class PromptTuning(DeltaConfig):
    """n_tokens virtual tokens inserted into the input embeddings at `insert_at` (0: before the input; 1: after a
    leading [CLS], so a BERT-style pooler still reads it); init "vocab" copies the embeddings of random tokens."""

    targets: TargetSpec = INPUT_EMBEDDINGS
    n_tokens: PositiveInt = 20
    init: PromptInit = "vocab"
    insert_at: NonNegativeInt = 0

    def piece_class(self, module: Any = None) -> type[Piece]:
        return PromptPiece


class PromptPiece(Piece):
    """The virtual token embeddings P [n, d_model] on the model's input embedding."""

    supported: ClassVar[tuple[str, ...]] = ("Embedding",)
    position: ClassVar[str] = "attention"

    def __init__(self, base: nn.Module, path: str, cfg: PromptTuning) -> None:
        super().__init__(base, path, cfg)
        table = base.weight.detach()
        dtype = master_dtype(table.dtype)
        if cfg.init == "vocab":  # Lester et al.: start from the embeddings of (here: uniformly) sampled tokens
            ids = torch.randint(0, table.shape[0], (cfg.n_tokens,))
            prompt = table[ids.to(table.device)].to(dtype).clone()
        else:
            prompt = torch.randn(cfg.n_tokens, table.shape[1], dtype=dtype, device=table.device) * table.float().std()
        self.prompt = nn.Parameter(prompt)

    def prompt_embeddings(self) -> Tensor:
        return self.prompt

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        return acc  # applied by the model-level hooks (hooks.py), not at the embedding's output

    def install(self, model: nn.Module, module: nn.Module) -> None:
        get = getattr(model, "get_input_embeddings", None)
        if not callable(get) or get() is not module:
            raise TargetError(f"prompt tuning adds virtual tokens to the model's input embeddings; {self.path!r} is not "
                              f"{type(model).__name__}'s input embedding (get_input_embeddings()): set targets to it")
        acquire(model, "prompt", model, lambda: prompt_hooks(model))

    def uninstall(self, model: nn.Module, module: nn.Module) -> None:
        release(model, "prompt")


@register("prefix")
@dataclass(frozen=True)
class PrefixTuning(DeltaConfig):
    """n_tokens trainable keys and values in front of every targeted self-attention's own; `projection` > 0 trains
    them through a per-layer MLP of that hidden size (Li & Liang's reparameterisation), saved as plain prefixes."""

    targets: TargetSpec = SELF_ATTENTION
    n_tokens: PositiveInt = 20
    projection: NonNegativeInt = 0

    def piece_class(self, module: Any = None) -> type[Piece]:
        return PrefixPiece


def attention_shape(module: nn.Module, path: str) -> tuple[int, int, int]:
    """(kv_heads, head_dim, d_model) of a transformers self-attention module, or TargetError."""
    names = {p.name for p in forward_parameters(module)}
    cfg = getattr(module, "config", None)
    if not {"attention_mask", "past_key_values"} <= names or not hasattr(cfg, "num_attention_heads"):
        raise TargetError(f"module {path!r} is a {type(module).__name__}; prefix tuning adapts transformers self-attention "
                          f"modules (forward(hidden_states, attention_mask=, past_key_values=) with a config). Set "
                          f"targets to the attention modules, e.g. 'self_attn' or 'attention.self'")
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return int(kv_heads), int(head_dim), int(cfg.hidden_size)


def _linear(out_f: int, in_f: int, dtype: torch.dtype, device: Any) -> tuple[nn.Parameter, nn.Parameter]:
    """A weight [out, in] and bias initialised like nn.Linear's."""
    bound = 1 / math.sqrt(in_f)
    w = torch.empty(out_f, in_f, dtype=dtype, device=device).uniform_(-bound, bound)
    b = torch.empty(out_f, dtype=dtype, device=device).uniform_(-bound, bound)
    return nn.Parameter(w), nn.Parameter(b)


class PrefixPiece(Piece):
    """Prefix keys and values [kv_heads, n, head_dim] for one attention module (or the MLP that makes them)."""

    supported: ClassVar[tuple[str, ...] | None] = None  # self-attention modules (checked by attention_shape)
    position: ClassVar[str] = "attention"

    def __init__(self, base: nn.Module, path: str, cfg: PrefixTuning) -> None:
        super().__init__(base, path, cfg)
        self.kv_heads, self.head_dim, d_model = attention_shape(base, path)
        ref = next((p for p in base.parameters() if p.is_floating_point()), None)  # not a quantised weight's bytes
        dtype = master_dtype(ref.dtype) if ref is not None else torch.float32
        device = ref.device if ref is not None else None
        n, d_kv = cfg.n_tokens, self.kv_heads * self.head_dim
        self.reparameterised = cfg.projection > 0
        self.loaded_plain = False
        if self.reparameterised:  # [K; V] = tanh(E W1ᵀ + b1) W2ᵀ + b2
            self.embedding = nn.Parameter(torch.randn(n, d_model, dtype=dtype, device=device))
            self.w1, self.b1 = _linear(cfg.projection, d_model, dtype, device)
            self.w2, self.b2 = _linear(2 * d_kv, cfg.projection, dtype, device)
        else:
            shape = (self.kv_heads, n, self.head_dim)
            self.prefix_keys = nn.Parameter(torch.randn(shape, dtype=dtype, device=device))
            self.prefix_values = nn.Parameter(torch.randn(shape, dtype=dtype, device=device))

    def prefix_kv(self) -> tuple[Tensor, Tensor]:
        """(K, V), each [kv_heads, n, head_dim]."""
        if not self.reparameterised:
            return self.prefix_keys, self.prefix_values
        kv = torch.tanh(self.embedding @ self.w1.t() + self.b1) @ self.w2.t() + self.b2  # [n, 2·d_kv]
        n = kv.shape[0]
        k, v = kv.view(n, 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3).unbind(0)
        return k, v

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        return acc  # applied by the attention module's pre-hook (hooks.py)

    def install(self, model: nn.Module, module: nn.Module) -> None:
        acquire(module, "prefix", model, lambda: prefix_hooks(module))

    def uninstall(self, model: nn.Module, module: nn.Module) -> None:
        release(module, "prefix")

    # --- files: the reparameterisation is folded into plain prefixes -------------------------------------------
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if not self.reparameterised:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        with torch.no_grad():
            k, v = self.prefix_kv()
        destination[prefix + "prefix_keys"] = k.contiguous()
        destination[prefix + "prefix_values"] = v.contiguous()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        if self.reparameterised and prefix + "prefix_keys" in state_dict:  # plain prefixes replace the MLP
            ref = self.embedding
            for name in ("embedding", "w1", "b1", "w2", "b2"):
                delattr(self, name)
            shape = (self.kv_heads, self.cfg.n_tokens, self.head_dim)
            self.prefix_keys = nn.Parameter(torch.empty(shape, dtype=ref.dtype, device=ref.device))
            self.prefix_values = nn.Parameter(torch.empty(shape, dtype=ref.dtype, device=ref.device))
            self.reparameterised, self.loaded_plain = False, True
        super()._load_from_state_dict(state_dict, prefix, *args)

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer | None, step: int, total: int | None = None) -> None:
        if self.loaded_plain and optimizer is not None:
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if id(self.prefix_keys) not in held:
                raise StateError(f"the reparameterised prefix at {self.path!r} was replaced by plain prefixes loaded from a "
                                 f"file (files hold plain prefixes), which this optimizer does not train; resuming a "
                                 f"PrefixTuning(projection>0) run is not supported — train with projection=0 to resume")
