"""Where bottleneck adapters go in known architectures: model_type -> the modules playing each role.

Roles:
    attention_output  the attention block's output projection (series adapters act on its output)
    ffn_output        the feed-forward block's output projection (series adapters act on its output)
    ffn               the whole feed-forward block, and which of its arguments is the block's input x
                      (parallel adapters add s·U σ(D x) to what the block adds to the residual stream)
    attention_norm    the LayerNorm a post-LN block applies to (attention output + residual); series adapters with
    ffn_norm          original_ln_before act on its input (BERT-style blocks only; pre-LN decoders have none)

Patterns are full-match regexes on module paths. BERT-style blocks split the FFN in two (BertIntermediate,
then BertOutput(hidden_states, input_tensor) = LN(dense(hidden_states) + input_tensor)): the FFN input is
BertOutput's argument 1, which it adds to its output before the LayerNorm.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...core.errors import TargetError

ROLES = ("attention_output", "ffn_output", "ffn", "attention_norm", "ffn_norm")


@dataclass(frozen=True)
class Site:
    pattern: str  # full-match regex on module paths
    input_arg: int = 0  # for the "ffn" role: the argument of the module that is the block's input


_DECODER = {"attention_output": Site(r"(.*\.)?layers\.\d+\.self_attn\.o_proj"),
            "ffn_output": Site(r"(.*\.)?layers\.\d+\.mlp\.down_proj"),
            "ffn": Site(r"(.*\.)?layers\.\d+\.mlp")}
_GPT2 = {"attention_output": Site(r"(.*\.)?h\.\d+\.attn\.c_proj"),
         "ffn_output": Site(r"(.*\.)?h\.\d+\.mlp\.c_proj"),
         "ffn": Site(r"(.*\.)?h\.\d+\.mlp")}
_BERT = {"attention_output": Site(r"(.*\.)?layer\.\d+\.attention\.output\.dense"),
         "ffn_output": Site(r"(.*\.)?layer\.\d+\.output\.dense"),  # not attention.output.dense: "layer.N." first
         "ffn": Site(r"(.*\.)?layer\.\d+\.output", input_arg=1),
         "attention_norm": Site(r"(.*\.)?layer\.\d+\.attention\.output\.LayerNorm"),
         "ffn_norm": Site(r"(.*\.)?layer\.\d+\.output\.LayerNorm")}

ADAPTER_MAP: dict[str, dict[str, Site]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"), _DECODER),
    "gpt2": _GPT2,
    **dict.fromkeys(("bert", "roberta"), _BERT),
}


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def sites(model: nn.Module, roles: tuple[str, ...], owner: str) -> list[Site]:
    """The sites of `roles` in `model`'s architecture, or TargetError telling `owner`'s user to pass targets=."""
    kind = model_type(model)
    if kind not in ADAPTER_MAP:
        raise TargetError(f"{owner}(targets='auto') knows where adapters go in {sorted(ADAPTER_MAP)}, not in "
                          f"{type(model).__name__} (model_type {kind!r}); pass targets= explicitly: module name suffixes "
                          f"or a full-match regex of the {' and '.join(r.replace('_', ' ') for r in roles)} modules")
    lacking = [r for r in roles if r not in ADAPTER_MAP[kind]]
    if lacking:
        raise TargetError(f"{owner}(targets='auto'): {type(model).__name__} (model_type {kind!r}) has no "
                          f"{' or '.join(r.replace('_', ' ') for r in lacking)} module; the option that needs it "
                          f"applies to post-LayerNorm blocks ({', '.join(k for k, v in ADAPTER_MAP.items() if set(lacking) <= set(v))})")
    return [ADAPTER_MAP[kind][r] for r in roles]
