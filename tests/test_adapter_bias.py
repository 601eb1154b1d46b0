"""AdapterBias (methods/adapter_bias.py): h' = h + (h · w_α) v on a module's output; ΔW = v (w_αᵀ W), Δb = v (w_α · b).

Every check compares with a reference written here: plain forward hooks on an untouched copy of the base, or the
update formula by hand. The generic checks every method gets (tests/test_capability_matrix.py) run too.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.layouts import layout_of
from deltatune.io.delta import Delta
from deltatune.methods.adapter_bias import AdapterBias

from conftest import Tiny, build_tiny, build_tiny_with_biases, module_pieces, randomize_delta

# targets per tiny model: the feed-forward output projections (the default, down_proj, is Llama's)
TARGETS = {"llama": None, "gpt2": r"(.*\.)?h\.\d+\.mlp\.c_proj", "bert": r"(.*\.)?layer\.\d+\.output\.dense"}
MODELS = sorted(TARGETS)


def setup(kind: str, randomize: bool = True) -> Tiny:
    """A tiny model of `kind` (non-zero biases) with AdapterBias attached as "ab", its parameters randomised."""
    tiny = build_tiny_with_biases(kind) if kind != "llama" else build_tiny(kind)
    cfg = AdapterBias() if TARGETS[kind] is None else AdapterBias(targets=TARGETS[kind])
    dt.attach(tiny.model, cfg, name="ab")
    if randomize:
        randomize_delta(tiny.model, "ab", std=0.5)
    return tiny


def reference(tiny: Tiny) -> nn.Module:
    """A copy of the base where plain forward hooks add (out · w_α) v to each targeted module's output, with the
    attached delta's current w_α and v."""
    ref = tiny.fresh()
    modules = dict(ref.named_modules())
    for path, (_, piece) in module_pieces(tiny.model, "ab").items():
        w, v = piece.w_alpha.detach().clone(), piece.v.detach().clone()

        def shift(module: nn.Module, args: tuple, out: torch.Tensor, w=w, v=v) -> torch.Tensor:
            return out + (out @ w)[..., None] * v

        modules[path].register_forward_hook(shift)
    return ref


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if ".deltatune." not in k}


@pytest.mark.parametrize("kind", MODELS)
def test_output_is_the_formula(kind: str) -> None:
    tiny = setup(kind)
    base = tiny.logits(tiny.fresh())
    want = tiny.logits(reference(tiny)) - base  # the change (small on BERT, whose LayerNorm follows the shift)
    assert want.abs().max() > 1e-4, "the randomised delta changes nothing"
    torch.testing.assert_close(tiny.logits() - base, want, atol=1e-6, rtol=1e-3)


@pytest.mark.parametrize("kind", MODELS)
def test_identity_at_init(kind: str) -> None:
    tiny = setup(kind, randomize=False)
    for _, piece in module_pieces(tiny.model, "ab").values():
        assert torch.count_nonzero(piece.v) == 0 and torch.count_nonzero(piece.w_alpha) > 0
    torch.testing.assert_close(tiny.logits(), tiny.logits(tiny.fresh()), atol=0, rtol=0)


def test_w_alpha_is_drawn_from_torch_rng() -> None:
    def first_w_alpha(seed: int) -> torch.Tensor:
        tiny = build_tiny("llama")
        torch.manual_seed(seed)
        dt.attach(tiny.model, AdapterBias(), name="ab")
        return next(iter(module_pieces(tiny.model, "ab").values()))[1].w_alpha.detach()

    torch.testing.assert_close(first_w_alpha(0), first_w_alpha(0), atol=0, rtol=0)
    assert not torch.equal(first_w_alpha(0), first_w_alpha(1))


@pytest.mark.parametrize("kind", MODELS)
def test_merged_equals_unmerged_and_unmerge_restores(kind: str) -> None:
    tiny = setup(kind)
    w0, y = base_weights(tiny.model), tiny.logits()
    dt.merge(tiny.model)
    changed = [k for k, v in base_weights(tiny.model).items() if not torch.equal(v, w0[k])]
    assert changed and all(k.rsplit(".", 1)[0] in module_pieces(tiny.model, "ab") for k in changed)
    torch.testing.assert_close(tiny.logits(), y, atol=1e-5, rtol=0)
    dt.unmerge(tiny.model)
    for k, v in base_weights(tiny.model).items():
        torch.testing.assert_close(v, w0[k], atol=1e-6, rtol=0, msg=f"unmerge left {k} changed")
    torch.testing.assert_close(tiny.logits(), y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", MODELS)
def test_detached_update_is_v_times_w_alpha_W(kind: str) -> None:
    tiny = setup(kind)
    delta = Delta.from_model(tiny.model, "ab")
    tensors, biases = delta.tensors(base=tiny.model), delta.biases(base=tiny.model)
    pieces = module_pieces(tiny.model, "ab")
    assert set(tensors) == set(pieces)
    for path, (module, piece) in pieces.items():
        layout = layout_of(module, path)
        w, b = layout.weight(module).detach(), module.bias
        v, w_alpha = piece.v.detach(), piece.w_alpha.detach()
        want = torch.outer(v, w_alpha @ w)  # v (w_αᵀ W), [out, in]
        assert tensors[path].shape == want.shape and tensors[path].rank == 1  # kept as its rank-one factors
        torch.testing.assert_close(tensors[path].to_dense(), want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(piece.delta_weight(module).to_dense(), want, atol=1e-6, rtol=1e-5)
        if b is None:
            assert path not in biases
        else:
            torch.testing.assert_close(biases[path], v * (w_alpha @ b.detach()), atol=1e-6, rtol=1e-5)
    with pytest.raises(dt.errors.UnsupportedError, match="base"):
        delta.tensors()  # the update depends on W: a detached delta needs base=


@pytest.mark.parametrize("kind", MODELS)
def test_save_load_gives_equal_logits(kind: str, tmp_path) -> None:
    tiny = setup(kind)
    y = tiny.logits()
    dt.save(tiny.model, tmp_path / "ab", name="ab")
    fresh = tiny.fresh()
    dt.load(fresh, tmp_path / "ab")
    torch.testing.assert_close(tiny.logits(fresh), y, atol=0, rtol=0)
    assert dt.Delta.read(tmp_path / "ab").config == tiny.model.__dict__["_deltatune_state"].deltas["ab"].config


@pytest.mark.parametrize("kind", MODELS)
def test_gradients_reach_only_v_and_w_alpha(kind: str) -> None:
    tiny = setup(kind)
    tiny.model.train()
    tiny.logits(grad=True).float().pow(2).mean().backward()
    own = {f"{path}.deltatune.ab.{n}" for path in module_pieces(tiny.model, "ab") for n in ("v", "w_alpha")}
    for name, p in tiny.model.named_parameters():
        if name in own:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, f"base parameter {name} got a gradient"
    assert {n for n, _ in tiny.model.named_parameters() if ".deltatune." in n} == own


def test_at_init_only_v_gets_a_gradient() -> None:
    """With v = 0 the shift (h · w_α) v has no gradient in w_α; v's is Σ_tokens (h · w_α) ∂L/∂h' ≠ 0."""
    tiny = setup("llama", randomize=False)
    tiny.model.train()
    tiny.logits(grad=True).pow(2).mean().backward()
    for _, piece in module_pieces(tiny.model, "ab").values():
        assert piece.v.grad.abs().sum() > 0
        assert torch.count_nonzero(piece.w_alpha.grad) == 0


def test_config_round_trips_and_refuses_unknown_keys() -> None:
    cfg = AdapterBias(targets=["c_proj"])
    assert cfg.kind == "adapter_bias" and cfg.targets == ("c_proj",)
    assert dt.DeltaConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(dt.errors.ConfigError, match="unknown key"):
        AdapterBias(r=4)


def test_exported_by_discovery() -> None:
    """Adding the file is all it takes: `deltatune.methods` imports it, `dt` exports the registered config."""
    assert dt.AdapterBias is AdapterBias
    assert "AdapterBias" in dt.__all__ and dt.methods.AdapterBiasPiece.__name__ == "AdapterBiasPiece"


def test_the_architecture_walkthrough_shows_this_file_verbatim() -> None:
    """docs/architecture.md walks through adding this method; its code block is the file, so the doc cannot drift."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "architecture.md").read_text()
    section = doc[doc.index("## Adding a method: AdapterBias"):]
    start = section.index("```python")
    block = section[section.index("\n", start) + 1:]  # after the fence line (its info string may carry markers)
    block = block[:block.index("```")]
    assert block == (root / "src" / "deltatune" / "methods" / "adapter_bias.py").read_text()
