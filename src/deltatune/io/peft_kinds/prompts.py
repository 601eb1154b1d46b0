"""PEFT PROMPT_TUNING <-> PromptTuning.

peft saves the virtual tokens as one tensor `prompt_embeddings` [n, d_model] (no module path): ours sits on the
model's input embedding, so a read delta names its module only once it meets a model (`for_model` finds
`get_input_embeddings()`). peft prepends the tokens (ours with insert_at=0); the real tokens then follow them in
both libraries, so logits at the real tokens and generated tokens agree (peft's causal-LM logits also hold the n
virtual positions, ours do not). Refused: encoder-decoder models (num_transformer_submodules=2), insert_at > 0."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ...core.errors import CorruptFileError, TargetError, UnsupportedError
from ...methods.prompts.prompts import PromptTuning
from ..delta import Delta
from ..peft import PeftFile, PeftKind, register_kind, task_type

KEY = "prompt_embeddings"
PLACE = "<input embeddings>"  # the module path a read prompt gets from the model
_KNOWN = frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                    "num_layers", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                    "tokenizer_kwargs", "modules_to_save"})


class PlacedDelta(Delta):
    """A delta read from a file that names no module: `places[key] -> how to find its path on a model`."""

    @property
    def needs_model(self) -> str:  # type: ignore[override]
        return (f"PEFT prompt adapter {self.name!r} names no module: its tokens go on the model's input embeddings; "
                f"load it onto the model first (dt.load, then dt.save; or `deltatune convert --base MODEL_DIR`)")

    def for_model(self, model: nn.Module) -> Delta:
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        path = next((p for p, m in model.named_modules() if m is emb), None) if emb is not None else None
        if path is None:
            raise TargetError(f"PEFT prompt adapter {self.name!r} goes on the model's input embeddings, which this "
                              f"{type(model).__name__} does not expose (get_input_embeddings())")
        state = {(path if p == PLACE else p): st for p, st in self.state.items()}
        types = {(path if p == PLACE else p): t for p, t in self.module_types.items()}
        return Delta(self.name, self.config, state, types, dict(self.base)).for_model(model)


def read(file: PeftFile) -> Delta:
    if file.number("num_transformer_submodules", int, default=1) != 1:
        raise UnsupportedError(f"{file.where} prompts an encoder-decoder model (num_transformer_submodules="
                               f"{file.cfg.get('num_transformer_submodules')}); deltatune's prompt tuning adapts one stack")
    t = file.tensors.pop(KEY, None)
    if t is None:
        raise CorruptFileError(f"{file.where} lacks {KEY}")
    n = file.number("num_virtual_tokens", int)
    if t.dim() != 2 or t.shape[0] != n or not t.is_floating_point():
        raise CorruptFileError(f"{file.where}: {KEY} has shape {tuple(t.shape)} ({t.dtype}), expected [{n}, d_model] "
                               f"floats")
    config = file.config(PromptTuning, n_tokens=n, init="random")
    return PlacedDelta(file.name(), config, {PLACE: {"prompt": t}}, {PLACE: "Embedding"}, file.base())


def write(delta: Delta, paths: list[str], where: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    cfg: PromptTuning = delta.config  # type: ignore[assignment]
    if cfg.insert_at != 0:
        raise UnsupportedError(f"{where}: peft prepends the virtual tokens; insert_at={cfg.insert_at} has no PEFT form")
    if len(paths) != 1:
        raise UnsupportedError(f"{where} prompts {len(paths)} embeddings; peft's prompt tuning has one")
    t = delta.state[paths[0]]["prompt"]
    return {KEY: t}, {"task_type": task_type(delta.base.get("model_class")), "num_virtual_tokens": int(t.shape[0]),
                      "token_dim": int(t.shape[1]), "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM"}


register_kind(PeftKind("PROMPT_TUNING", (PromptTuning,), read, write, fields=_KNOWN, prefix="base_model.",
                       description="prompt tuning: virtual input tokens"))
