"""Bottleneck adapters (Houlsby, Pfeiffer, parallel, AdaptFormer) × tiny Llama / GPT-2 (Conv1D) / BERT.

References never go through deltatune's hooks: a fresh copy of the base model gets plain torch forward hooks that
compute each paper's formula by hand from the pieces' tensors — series h + U σ(D h + b_D) + b_U on the projection's
output, parallel y + s·(U σ(D x + b_D) + b_U) on the FFN block (for BERT inside BertOutput, before its LayerNorm:
LN(dense(a) + x + s·f(x))). Adapter parameters are made random (U non-zero) before every comparison, so each test
can fail. Expected module paths are written out here, not read from the architecture map.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune.core.errors import ConfigError, TargetError, UnsupportedError
from conftest import HIDDEN, Tiny, build_tiny, module_pieces

ATOL = 1e-5
LAYERS = (0, 1)
PATHS = {  # (model, role) -> module paths, per layer
    ("llama", "attn"): "model.layers.{}.self_attn.o_proj", ("llama", "ffn_out"): "model.layers.{}.mlp.down_proj",
    ("llama", "ffn"): "model.layers.{}.mlp",
    ("gpt2", "attn"): "transformer.h.{}.attn.c_proj", ("gpt2", "ffn_out"): "transformer.h.{}.mlp.c_proj",
    ("gpt2", "ffn"): "transformer.h.{}.mlp",
    ("bert", "attn"): "bert.encoder.layer.{}.attention.output.dense", ("bert", "ffn_out"): "bert.encoder.layer.{}.output.dense",
    ("bert", "ffn"): "bert.encoder.layer.{}.output",
}
VARIANTS = {  # name -> (config class, roles, series?)
    "houlsby": (dt.Houlsby, ("attn", "ffn_out"), True),
    "pfeiffer": (dt.Pfeiffer, ("ffn_out",), True),
    "parallel": (dt.ParallelAdapter, ("ffn",), False),
    "adaptformer": (dt.AdaptFormer, ("ffn",), False),
}
MODELS = ("llama", "gpt2", "bert")
GRID = [pytest.param(m, v, id=f"{m}-{v}") for m in MODELS for v in VARIANTS]

# the non-linearities written out
ACT = {"relu": lambda z: torch.clamp(z, min=0), "swish": lambda z: z * torch.sigmoid(z),
       "silu": lambda z: z / (1 + torch.exp(-z)), "tanh": lambda z: (torch.exp(2 * z) - 1) / (torch.exp(2 * z) + 1),
       "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))}


def paths(model: str, variant: str) -> list[str]:
    return sorted(PATHS[(model, r)].format(i) for r in VARIANTS[variant][1] for i in LAYERS)


def attach(tiny: Tiny, variant: str, name: str = "a", seed: int = 0, activate: bool = True, **kw) -> None:
    torch.manual_seed(seed)
    dt.attach(tiny.model, VARIANTS[variant][0](**kw), name, activate=activate)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for _, piece in module_pieces(tiny.model, name).values():
            for p in piece.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def weights(tiny: Tiny, name: str) -> dict[str, dict]:
    """Each piece's tensors (detached copies), its activation and its scale s (1 for series adapters)."""
    out = {}
    for path, (_, pc) in module_pieces(tiny.model, name).items():
        out[path] = {"D": pc.down_weight.detach().clone(), "bD": pc.down_bias.detach().clone(),
                     "U": pc.up_weight.detach().clone(), "bU": pc.up_bias.detach().clone(),
                     "act": ACT[pc.cfg.non_linearity], "s": float(getattr(pc.cfg, "scaling", 1.0))}
    return out


def f(w: dict, h: Tensor) -> Tensor:
    """s · (U σ(D h + b_D) + b_U), by hand."""
    return w["s"] * (w["act"](h @ w["D"].T + w["bD"]) @ w["U"].T + w["bU"])


def reference(tiny: Tiny, series: bool, stacks: list[dict[str, dict]], combine: str = "sum",
              base: nn.Module | None = None) -> Tensor:
    """Logits of a fresh base with plain hooks: series h -> h + Σ f_i(h) ("sum") or f applied in turn ("stack");
    parallel y -> y + Σ f_i(x). BERT's FFN (BertOutput) is recomputed whole: LN(dense(a) + x + Σ f_i(x))."""
    ref = tiny.fresh() if base is None else base
    mods = dict(ref.named_modules())
    for path in stacks[0]:
        ws = [s[path] for s in stacks]

        def series_hook(mod, args, out, ws=ws):
            if combine == "stack":
                for w in ws:
                    out = out + f(w, out)
                return out
            return out + sum(f(w, out) for w in ws)

        def parallel_hook(mod, args, out, ws=ws):
            return out + sum(f(w, args[0]) for w in ws)

        def bert_output_hook(mod, args, out, ws=ws):
            a, x = args
            return mod.LayerNorm(mod.dropout(mod.dense(a)) + x + sum(f(w, x) for w in ws))

        hook = series_hook if series else bert_output_hook if type(mods[path]).__name__ == "BertOutput" else parallel_hook
        mods[path].register_forward_hook(hook)
    return tiny.logits(ref)


# --- where the adapters go ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,variant", GRID)
def test_auto_targets_follow_the_architecture(model, variant):
    tiny = build_tiny(model)
    attach(tiny, variant)
    pieces = module_pieces(tiny.model, "a")
    assert sorted(pieces) == paths(model, variant)
    cls, _, series = VARIANTS[variant]
    want = "output" if series else ("input" if model == "bert" else "weight")
    assert {pc.position for _, pc in pieces.values()} == {want}
    if want == "input":
        assert {pc.input_arg for _, pc in pieces.values()} == {1}  # BertOutput(hidden_states, input_tensor)
    assert all(pc.features == HIDDEN for _, pc in pieces.values())
    assert not any(pc.mergeable for _, pc in pieces.values())


def test_unknown_architecture_asks_for_explicit_targets_and_changes_nothing(tiny_mlp):
    before = {k: v.clone() for k, v in tiny_mlp.model.state_dict().items()}
    with pytest.raises(TargetError, match="targets="):
        dt.attach(tiny_mlp.model, dt.Houlsby())
    assert tiny_mlp.model.state_dict().keys() == before.keys()
    assert not any(hasattr(m, "deltatune") for m in tiny_mlp.model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny_mlp.model.modules())
    assert all(p.requires_grad for p in tiny_mlp.model.parameters())


def test_explicit_targets_on_any_linear(tiny_mlp):
    """A series adapter after explicitly named Linear modules of a model the map does not know."""
    base = tiny_mlp.logits()
    torch.manual_seed(0)
    dt.attach(tiny_mlp.model, dt.Pfeiffer(targets=["0", "2"], bottleneck=3), "a")
    torch.testing.assert_close(tiny_mlp.logits(), base, atol=0, rtol=0)
    attach_random = module_pieces(tiny_mlp.model, "a")
    with torch.no_grad():
        for _, pc in attach_random.values():
            pc.up_weight.normal_()
    assert sorted(attach_random) == ["0", "2"]
    torch.testing.assert_close(tiny_mlp.logits(), reference(tiny_mlp, True, [weights(tiny_mlp, "a")]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arg", [1, "input_tensor"])
def test_explicit_bert_ffn_targets_with_input_argument_equal_auto(arg):
    auto, manual = build_tiny("bert"), build_tiny("bert")
    attach(auto, "parallel", bottleneck=4)
    attach(manual, "parallel", bottleneck=4, targets=r".*layer\.\d+\.output", input_arg=arg)
    assert sorted(module_pieces(manual.model, "a")) == paths("bert", "parallel")
    torch.testing.assert_close(manual.logits(), auto.logits(), atol=0, rtol=0)
    # the argument is found when BertOutput is called with keywords too
    layer = manual.model.bert.encoder.layer[0].output
    a, x = torch.randn(2, 3, 32), torch.randn(2, 3, HIDDEN)
    torch.testing.assert_close(layer(hidden_states=a, input_tensor=x), layer(a, x), atol=0, rtol=0)
    w = weights(manual, "a")["bert.encoder.layer.0.output"]
    with torch.no_grad():
        torch.testing.assert_close(layer(a, input_tensor=x), layer.LayerNorm(layer.dense(a) + x + f(w, x)), atol=ATOL, rtol=0)


# --- parameter counts: the papers' formula ------------------------------------------------------------------------
@pytest.mark.parametrize("model,variant", GRID)
@pytest.mark.parametrize("size", [{"bottleneck": 5}, {"reduction_factor": 4}])
def test_trainable_count_is_the_papers_formula(model, variant, size):
    tiny = build_tiny(model)
    dt.attach(tiny.model, VARIANTS[variant][0](**size), "a")
    d = HIDDEN
    m = size.get("bottleneck") or d // size["reduction_factor"]
    per_adapter = 2 * d * m + m + d  # Houlsby et al. 2019 §3.1: D (d·m + m) and U (m·d + d)
    n_adapters = len(LAYERS) * len(VARIANTS[variant][1])  # Houlsby: 2 per layer; Pfeiffer / parallel / AdaptFormer: 1
    assert dt.summary(tiny.model)["a"].trainable == n_adapters * per_adapter


# --- capabilities -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,variant", GRID)
def test_identity_at_init(model, variant):
    tiny = build_tiny(model)
    base = tiny.logits()
    torch.manual_seed(0)
    dt.attach(tiny.model, VARIANTS[variant][0](bottleneck=4), "a")
    pieces = module_pieces(tiny.model, "a")
    assert all(pc.down_weight.abs().sum() > 0 and not pc.up_weight.any() for _, pc in pieces.values())
    torch.testing.assert_close(tiny.logits(), base, atol=0, rtol=0)


@pytest.mark.parametrize("model,variant", GRID)
def test_forward_is_the_formula(model, variant):
    tiny = build_tiny(model)
    attach(tiny, variant, bottleneck=4)
    out = tiny.logits()
    assert (out - tiny.logits(tiny.fresh())).abs().max() > 10 * ATOL  # the adapters change the logits
    torch.testing.assert_close(out, reference(tiny, VARIANTS[variant][2], [weights(tiny, "a")]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant,act", [("houlsby", "gelu"), ("pfeiffer", "tanh"), ("parallel", "silu"),
                                         ("adaptformer", "swish")])
def test_non_linearities(variant, act):
    tiny = build_tiny("gpt2")
    attach(tiny, variant, bottleneck=3, non_linearity=act)
    torch.testing.assert_close(tiny.logits(), reference(tiny, VARIANTS[variant][2], [weights(tiny, "a")]), atol=ATOL, rtol=0)


def test_scaling_defaults_follow_the_papers():
    assert dt.AdaptFormer().scaling == 0.1 and dt.AdaptFormer().non_linearity == "relu"
    assert dt.ParallelAdapter().scaling == 4.0
    tiny = build_tiny("llama")
    attach(tiny, "parallel", bottleneck=3, scaling=-2.5)
    assert {w["s"] for w in weights(tiny, "a").values()} == {-2.5}
    torch.testing.assert_close(tiny.logits(), reference(tiny, False, [weights(tiny, "a")]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("model,variant", GRID)
def test_save_load_gives_equal_logits(model, variant, tmp_path):
    tiny = build_tiny(model)
    attach(tiny, variant, bottleneck=4)
    dt.save(tiny.model, tmp_path / "d", name="a")
    saved = dt.Delta.read(tmp_path / "d")
    assert saved.config.targets != "auto"  # the file records the modules the map chose (and BERT's input argument)
    fresh = tiny.fresh()
    dt.load(fresh, tmp_path / "d")
    torch.testing.assert_close(tiny.logits(fresh), tiny.logits(), atol=0, rtol=0)
    with pytest.raises(UnsupportedError, match="not a weight update"):
        saved.tensors()


@pytest.mark.parametrize("model,variant", GRID)
def test_gradients_reach_only_adapter_parameters(model, variant):
    tiny = build_tiny(model)
    attach(tiny, variant, bottleneck=4)
    tiny.logits(grad=True).square().sum().backward()
    for pname, p in tiny.model.named_parameters():
        if ".deltatune.a." in pname:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, pname
        else:
            assert not p.requires_grad and p.grad is None, pname


@pytest.mark.parametrize("model,variant", GRID)
def test_two_adapters_sum_and_stack(model, variant):
    tiny = build_tiny(model)
    attach(tiny, variant, "a", seed=1, bottleneck=4, activate=False)
    attach(tiny, variant, "b", seed=2, bottleneck=3, activate=False)
    wa, wb = weights(tiny, "a"), weights(tiny, "b")
    series = VARIANTS[variant][2]
    dt.activate(tiny.model, ["a", "b"])  # Sum: h + (g_a(h) - h) + (g_b(h) - h)
    torch.testing.assert_close(tiny.logits(), reference(tiny, series, [wa, wb]), atol=ATOL, rtol=0)
    if series:
        dt.activate(tiny.model, dt.Stack("a", "b"))  # g_b(g_a(h))
        torch.testing.assert_close(tiny.logits(), reference(tiny, series, [wa, wb], "stack"), atol=ATOL, rtol=0)


@pytest.mark.parametrize("model,variant", GRID)
def test_mixed_batch_routes_each_row_through_its_adapter(model, variant):
    tiny = build_tiny(model)
    attach(tiny, variant, "a", seed=1, bottleneck=4, activate=False)
    attach(tiny, variant, "b", seed=2, bottleneck=3, activate=False)
    series = VARIANTS[variant][2]
    alone = {n: reference(tiny, series, [weights(tiny, n)]) for n in ("a", "b")}
    base = tiny.logits(tiny.fresh())
    with dt.route(tiny.model, ["b", None]):
        torch.testing.assert_close(tiny.logits(), torch.stack([alone["b"][0], base[1]]), atol=ATOL, rtol=0)
    with dt.route(tiny.model, ["a", "b"]):
        torch.testing.assert_close(tiny.logits(), torch.stack([alone["a"][0], alone["b"][1]]), atol=ATOL, rtol=0)


def test_fusion_of_two_pfeiffer_adapters_is_the_adapterfusion_formula():
    """AdapterFusion over Pfeiffer adapters: at each FFN output, Σ_i softmax_i(q·k_i) v_i with o_i = h + f_i(h)."""
    tiny = build_tiny("bert")
    attach(tiny, "pfeiffer", "a", seed=1, bottleneck=4, activate=False)
    attach(tiny, "pfeiffer", "b", seed=2, bottleneck=3, activate=False)
    torch.manual_seed(7)
    dt.attach(tiny.model, dt.Fusion(deltas=("a", "b"), init_std=0.3), "ab", activate=False)
    wa, wb = weights(tiny, "a"), weights(tiny, "b")
    fusion = {p: {k: t.detach().clone() for k, t in pc.named_parameters()} for p, (_, pc) in
              module_pieces(tiny.model, "ab").items()}
    ref = tiny.fresh()
    mods = dict(ref.named_modules())
    for path, q in fusion.items():
        def hook(mod, args, h, q=q, path=path):
            o = [h + f(wa[path], h), h + f(wb[path], h)]
            scores = torch.stack([((h @ q["wq"].T + q["bq"]) * (oi @ q["wk"].T + q["bk"])).sum(-1) for oi in o], -1)
            alpha = torch.softmax(scores, -1)
            return sum(alpha[..., i:i + 1] * (oi @ q["wv"].T + q["bv"]) for i, oi in enumerate(o))
        mods[path].register_forward_hook(hook)
    dt.activate(tiny.model, dt.Fuse("a", "b", fusion="ab"))
    torch.testing.assert_close(tiny.logits(), tiny.logits(ref), atol=ATOL, rtol=0)


def _lora_weights(tiny: Tiny, name: str) -> nn.Module:
    """A fresh base with each LoRA-adapted weight replaced by W + ΔW (Conv1D stores Wᵀ)."""
    ref = tiny.fresh()
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for path, (module, pc) in module_pieces(tiny.model, name).items():
            dw = pc.delta_weight(module).to_dense()
            w = mods[path].weight
            w.add_(dw if isinstance(mods[path], nn.Linear) else dw.T)
    return ref


@pytest.mark.parametrize("model,variant", GRID)
def test_sum_with_an_active_lora(model, variant):
    """LoRA on the adapters' modules (series) or inside the FFN block (parallel): at one module LoRA's weight change
    runs first, the series adapter acts on its result; a parallel branch adds to the block with LoRA inside."""
    tiny = build_tiny(model)
    lora_targets = [PATHS[(model, r)].format(i) for r in ("attn", "ffn_out") for i in LAYERS]
    torch.manual_seed(5)
    dt.attach(tiny.model, dt.LoRA(r=2, alpha=4, targets=lora_targets), "lora", activate=False)
    with torch.no_grad():
        for _, pc in module_pieces(tiny.model, "lora").values():
            for p in pc.parameters():
                p.normal_(std=0.3)
    attach(tiny, variant, "ad", bottleneck=4, activate=False)
    dt.activate(tiny.model, ["lora", "ad"])
    expected = reference(tiny, VARIANTS[variant][2], [weights(tiny, "ad")], base=_lora_weights(tiny, "lora"))
    torch.testing.assert_close(tiny.logits(), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("model,variant", GRID)
def test_merge_is_refused_and_changes_nothing(model, variant):
    tiny = build_tiny(model)
    attach(tiny, variant, bottleneck=4)
    before, state = tiny.logits(), {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with pytest.raises(UnsupportedError, match="not a weight update"):
        dt.merge(tiny.model, "a")
    with pytest.raises(UnsupportedError):
        dt.unload(tiny.model, merge_active=True)
    after = tiny.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    torch.testing.assert_close(tiny.logits(), before, atol=0, rtol=0)


@pytest.mark.parametrize("how", ["detach", "unload"])
@pytest.mark.parametrize("model,variant", GRID)
def test_detach_and_unload_restore_the_plain_model(model, variant, how):
    tiny = build_tiny(model)
    base, keys = tiny.logits(), list(tiny.model.state_dict())
    attach(tiny, variant, "a", bottleneck=4)
    attach(tiny, variant, "b", seed=3, bottleneck=2)
    dt.detach(tiny.model, "a") if how == "detach" else dt.unload(tiny.model)
    if how == "detach":
        dt.detach(tiny.model, "b")
    torch.testing.assert_close(tiny.logits(), base, atol=0, rtol=0)
    assert list(tiny.model.state_dict()) == keys
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny.model.modules())
    assert all(p.requires_grad for p in tiny.model.parameters())


def test_half_precision_model_trains_adapters_in_float32():
    tiny = build_tiny("llama")
    tiny.model.to(torch.bfloat16)
    attach(tiny, "houlsby", bottleneck=4)
    assert {p.dtype for _, pc in module_pieces(tiny.model, "a").values() for p in pc.parameters()} == {torch.float32}
    out = tiny.logits(grad=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(p.grad is not None for _, pc in module_pieces(tiny.model, "a").values() for p in pc.parameters())


def test_generate_runs_through_the_adapters(tiny_llama):
    attach(tiny_llama, "houlsby", bottleneck=4)
    ids = tiny_llama.inputs["input_ids"]
    with torch.no_grad():
        out = tiny_llama.model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        logits = tiny_llama.model(out[:, :-1]).logits[:, -1]
    assert torch.equal(out[:, -1], logits.argmax(-1))  # the cached decode step matches a full forward


@pytest.mark.parametrize("kw", [dict(non_linearity="softmax"), dict(bottleneck=0), dict(bottleneck=2.5),
                                dict(reduction_factor=-1), dict(reduction_factor=float("nan")), dict(init="xavier"),
                                dict(scaling=float("inf")), dict(input_arg=-1), dict(input_arg="not a name"),
                                dict(input_arg=True)])
def test_bad_configs_raise_naming_the_field(kw):
    field = next(iter(kw))
    with pytest.raises(ConfigError, match=field):
        dt.ParallelAdapter(**kw)


def test_config_json_round_trip():
    for cfg in (dt.Houlsby(bottleneck=7), dt.Pfeiffer(reduction_factor=8), dt.ParallelAdapter(input_arg="input_tensor"),
                dt.AdaptFormer(scaling=0.2, layers=(1,))):
        assert dt.DeltaConfig.from_json(cfg.to_json()) == cfg
