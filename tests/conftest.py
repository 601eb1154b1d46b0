"""Shared tiny models, built in code (no downloads), fp32, seeded, all dropout off, in eval mode.

Each fixture returns a fresh `Tiny`: the model, inputs for it, and `logits(model)` to run them. Use
`tiny.fresh()` for an untouched deepcopy of the pristine base (e.g. to load a saved delta into).

    tiny_llama  LlamaForCausalLM, Linear layers without bias, untied embeddings (vocab 64, hidden 16, 2 layers)
    tiny_gpt2   GPT2LMHeadModel, transformers Conv1D layers with bias, wte tied to lm_head
    tiny_bert   BertForSequenceClassification, Linear layers with bias, 3 labels
    tiny_mlp    nn.Sequential(Linear, Tanh, Linear, Tanh, Linear), all with bias; input [batch, 8] floats

`tiny_model` is parametrized over all four; `build_tiny(kind)` is the plain function behind the fixtures.
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

# Tiny tensors: one intra-op thread is fastest, and avoids OpenMP spin-waiting when several test runs share a
# few cores (2 threads on a loaded 2-core machine made a 4 ms forward take 300 ms).
torch.set_num_threads(1)

VOCAB = 64
HIDDEN = 16
SEQ = 6
BATCH = 2
MLP_IN = 8


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run the CPU suite's checks on CUDA: skipped where no GPU is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is false)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _auto_device_is_the_cpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default suite trains on the CPU even where a GPU is visible (`device: auto` reads DELTATUNE_DEVICE, and
    subprocesses inherit it); tests marked `gpu` see `auto` as it is."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("DELTATUNE_DEVICE", "cpu")


@dataclass
class Tiny:
    """A tiny model, its inputs, and how to get logits from it."""

    kind: str
    model: nn.Module
    inputs: dict[str, Any]
    _pristine: nn.Module = field(repr=False, default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self._pristine is None:
            self._pristine = copy.deepcopy(self.model)

    def logits(self, model: nn.Module | None = None, grad: bool = False) -> Tensor:
        """Logits of `model` (default: self.model) on the fixed inputs; no_grad unless grad=True."""
        model = self.model if model is None else model
        with torch.set_grad_enabled(grad):
            out = model(**self.inputs)
        return out if isinstance(out, Tensor) else out.logits

    def fresh(self) -> nn.Module:
        """An untouched copy of the base model as built (eval mode)."""
        return copy.deepcopy(self._pristine)


def build_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=False, attention_dropout=0.0, pad_token_id=0)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).float().eval()


def build_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).float().eval()


def build_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    cfg._attn_implementation = "eager"
    return BertForSequenceClassification(cfg).float().eval()


def build_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(MLP_IN, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4)).eval()


BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "llama": build_llama, "gpt2": build_gpt2, "bert": build_bert, "mlp": build_mlp,
}


def inputs_for(kind: str, seed: int = 1) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return {"input": torch.randn(BATCH, MLP_IN, generator=g)}
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    if kind == "bert":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"input_ids": ids}


@functools.lru_cache(maxsize=None)
def _prototype(kind: str, seed: int) -> nn.Module:
    return BUILDERS[kind](seed)


def build_tiny(kind: str, seed: int = 0) -> Tiny:
    """A fresh tiny model of `kind` (one of BUILDERS) with its inputs; built once per (kind, seed), then copied."""
    return Tiny(kind, copy.deepcopy(_prototype(kind, seed)), inputs_for(kind))


@pytest.fixture
def tiny_llama() -> Tiny:
    return build_tiny("llama")


@pytest.fixture
def tiny_gpt2() -> Tiny:
    return build_tiny("gpt2")


@pytest.fixture
def tiny_bert() -> Tiny:
    return build_tiny("bert")


@pytest.fixture
def tiny_mlp() -> Tiny:
    return build_tiny("mlp")


@pytest.fixture(params=sorted(BUILDERS))
def tiny_model(request: pytest.FixtureRequest) -> Tiny:
    return build_tiny(request.param)


def build_tiny_with_biases(kind: str, seed: int = 7) -> Tiny:
    """A tiny model whose biases are non-zero (HF initialises them to zero, which would hide bias bugs)."""
    t = build_tiny(kind)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in t.model.named_parameters():
            if name.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return Tiny(kind, t.model, t.inputs)


def randomize_delta(model: nn.Module, name: str, seed: int = 0, std: float = 0.3) -> None:
    """Add N(0, std²) noise to every parameter of delta `name`, so tests of its formula can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f".deltatune.{name}." in pname:
                p.add_(torch.randn(p.shape, generator=g) * std)


def pieces_of(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """{path: piece} of delta `name`, read from the modules directly."""
    return {path: piece for path, (_, piece) in module_pieces(model, name).items()}


def module_pieces(model: nn.Module, name: str) -> dict[str, tuple[nn.Module, nn.Module]]:
    """{path: (module, piece)} of delta `name`, read from the modules directly (not through deltatune's API)."""
    out = {}
    for path, module in model.named_modules():
        slot = module._modules.get("deltatune")
        if slot is not None and name in slot:
            out[path] = (module, slot[name])
    assert out, f"delta {name!r} sits on no module"
    return out


def compeft_oracle(x: Tensor, density: float, alpha: float) -> Tensor:
    """ComPEFT written out: the round(density·n) entries of largest |x| become α·std(x)·sign(x), the rest 0."""
    flat = x.detach().double().flatten()
    k = max(1, round(density * flat.numel()))
    keep = torch.sort(flat.abs(), descending=True).indices[:k]
    out = torch.zeros_like(flat)
    out[keep] = alpha * flat.std() * torch.sign(flat[keep])
    return out.reshape(x.shape)


def attached_piece_types(model: nn.Module) -> set[type]:
    """The classes of every piece attached anywhere in `model`."""
    return {type(p) for _, m in model.named_modules() if (s := m._modules.get("deltatune")) is not None
            for p in s.values()}


def assert_identity_where_plain(model: nn.Module, logits, base: torch.Tensor, kind: str) -> None:
    """Identity at init for a freshly attached delta: `logits()` equals `base` when every attached piece works on
    inputs, weights or outputs without per-call keywords (others need inputs of their own to be checked)."""
    if all(p.position in ("input", "weight", "output") and not p.keywords for p in attached_piece_types(model)):
        assert torch.allclose(logits(), base, atol=1e-5), kind
