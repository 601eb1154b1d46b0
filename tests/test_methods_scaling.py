"""SSF, BitFit and LayerNorm tuning × module types × capabilities, every assertion numeric (fp32, tiny models).

Expected outputs come from the formulas written out here, applied to a plain copy of the base model:

    SSF       y' = γ ⊙ y + β            ΔW = diag(γ − 1) W,  Δb = (γ − 1) ⊙ b + β   (β alone where there is no b)
    BitFit    y' = y + Δb               ΔW = 0,              Δb
    LNTuning  γ' = γ + Δγ, β' = β + Δβ  (the norm module's own scale and bias)

Several active deltas follow the weight-position sum W + ΔW₁ + ΔW₂ with every ΔW computed against the *base* W, so
an SSF delta next to a LoRA scales the base output only: y = γ ⊙ (x Wᵀ + b) + β + s·x (B A)ᵀ. A module without a bias
gets its Δb from a forward hook on the reference (an independent implementation of "+ Δb").

The base models are perturbed first (random biases, norm scales ≠ 1, norm biases ≠ 0: HF initialises them to 1/0,
which would hide a wrong formula), and delta tensors are randomised before every merge/formula check.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune.core.errors import StateError, TargetError, UnsupportedError
from deltatune.core.layouts import is_norm

from conftest import Tiny, build_tiny, module_pieces

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]

ATOL = 1e-5


def perturbed(kind: str, seed: int = 5) -> Tiny:
    """A conftest tiny model with non-trivial biases and norm parameters (the pristine copy is the perturbed one)."""
    t = build_tiny(kind)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in t.model.modules():
            if "Norm" in type(module).__name__ and getattr(module, "weight", None) is not None:
                module.weight.mul_(1 + 0.3 * torch.randn(module.weight.shape, generator=g))
            b = module._parameters.get("bias")
            if b is not None:
                b.add_(0.2 * torch.randn(b.shape, generator=g))
    return Tiny(kind, t.model, t.inputs)


# --- the matrix ---------------------------------------------------------------------------------------------------
# case -> (model kind, config); Llama has no biases anywhere (SSF's β cannot be merged there)
CASES = {
    "ssf-llama": ("llama", dt.SSF()),
    "ssf-gpt2": ("gpt2", dt.SSF()),
    "ssf-bert": ("bert", dt.SSF()),
    "ssf-bert-norms": ("bert", dt.SSF(targets="all-norm")),
    "bitfit-gpt2": ("gpt2", dt.BitFit()),
    "bitfit-bert": ("bert", dt.BitFit()),
    "bitfit-bert-norms": ("bert", dt.BitFit(targets=("LayerNorm",))),
    "ln-llama": ("llama", dt.LNTuning()),
    "ln-gpt2": ("gpt2", dt.LNTuning()),
    "ln-bert": ("bert", dt.LNTuning()),
    "ln-bert-scale-only": ("bert", dt.LNTuning(bias=False)),
}
MERGEABLE = [c for c in CASES if c != "ssf-llama"]


def setup(case: str, name: str = "a") -> tuple[Tiny, dt.DeltaConfig]:
    kind, cfg = CASES[case]
    tiny = perturbed(kind)
    dt.attach(tiny.model, cfg, name)
    return tiny, cfg


@torch.no_grad()
def randomize(model: nn.Module, name: str, seed: int = 7) -> None:
    """Every delta tensor made non-trivial: γ = 1 + noise, everything else noise."""
    g = torch.Generator().manual_seed(seed)
    for _, piece in module_pieces(model, name).values():
        for pname, p in piece.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.3 * noise if pname == "scale" else 0.3 * noise)


# --- the formulas, from the module types and the pieces' raw tensors ------------------------------------------------
def native_rows(module: nn.Module, v: Tensor) -> Tensor:
    """`v` ([out]) shaped to scale the output features of the module's weight in its own storage layout."""
    w = module.weight
    if w.dim() == 1:
        return v
    if isinstance(module, nn.Linear):
        return v[:, None]
    if isinstance(module, Conv1D):  # stored [in, out]
        return v[None, :]
    raise AssertionError(type(module))


def lora_native(module: nn.Module, piece: nn.Module, cfg: dt.LoRA) -> Tensor:
    dw = (cfg.alpha / cfg.r) * piece.lora_B.detach() @ piece.lora_A.detach()
    return dw if isinstance(module, nn.Linear) else dw.t()


def formula_update(cfg: dt.DeltaConfig, module: nn.Module, piece: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(ΔW in the module's native layout, Δb or None) against the module's current (base) weights."""
    w, b = module.weight.detach(), module._parameters.get("bias")
    b = None if b is None else b.detach()
    if isinstance(cfg, dt.SSF):
        gamma, beta = piece.scale.detach(), piece.shift.detach()
        return native_rows(module, gamma - 1) * w, beta if b is None else (gamma - 1) * b + beta
    if isinstance(cfg, dt.BitFit):
        return torch.zeros_like(w), piece.bias.detach()
    if isinstance(cfg, dt.LNTuning):
        return piece.delta.detach(), piece.bias.detach() if hasattr(piece, "bias") else None
    if isinstance(cfg, dt.LoRA):
        return lora_native(module, piece, cfg), None
    raise AssertionError(cfg)


def reference(tiny: Tiny, model: nn.Module, deltas: dict[str, dt.DeltaConfig]) -> nn.Module:
    """A plain copy of the base with W + Σ ΔW and b + Σ Δb; Δb of a module without a bias is added by a hook."""
    ref = tiny.fresh()
    base = dict(tiny.fresh().named_modules())
    mods = dict(ref.named_modules())
    extra: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, cfg in deltas.items():
            for path, (_, piece) in module_pieces(model, name).items():
                dw, db = formula_update(cfg, base[path], piece)  # against the base, not the running sum
                mods[path].weight.add_(dw)
                if db is None:
                    continue
                if mods[path]._parameters.get("bias") is not None:
                    mods[path].bias.add_(db)
                else:
                    extra[path] = extra.get(path, 0) + db
    for path, db in extra.items():
        mods[path].register_forward_hook(lambda m, a, out, db=db: out + db)
    return ref


def base_params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "deltatune" not in k}


def assert_params_equal(model: nn.Module, before: dict[str, Tensor], atol: float = 0.0) -> None:
    for k, v in base_params(model).items():
        torch.testing.assert_close(v, before[k], atol=atol, rtol=0, msg=f"{k} changed")


# --- 1. identity at init (on non-trivial base weights) ---------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_identity_at_init(case: str) -> None:
    kind, cfg = CASES[case]
    tiny = perturbed(kind)
    y0 = tiny.logits()
    dt.attach(tiny.model, cfg, "a")
    torch.testing.assert_close(tiny.logits(), y0, atol=ATOL, rtol=0)
    torch.testing.assert_close(tiny.logits(grad=True).detach(), y0, atol=ATOL, rtol=0)


# --- 2. forward == formula; merged == unmerged; unmerge restores ------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_formula(case: str) -> None:
    tiny, cfg = setup(case)
    randomize(tiny.model, "a")
    want = tiny.logits(reference(tiny, tiny.model, {"a": cfg}))
    assert (want - tiny.logits(tiny.fresh())).abs().max() > 1e-3, "randomised delta should change the logits"
    torch.testing.assert_close(tiny.logits(), want, atol=ATOL, rtol=0)  # no-grad (in-place) path
    torch.testing.assert_close(tiny.logits(grad=True).detach(), want, atol=ATOL, rtol=0)  # autograd path


@pytest.mark.parametrize("case", MERGEABLE)
def test_merge_equals_unmerged_and_unmerge_restores(case: str) -> None:
    tiny, _ = setup(case)
    model = tiny.model
    randomize(model, "a")
    w0 = base_params(model)
    y = tiny.logits()
    dt.merge(model)
    assert dt.summary(model)["a"].merged
    torch.testing.assert_close(tiny.logits(), y, atol=ATOL, rtol=0)
    assert any(not torch.equal(v, w0[k]) for k, v in base_params(model).items()), "merge changed no weight"
    dt.unmerge(model)
    assert_params_equal(model, w0, atol=1e-6)
    torch.testing.assert_close(tiny.logits(), y, atol=ATOL, rtol=0)
    dt.unload(model, merge_active=True)  # the plain model with the delta folded in
    assert not any("deltatune" in n for n, _ in model.named_modules())
    torch.testing.assert_close(tiny.logits(), y, atol=ATOL, rtol=0)


def test_ssf_shift_on_a_module_without_bias_refuses_to_merge() -> None:
    tiny, _ = setup("ssf-llama")
    randomize(tiny.model, "a")
    w0, y = base_params(tiny.model), tiny.logits()
    with pytest.raises(UnsupportedError, match=r"q_proj.*no bias parameter.*keep it unmerged"):
        dt.merge(tiny.model)
    assert_params_equal(tiny.model, w0)
    assert not dt.summary(tiny.model)["a"].merged
    torch.testing.assert_close(tiny.logits(), y, atol=0, rtol=0)


# --- 3. save -> load ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_save_load_roundtrip(case: str, tmp_path: Path) -> None:
    tiny, cfg = setup(case)
    randomize(tiny.model, "a")
    y = tiny.logits()
    dt.save(tiny.model, tmp_path / "d", name="a")
    d = dt.Delta.read(tmp_path / "d")
    assert d.config == cfg
    live = {path: piece.state_dict() for path, (_, piece) in module_pieces(tiny.model, "a").items()}
    assert set(d.state) == set(live)
    for path, st in live.items():
        assert set(d.state[path]) == set(st)
        assert all(torch.equal(d.state[path][k], t) for k, t in st.items())
    # the update without a model: LN tuning holds it outright; SSF (W-dependent) and BitFit (ΔW = 0 of W's shape) need W
    base = dict(tiny.fresh().named_modules())
    for path, (_, piece) in module_pieces(tiny.model, "a").items():
        dw, db = d.update(path, base=tiny.fresh())
        want_w, want_b = formula_update(cfg, base[path], piece)
        native = dw.to_dense() if want_w.dim() == 1 or isinstance(base[path], nn.Linear) else dw.to_dense().t()
        torch.testing.assert_close(native, want_w, atol=1e-6, rtol=0)
        if want_b is None:
            assert db is None
        else:
            torch.testing.assert_close(db, want_b, atol=1e-6, rtol=0)
    if isinstance(cfg, dt.LNTuning):
        assert set(d.tensors()) == set(live)
    else:
        with pytest.raises(UnsupportedError, match="base"):
            d.tensors()
    fresh = tiny.fresh()
    dt.load(fresh, tmp_path / "d")
    torch.testing.assert_close(tiny.logits(fresh), y, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in fresh.parameters())


# --- 4. gradients reach only the delta's own parameters --------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_grads_only_on_delta_params(case: str) -> None:
    tiny, _ = setup(case)
    model = tiny.model
    randomize(model, "a")
    model.train()
    y = tiny.logits(grad=True)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    for n, p in model.named_parameters():
        if "deltatune" not in n:
            assert not p.requires_grad and p.grad is None, f"base parameter {n} trainable or got a gradient"
    own = [(f"{path}.{k}", p) for path, (_, piece) in module_pieces(model, "a").items() for k, p in piece.named_parameters()]
    assert own
    for n, p in own:
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"


# --- 5. next to an active LoRA (and next to a second delta of the same method): the weight-position sum -------------
LORA = dt.LoRA(r=2, alpha=4.0)


@pytest.mark.parametrize("case", CASES)
def test_sum_with_active_lora_is_the_formula(case: str) -> None:
    tiny, cfg = setup(case)
    model = tiny.model
    torch.manual_seed(0)
    dt.attach(model, LORA, "lora")
    randomize(model, "a", seed=1)
    randomize(model, "lora", seed=2)
    dt.activate(model, ["a", "lora"])
    want = tiny.logits(reference(tiny, model, {"a": cfg, "lora": LORA}))
    torch.testing.assert_close(tiny.logits(), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(tiny.logits(grad=True).detach(), want, atol=ATOL, rtol=0)
    with dt.active(model, "lora"):
        torch.testing.assert_close(tiny.logits(), tiny.logits(reference(tiny, model, {"lora": LORA})), atol=ATOL, rtol=0)
    if case not in MERGEABLE:
        return
    w0 = base_params(model)
    dt.merge(model, ["a", "lora"])
    torch.testing.assert_close(tiny.logits(), want, atol=ATOL, rtol=0)
    dt.unmerge(model)
    assert_params_equal(model, w0, atol=1e-6)
    torch.testing.assert_close(tiny.logits(), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", MERGEABLE)
def test_two_deltas_of_one_method_add_up(case: str) -> None:
    tiny, cfg = setup(case)
    model = tiny.model
    dt.attach(model, cfg, "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    dt.activate(model, ["a", "b"])
    want = tiny.logits(reference(tiny, model, {"a": cfg, "b": cfg}))
    torch.testing.assert_close(tiny.logits(), want, atol=ATOL, rtol=0)
    dt.merge(model, ["a", "b"])
    torch.testing.assert_close(tiny.logits(), want, atol=ATOL, rtol=0)
    if isinstance(cfg, dt.SSF):  # weight-dependent: "b" left running unmerged would scale a W that holds "a"
        with pytest.raises(StateError, match="unmerge all"):
            dt.unmerge(model, "a")
        dt.unmerge(model)
    else:
        dt.unmerge(model, "a")  # not the newest: still exact
        torch.testing.assert_close(tiny.logits(), want, atol=ATOL, rtol=0)
        dt.unmerge(model, "b")
    torch.testing.assert_close(tiny.logits(), want, atol=ATOL, rtol=0)
    with dt.active(model, None):
        torch.testing.assert_close(tiny.logits(), tiny.logits(tiny.fresh()), atol=1e-6, rtol=0)


def test_ssf_is_weight_dependent_merging_lora_under_it_is_refused() -> None:
    """SSF scales W: merging only the LoRA would change the W the still-running SSF delta scales."""
    tiny, _ = setup("ssf-gpt2")
    model = tiny.model
    dt.attach(model, LORA, "lora")
    randomize(model, "a", seed=1)
    randomize(model, "lora", seed=2)
    dt.activate(model, ["a", "lora"])
    w0, y = base_params(model), tiny.logits()
    with pytest.raises(StateError, match="'a'"):
        dt.merge(model, "lora")
    assert_params_equal(model, w0)
    torch.testing.assert_close(tiny.logits(), y, atol=0, rtol=0)


# --- 6. trainable parameters = the papers' formulas -------------------------------------------------------------------
def _out_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, Conv1D):
        return module.nf
    return module.weight.shape[0]  # a norm of width d


@pytest.mark.parametrize("case", CASES)
def test_trainable_count_is_the_paper_formula(case: str) -> None:
    tiny, cfg = setup(case)
    modules = dict(tiny.model.named_modules())
    paths = list(module_pieces(tiny.model, "a"))
    if isinstance(cfg, dt.SSF):  # SSF (Lian et al. 2022, eq. 2): γ, β ∈ R^{d_out} per adapted operation -> 2·d_out
        want = sum(2 * _out_features(modules[p]) for p in paths)
    elif isinstance(cfg, dt.BitFit):  # BitFit (Ben Zaken et al. 2022): the bias b ∈ R^{d_out} of each layer -> d_out
        want = sum(_out_features(modules[p]) for p in paths)
    else:  # LN tuning (Zhao et al. 2023): γ ∈ R^d, plus β ∈ R^d for LayerNorm (RMSNorm has no β) -> d or 2·d
        want = sum(_out_features(modules[p]) * (2 if cfg.bias and modules[p]._parameters.get("bias") is not None else 1) for p in paths)
    assert dt.summary(tiny.model)["a"].trainable == want
    # and for a d_in × d_out = 4096 × 4096 layer (the docs' row): SSF 8192, BitFit 4096, LN tuning (LayerNorm) 8192
    big = nn.Linear(4096, 4096)
    for method, per_layer in ((dt.SSF(targets=("0",)), 2 * 4096), (dt.BitFit(targets=("0",)), 4096)):
        m = nn.Sequential(big)
        dt.attach(m, method, "x")
        assert dt.summary(m)["x"].trainable == per_layer
        dt.unload(m)
    m = nn.Sequential(nn.LayerNorm(4096))
    dt.attach(m, dt.LNTuning(), "x")
    assert dt.summary(m)["x"].trainable == 2 * 4096


def test_paper_counts_on_one_model() -> None:
    """Totals on tiny BERT (hidden 16, intermediate 32, 2 layers, a 16->16 pooler; head excluded)."""
    h, i, layers = 16, 32, 2
    per_layer_out = 4 * h + i + h  # query, key, value, attention.output.dense, intermediate.dense, output.dense
    linear_out = layers * per_layer_out + h  # + pooler.dense
    norms = 1 + 2 * layers  # embeddings.LayerNorm + two per layer
    counts = {}
    for name, cfg in (("ssf", dt.SSF()), ("bitfit", dt.BitFit()), ("ln", dt.LNTuning())):
        tiny = build_tiny("bert")
        dt.attach(tiny.model, cfg, name)
        counts[name] = dt.summary(tiny.model)[name].trainable
    assert counts == {"ssf": 2 * linear_out, "bitfit": linear_out, "ln": 2 * h * norms}


# --- 7. targeting norms, and refusals that leave the model untouched ---------------------------------------------------
@pytest.mark.parametrize("kind,want", [
    ("llama", ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
               "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm"]),
    ("gpt2", ["transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.h.1.ln_1", "transformer.h.1.ln_2",
              "transformer.ln_f"]),
    ("bert", ["bert.embeddings.LayerNorm", "bert.encoder.layer.0.attention.output.LayerNorm",
              "bert.encoder.layer.0.output.LayerNorm", "bert.encoder.layer.1.attention.output.LayerNorm",
              "bert.encoder.layer.1.output.LayerNorm"]),
])
def test_all_norm_targets_every_norm(kind: str, want: list[str]) -> None:
    tiny = build_tiny(kind)
    dt.attach(tiny.model, dt.LNTuning(), "a")
    assert sorted(module_pieces(tiny.model, "a")) == sorted(want)


def test_is_norm_rule() -> None:
    class LlamaLikeRMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    class LayerNorm2d(nn.LayerNorm):  # channel-first variants carry a 1-D weight too, but act on dim 1
        pass

    assert is_norm(nn.LayerNorm(4)) and is_norm(nn.RMSNorm(4)) and is_norm(LlamaLikeRMSNorm())
    assert not is_norm(nn.LayerNorm(4, elementwise_affine=False))  # nothing to tune
    assert not is_norm(nn.LayerNorm((2, 4)))  # 2-D scale
    assert not is_norm(nn.GroupNorm(2, 4)) and not is_norm(nn.BatchNorm1d(4)) and not is_norm(LayerNorm2d(4))
    assert not is_norm(nn.Linear(4, 4))


def _untouched(tiny: Tiny, cfg: dt.DeltaConfig, error: type, match: str) -> None:
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with pytest.raises(error, match=match):
        dt.attach(tiny.model, cfg, "a")
    assert not any("deltatune" in n for n, _ in tiny.model.named_modules())
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
    assert all(p.requires_grad for p in tiny.model.parameters())


def test_bitfit_on_a_model_without_biases_is_a_clear_error() -> None:
    _untouched(build_tiny("llama"), dt.BitFit(), TargetError, r"'model\.layers\.0\.self_attn\.q_proj'.*no bias.*exclude")
    _untouched(build_tiny("llama"), dt.BitFit(targets="all-norm"), TargetError, r"input_layernorm.*no bias")


def test_ln_tuning_refuses_other_module_types() -> None:
    _untouched(build_tiny("bert"), dt.LNTuning(targets=("query",)), TargetError, r"query.*Linear.*Norm")
    _untouched(build_tiny("gpt2"), dt.SSF(targets=("wte",)), TargetError, r"wte.*Embedding")


# --- 8. a norm parametrised as n(x) ⊙ (1 + γ) (Gemma): exact through the module's own forward -------------------------
class OffsetRMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.3 * torch.randn(d))
        self.eps = 1e-6

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


def test_ln_tuning_on_an_offset_norm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), OffsetRMSNorm(16), nn.Linear(16, 4)).eval()
    tiny = Tiny("offset", model, {"input": torch.randn(3, 8)})
    dt.attach(model, dt.LNTuning(), "a")
    dt.attach(model, dt.LNTuning(), "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    dt.activate(model, ["a", "b"])
    d = module_pieces(model, "a")["1"][1].delta + module_pieces(model, "b")["1"][1].delta
    x = torch.randn(3, 8)
    h = model[0](x)
    want = model[2](h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + model[1].weight + d))
    torch.testing.assert_close(model(x), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(tiny.logits(), tiny.logits(reference(tiny, model, {"a": dt.LNTuning(), "b": dt.LNTuning()})),
                               atol=ATOL, rtol=0)
    dt.merge(model, ["a", "b"])
    torch.testing.assert_close(model(x), want.detach(), atol=ATOL, rtol=0)


# --- 9. peft as the oracle: the same weights give the same logits ------------------------------------------------------
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("kind,targets", [
    ("llama", ["input_layernorm", "post_attention_layernorm", "norm"]),  # peft's default targets for llama
    ("gpt2", ["ln_1", "ln_2", "ln_f"]),                                   # ... and for gpt2
    ("bert", ["LayerNorm"]),
])
def test_ln_tuning_matches_peft(kind: str, targets: list[str]) -> None:
    pytest.importorskip("peft")
    from peft import LNTuningConfig, get_peft_model

    tiny = perturbed(kind)
    pm = get_peft_model(tiny.fresh(), LNTuningConfig(target_modules=targets))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # peft trains a copy of each norm: give the copies new weights
        for n, p in pm.named_parameters():
            if "ln_tuning_layers" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    pm.eval()
    ref = tiny.logits(pm)
    assert (ref - tiny.logits(tiny.fresh())).abs().max() > 1e-3
    model = tiny.fresh()
    dt.attach(model, dt.LNTuning(targets=tuple(targets)), "a")
    copies = {n.replace("base_model.model.", "").replace(".ln_tuning_layers.default", ""): p
              for n, p in pm.named_parameters() if "ln_tuning_layers" in n}
    base = dict(tiny.fresh().named_parameters())
    with torch.no_grad():
        for path, (_, piece) in module_pieces(model, "a").items():
            piece.delta.copy_(copies[f"{path}.weight"] - base[f"{path}.weight"])
            if hasattr(piece, "bias"):
                piece.bias.copy_(copies[f"{path}.bias"] - base[f"{path}.bias"])
    assert len(module_pieces(model, "a")) == sum(1 for n in copies if n.endswith(".weight"))
    torch.testing.assert_close(tiny.logits(model), ref, atol=ATOL, rtol=0)
    assert dt.summary(model)["a"].trainable == sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_bitfit_matches_peft_beft() -> None:
    """peft's BEFT adds a trained vector to the output of each targeted nn.Linear: BitFit's y + Δb."""
    pytest.importorskip("peft")
    from peft import BeftConfig, get_peft_model

    tiny = perturbed("bert")
    targets = ["query", "key", "value", "dense"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(tiny.fresh(), BeftConfig(target_modules=targets))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "beft_bias" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    pm.eval()
    ref = tiny.logits(pm)
    assert (ref - tiny.logits(tiny.fresh())).abs().max() > 1e-3
    model = tiny.fresh()
    dt.attach(model, dt.BitFit(targets=tuple(targets)), "a")
    vectors = {n.replace("base_model.model.", "").replace(".beft_bias.default", ""): p
               for n, p in pm.named_parameters() if "beft_bias" in n}
    with torch.no_grad():
        for path, (_, piece) in module_pieces(model, "a").items():
            piece.bias.copy_(vectors[path].reshape(-1))
    assert set(vectors) == set(module_pieces(model, "a"))
    torch.testing.assert_close(tiny.logits(model), ref, atol=ATOL, rtol=0)
    assert dt.summary(model)["a"].trainable == sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad)


# --- 10. mixed batches: one delta (or none) per example equals each example alone -------------------------------------
@pytest.mark.parametrize("kind,methods", [
    ("gpt2", {"ssf": dt.SSF(), "bitfit": dt.BitFit(), "ln": dt.LNTuning()}),
    ("llama", {"ssf": dt.SSF(), "ln": dt.LNTuning()}),
])
def test_route_mixed_batch(kind: str, methods: dict[str, dt.DeltaConfig]) -> None:
    tiny = perturbed(kind)
    model = tiny.model
    for i, (name, cfg) in enumerate({**methods, "lora": LORA}.items()):
        dt.attach(model, cfg, name, activate=False)
        randomize(model, name, seed=i + 1)
    rows = [*methods, None, "lora", next(iter(methods))]
    ids = torch.randint(1, 64, (len(rows), 5), generator=torch.Generator().manual_seed(3))
    with dt.route(model, rows), torch.no_grad():
        out = model(input_ids=ids).logits
    for b, name in enumerate(rows):
        with dt.active(model, name), torch.no_grad():
            torch.testing.assert_close(out[b:b + 1], model(input_ids=ids[b:b + 1]).logits, atol=ATOL, rtol=0,
                                       msg=f"row {b} ({name})")
