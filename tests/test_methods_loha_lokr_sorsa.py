"""LoHa, LoKr and SORSA × tiny models × capabilities, every assertion numeric (fp32).

Expected updates come from the papers' formulas written out here on the pieces' raw tensors — the Hadamard
product s·(B₁A₁)⊙(B₂A₂), the Kronecker product by its index definition ΔW[i·b+k, j·d+l] = s·W₁[i,j]·W₂[k,l],
SORSA's U diag(S) Vᵀ − U₀ diag(S₀) V₀ᵀ against an SVD taken here — never from the code under test. peft (when
installed) is the oracle for LoHa and LoKr: the same weights in peft's layers give the same logits.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune.core.errors import ConfigError, TargetError
from deltatune.methods.lokr import factorize
from deltatune.runtime.step_hooks import regularization

from conftest import Tiny, build_tiny, module_pieces as pieces

ATOL = 1e-5
MODELS = ("llama", "gpt2", "bert")  # Linear without bias, Conv1D with bias, Linear with bias
# variant -> config; the variants cover each storage/forward path of each method on the tiny models (hidden 16,
# FFN 32, llama k/v 16 -> 8)
VARIANTS: dict[str, dt.DeltaConfig] = {
    "loha-r2": dt.LoHa(r=2, alpha=3.0),        # r²(in+out) < in·out: forward through the r² face-split factors
    "loha-r4": dt.LoHa(r=4, alpha=6.0),        # the dense ΔW path
    "lokr-full-w2": dt.LoKr(r=2, alpha=5.0),   # 16 = 4·4: r ≥ max(b, d)/2 -> W₂ full
    "lokr-lowrank-w2": dt.LoKr(r=1, alpha=2.0, init="lycoris"),  # W₂ = B A (r < 2)
    "lokr-f8-both": dt.LoKr(r=1, alpha=1.5, factor=8, decompose_both=True),  # W₁ [8, 8] low-rank too
    "sorsa-r2": dt.SORSA(r=2, gamma=0.1),
    "sorsa-r3": dt.SORSA(r=3, gamma=0.0),
}
CASES = [pytest.param(v, m, id=f"{v}-{m}") for v in VARIANTS for m in MODELS]


# --- helpers that do not trust the code under test ------------------------------------------------------
def weight_view(module: nn.Module) -> Tensor:
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def to_native(module: nn.Module, dw: Tensor) -> Tensor:
    return dw if isinstance(module, nn.Linear) else dw.t()


def tiny_with_biases(kind: str) -> Tiny:
    """A conftest tiny model whose biases are non-zero (HF initialises them to zero, which would hide bias bugs)."""
    t = build_tiny(kind)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in t.model.named_parameters():
            if name.endswith(".bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return Tiny(kind, t.model, t.inputs)


def kron_by_index(w1: Tensor, w2: Tensor) -> Tensor:
    """W₁ ⊗ W₂ from its definition, entry by entry: out[i·b + k, j·d + l] = W₁[i, j] · W₂[k, l]."""
    (a, c), (b, d) = w1.shape, w2.shape
    out = torch.empty(a * b, c * d, dtype=w1.dtype)
    for i in range(a):
        for j in range(c):
            out[i * b:(i + 1) * b, j * d:(j + 1) * d] = w1[i, j] * w2
    return out


def lokr_factor(piece: nn.Module, name: str) -> Tensor:
    params = dict(piece.named_parameters())
    if name in params:
        return params[name].detach().double()
    return params[name + "_a"].detach().double() @ params[name + "_b"].detach().double()


def expected_dw(cfg: dt.DeltaConfig, piece: nn.Module) -> Tensor:
    """ΔW [out, in] from the method's formula on the piece's raw tensors (float64, returned as float32)."""
    if isinstance(cfg, dt.LoHa):
        a1, b1, a2, b2 = (getattr(piece, n).detach().double() for n in ("a1", "b1", "a2", "b2"))
        return (cfg.alpha / cfg.r * (b1 @ a1) * (b2 @ a2)).float()
    if isinstance(cfg, dt.LoKr):
        return (cfg.alpha / cfg.r * kron_by_index(lokr_factor(piece, "w1"), lokr_factor(piece, "w2"))).float()
    u, s, vh = (getattr(piece, n).detach().double() for n in ("U", "S", "Vh"))
    u0, s0, vh0 = (getattr(piece, n).double() for n in ("U0", "S0", "Vh0"))
    return (u @ torch.diag(s) @ vh - u0 @ torch.diag(s0) @ vh0).float()


def reference(tiny: Tiny, model: nn.Module, named: dict[str, dt.DeltaConfig]) -> nn.Module:
    """A plain copy of the base with W + Σ ΔW_name (each from its formula)."""
    ref = tiny.fresh()
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for name, cfg in named.items():
            for path, (_, piece) in pieces(model, name).items():
                if isinstance(cfg, dt.LoRA):
                    dw = cfg.alpha / cfg.r * piece.lora_B.detach() @ piece.lora_A.detach()
                else:
                    dw = expected_dw(cfg, piece)
                mods[path].weight.add_(to_native(mods[path], dw))
    return ref


@torch.no_grad()
def randomize(model: nn.Module, name: str, seed: int = 7, scale: float = 0.3) -> None:
    """Every trainable tensor of delta `name` moved by noise (so zero-initialised factors become non-zero)."""
    g = torch.Generator().manual_seed(seed)
    for _, piece in pieces(model, name).values():
        for p in piece.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def base_params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "deltatune" not in k}


def setup(variant: str, kind: str, name: str = "m") -> tuple[Tiny, dt.DeltaConfig]:
    tiny = tiny_with_biases(kind)
    torch.manual_seed(11)
    dt.attach(tiny.model, VARIANTS[variant], name)
    return tiny, VARIANTS[variant]


# --- 1. identity at init --------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,kind", CASES)
def test_identity_at_init(variant: str, kind: str) -> None:
    tiny = tiny_with_biases(kind)
    y0 = tiny.logits()
    assert y0.abs().max() > 1e-2  # non-trivial weights and biases
    dt.attach(tiny.model, VARIANTS[variant], "m")
    assert len(pieces(tiny.model, "m")) >= 4
    for _, piece in pieces(tiny.model, "m").values():
        assert expected_dw(VARIANTS[variant], piece).abs().max() < 1e-6
    torch.testing.assert_close(tiny.logits(), y0, atol=ATOL, rtol=0)
    torch.testing.assert_close(tiny.logits(grad=True).detach(), y0, atol=ATOL, rtol=0)
    tiny.model.train()
    torch.testing.assert_close(tiny.logits(grad=True).detach(), y0, atol=ATOL, rtol=0)


# --- 2. merged == unmerged, and both == the formula; unmerge restores ---------------------------------------
@pytest.mark.parametrize("variant,kind", CASES)
def test_forward_matches_formula_merge_and_unmerge(variant: str, kind: str) -> None:
    tiny, cfg = setup(variant, kind)
    model = tiny.model
    randomize(model, "m")
    w0 = base_params(model)
    y = tiny.logits()
    assert (y - tiny.logits(tiny.fresh())).abs().max() > 1e-3, "a randomised delta must change the logits"
    torch.testing.assert_close(y, tiny.logits(reference(tiny, model, {"m": cfg})), atol=ATOL, rtol=0)
    torch.testing.assert_close(tiny.logits(grad=True).detach(), y, atol=ATOL, rtol=0)
    dt.merge(model, "m")
    assert dt.summary(model)["m"].merged
    for path, (module, piece) in pieces(model, "m").items():
        want = weight_view(tiny.fresh().get_submodule(path)) + expected_dw(cfg, piece)
        torch.testing.assert_close(weight_view(module), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(tiny.logits(), y, atol=ATOL, rtol=0)
    dt.unmerge(model)
    for k, v in base_params(model).items():
        torch.testing.assert_close(v, w0[k], atol=1e-6, rtol=0, msg=f"unmerge left {k} changed")
    torch.testing.assert_close(tiny.logits(), y, atol=ATOL, rtol=0)


# --- 3. save -> load: same logits; the file's ΔW (no model) is the formula ----------------------------------
@pytest.mark.parametrize("variant,kind", CASES)
def test_save_load_roundtrip_and_tensors_without_model(variant: str, kind: str, tmp_path) -> None:
    tiny, cfg = setup(variant, kind)
    randomize(tiny.model, "m")
    y = tiny.logits()
    dt.save(tiny.model, tmp_path / "d", name="m")
    d = dt.Delta.read(tmp_path / "d")
    assert d.config == cfg
    tensors = d.tensors()
    live = pieces(tiny.model, "m")
    assert set(tensors) == set(live)
    for path, (_, piece) in live.items():
        torch.testing.assert_close(tensors[path].to_dense().float(), expected_dw(cfg, piece), atol=1e-6, rtol=0)
    fresh = tiny.fresh()
    dt.load(fresh, tmp_path / "d")
    torch.testing.assert_close(tiny.logits(fresh), y, atol=1e-6, rtol=0)
    # arithmetic on the detached delta: merging 0.5·ΔW into a plain copy gives the formula's weights
    plain = tiny.fresh()
    with torch.no_grad():
        for path, t in tensors.items():
            plain.get_submodule(path).weight.add_(to_native(plain.get_submodule(path), (t * 0.5).to_dense().float()))
    half = tiny.fresh()
    with torch.no_grad():
        for path, (_, piece) in live.items():
            half.get_submodule(path).weight.add_(to_native(half.get_submodule(path), 0.5 * expected_dw(cfg, piece)))
    torch.testing.assert_close(tiny.logits(plain), tiny.logits(half), atol=ATOL, rtol=0)


# --- 4. gradients reach exactly the delta's own parameters --------------------------------------------------
@pytest.mark.parametrize("variant,kind", CASES)
def test_gradients_only_on_own_parameters(variant: str, kind: str) -> None:
    tiny, _ = setup(variant, kind)
    model = tiny.model
    dt.attach(model, dt.LoRA(r=2), "other")
    dt.activate(model, "m")
    randomize(model, "m")
    model.train()
    y = tiny.logits(grad=True)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    own = 0
    for n, p in model.named_parameters():
        if ".deltatune.m." in n:
            own += 1
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
        else:
            assert p.grad is None, f"{n} is not delta 'm''s and got a gradient"
    assert own == sum(len(list(pc.parameters())) for _, pc in pieces(model, "m").values()) > 0
    assert not any(p.requires_grad for n, p in model.named_parameters() if "deltatune" not in n)


# --- 5. with an active LoRA: W + ΔW_lora + ΔW_method ----------------------------------------------------------
@pytest.mark.parametrize("variant,kind", CASES)
def test_sum_with_active_lora_equals_formula(variant: str, kind: str) -> None:
    tiny, cfg = setup(variant, kind)
    model = tiny.model
    lora = dt.LoRA(r=2, alpha=4.0)
    dt.attach(model, lora, "l")
    randomize(model, "m", seed=1)
    randomize(model, "l", seed=2)
    dt.activate(model, ["l", "m"])
    want = tiny.logits(reference(tiny, model, {"l": lora, "m": cfg}))
    assert (want - tiny.logits(reference(tiny, model, {"l": lora}))).abs().max() > 1e-3
    torch.testing.assert_close(tiny.logits(), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(tiny.logits(grad=True).detach(), want, atol=ATOL, rtol=0)
    dt.merge(model, "m")  # one merged, one running
    torch.testing.assert_close(tiny.logits(), want, atol=ATOL, rtol=0)
    dt.merge(model, "l")
    dt.unmerge(model, "m")
    torch.testing.assert_close(tiny.logits(), want, atol=ATOL, rtol=0)
    dt.unmerge(model)
    with dt.active(model, None):
        torch.testing.assert_close(tiny.logits(), tiny.logits(tiny.fresh()), atol=1e-6, rtol=0)


# --- 6. trainable parameters = the paper's count --------------------------------------------------------------
def paper_factor_pair(dim: int, factor: int) -> tuple[int, int]:
    """LyCORIS's split: `factor` itself when it divides dim, else the most balanced divisor pair (m ≤ n) whose
    smaller side is at most `factor` (-1: any). Brute force over all divisors."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    pairs = [(m, dim // m) for m in range(1, dim + 1) if dim % m == 0 and m <= dim // m and (factor == -1 or m <= factor)]
    return min(pairs, key=lambda p: p[1] - p[0])


def paper_count(cfg: dt.DeltaConfig, d_out: int, d_in: int) -> int:
    if isinstance(cfg, dt.LoHa):  # FedPara: two rank-r pairs, 2r(m + n)
        return 2 * cfg.r * (d_in + d_out)
    if isinstance(cfg, dt.LoKr):  # W₁ [a, c] ⊗ W₂ [b, d]; a factor is r(rows + cols) when low-rank, rows·cols when full
        a, b = paper_factor_pair(d_out, cfg.factor)
        c, d = paper_factor_pair(d_in, cfg.factor)
        w1 = cfg.r * (a + c) if cfg.decompose_both and cfg.r < max(a, c) / 2 else a * c
        w2 = cfg.r * (b + d) if cfg.r < max(b, d) / 2 else b * d
        return w1 + w2
    return cfg.r * (d_in + d_out + 1)  # SORSA: U [out, r], S [r], V [in, r]


@pytest.mark.parametrize("variant,kind", CASES)
def test_trainable_count_is_the_papers_formula_on_tiny_models(variant: str, kind: str) -> None:
    tiny, cfg = setup(variant, kind)
    want = sum(paper_count(cfg, *weight_view(module).shape) for module, _ in pieces(tiny.model, "m").values())
    assert dt.summary(tiny.model)["m"].trainable == want


@pytest.mark.parametrize("d_out,d_in", [(40, 24), (96, 64), (30, 42), (7, 12)])
@pytest.mark.parametrize("cfg", [dt.LoHa(r=3), dt.LoKr(r=8), dt.LoKr(r=2, factor=4), dt.LoKr(r=1, decompose_both=True),
                                 dt.LoKr(r=1, factor=3, decompose_both=True), dt.SORSA(r=5)], ids=repr)
def test_trainable_count_is_the_papers_formula_per_layer(cfg: dt.DeltaConfig, d_out: int, d_in: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    dt.attach(model, cfg, "m")
    assert dt.summary(model)["m"].trainable == paper_count(cfg, d_out, d_in)


def test_docs_counts_for_a_4096_layer() -> None:
    """The numbers in docs/methods.md, from the formulas (a 4096×4096 layer; LoRA r=8 has 65,536)."""
    assert paper_count(dt.LoHa(r=8), 4096, 4096) == 131_072
    assert paper_count(dt.LoHa(r=4), 4096, 4096) == 65_536
    assert paper_count(dt.LoKr(r=8), 4096, 4096) == 64 * 64 + 8 * (64 + 64) == 5_120
    assert paper_count(dt.LoKr(r=32, factor=4), 4096, 4096) == 16 + 32 * (1024 + 1024) == 65_552
    assert paper_count(dt.SORSA(r=8), 4096, 4096) == 65_544


def test_factorize_is_the_lycoris_split() -> None:
    for dim in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 64, 1000):
            assert factorize(dim, factor) == paper_factor_pair(dim, factor), (dim, factor)
    assert factorize(4096) == (64, 64) and factorize(384) == (16, 24) and factorize(1536, 4) == (4, 384)


# --- 7. LoKr's forward never forms ΔW ------------------------------------------------------------------------
def test_lokr_forward_does_not_materialise_the_kronecker_product(monkeypatch) -> None:
    tiny, cfg = setup("lokr-lowrank-w2", "llama")
    randomize(tiny.model, "m")
    want = tiny.logits(reference(tiny, tiny.model, {"m": cfg}))

    def refuse(*_a, **_k):
        raise AssertionError("forward formed W₁ ⊗ W₂")

    monkeypatch.setattr(torch, "kron", refuse)
    torch.testing.assert_close(tiny.logits(), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(tiny.logits(grad=True).detach(), want, atol=ATOL, rtol=0)


# --- 8. SORSA: the SVD split and the orthonormality regulariser --------------------------------------------------
@pytest.mark.parametrize("kind", MODELS)
def test_sorsa_init_is_the_principal_svd_part(kind: str) -> None:
    tiny, cfg = setup("sorsa-r3", kind)
    for module, piece in pieces(tiny.model, "m").values():
        w = weight_view(module).detach().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        principal = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]  # sign-invariant: compare products, not vectors
        got = piece.U0.double() @ torch.diag(piece.S0.double()) @ piece.Vh0.double()
        torch.testing.assert_close(got, principal, atol=1e-5, rtol=0)
        torch.testing.assert_close(piece.S.detach().double(), s[:3], atol=1e-5, rtol=0)
        # the frozen residual W - U₀S₀V₀ᵀ holds exactly the remaining singular values
        torch.testing.assert_close(torch.linalg.svdvals(w - got)[: s.numel() - 3], s[3:], atol=1e-5, rtol=0)


def test_sorsa_regularizer_zero_at_init_positive_after_and_its_gradient_flows() -> None:
    tiny, cfg = setup("sorsa-r2", "llama")
    model = tiny.model
    live = pieces(model, "m")
    assert float(regularization(model).detach()) < 1e-9
    randomize(model, "m", scale=0.05)

    def by_hand(piece: nn.Module) -> Tensor:
        u, vh = piece.U.detach().double(), piece.Vh.detach().double()
        eye = torch.eye(u.shape[1], dtype=torch.float64)
        return cfg.gamma * (((u.t() @ u - eye) ** 2).sum() + ((vh @ vh.t() - eye) ** 2).sum())

    want = sum(by_hand(p) for _, p in live.values())
    reg = regularization(model)
    assert float(reg) > 1e-4
    torch.testing.assert_close(reg.double(), want, atol=1e-6, rtol=1e-5)
    reg.backward()
    for path, (_, piece) in live.items():
        u = piece.U.detach().double()
        eye = torch.eye(u.shape[1], dtype=torch.float64)
        torch.testing.assert_close(piece.U.grad.double(), cfg.gamma * 4 * u @ (u.t() @ u - eye), atol=1e-6, rtol=1e-4)
        assert piece.Vh.grad is not None and piece.Vh.grad.abs().sum() > 0
        assert piece.S.grad is None or piece.S.grad.abs().sum() == 0  # the penalty does not involve S
    assert all(p.grad is None for n, p in model.named_parameters() if "deltatune" not in n)


def test_sorsa_gamma_zero_adds_nothing_and_train_adds_the_term() -> None:
    tiny, _ = setup("sorsa-r3", "llama")
    randomize(tiny.model, "m")
    assert regularization(tiny.model) == 0.0
    other = tiny_with_biases("llama")
    dt.attach(other.model, dt.SORSA(r=2, gamma=0.5), "s")
    randomize(other.model, "s", scale=0.05)
    terms = [p.regularizer() for _, p in pieces(other.model, "s").values()]
    torch.testing.assert_close(regularization(other.model), sum(terms))
    dt.detach(other.model, "s")
    assert regularization(other.model) == 0.0


# --- 9. peft as the oracle for LoHa and LoKr ------------------------------------------------------------------
PEFT_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "gate_proj", "down_proj"],
                "bert": ["query", "value", "intermediate.dense", "output.dense"]}
PEFT_CASES = {  # name -> (our config kwargs, peft config kwargs)
    "loha-r2": ("loha", dict(r=2, alpha=3.0), dict(r=2, alpha=3.0)),
    "loha-r4": ("loha", dict(r=4, alpha=6.0), dict(r=4, alpha=6.0)),
    "lokr-full-w2": ("lokr", dict(r=2, alpha=5.0), dict(r=2, alpha=5.0)),
    "lokr-lowrank-w2": ("lokr", dict(r=1, alpha=2.0), dict(r=1, alpha=2.0)),
    "lokr-f8-both": ("lokr", dict(r=1, alpha=1.5, factor=8, decompose_both=True),
                     dict(r=1, alpha=1.5, decompose_factor=8, decompose_both=True)),
    "lokr-f2-lycoris": ("lokr", dict(r=1, alpha=3.0, factor=2, init="lycoris"),
                        dict(r=1, alpha=3.0, decompose_factor=2, init_weights="lycoris")),
}
# our parameter name -> peft's (peft names the [out, r] factor "_a" and the [r, in] factor "_b" for LoHa)
LOHA_NAMES = {"b1": "hada_w1_a", "a1": "hada_w1_b", "b2": "hada_w2_a", "a2": "hada_w2_b"}


def _peft_model(case: str, kind: str, tiny: Tiny) -> tuple[nn.Module, dict[str, nn.Module]]:
    peft = pytest.importorskip("peft")
    method, _, pk = PEFT_CASES[case]
    config_cls = peft.LoHaConfig if method == "loha" else peft.LoKrConfig
    pm = peft.get_peft_model(tiny.fresh(), config_cls(target_modules=PEFT_TARGETS[kind], **pk))
    layers = {n[len("base_model.model."):]: m for n, m in pm.named_modules()
              if hasattr(m, "get_delta_weight") and hasattr(m, "scaling") and "default" in m.scaling}
    return pm.eval(), layers


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_oracle_same_weights_same_logits(case: str, kind: str) -> None:
    method, ours, _ = PEFT_CASES[case]
    tiny = tiny_with_biases(kind)
    pm, layers = _peft_model(case, kind, tiny)
    model = tiny.fresh()
    cfg = (dt.LoHa if method == "loha" else dt.LoKr)(targets=tuple(PEFT_TARGETS[kind]), **ours)
    dt.attach(model, cfg, "m")
    live = pieces(model, "m")
    assert set(live) == set(layers) and len(live) >= 4
    # the same zero-initialised factor as peft (its init_weights convention), and peft's trainable count
    for path, (_, piece) in live.items():
        for k, p in piece.named_parameters():
            theirs = getattr(layers[path], LOHA_NAMES[k] if method == "loha" else "lokr_" + k)["default"]
            assert p.shape == theirs.shape, (path, k)
            assert bool((p == 0).all()) == bool((theirs == 0).all()), f"{path}.{k}: init differs from peft's"
    assert dt.summary(model)["m"].trainable == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    randomize(model, "m")
    with torch.no_grad():
        for path, (_, piece) in live.items():
            assert layers[path].scaling["default"] == pytest.approx(cfg.alpha / cfg.r)
            for k, p in piece.named_parameters():
                getattr(layers[path], LOHA_NAMES[k] if method == "loha" else "lokr_" + k)["default"].copy_(p)
    y = tiny.logits(model)
    assert (y - tiny.logits(tiny.fresh())).abs().max() > 1e-3
    torch.testing.assert_close(tiny.logits(pm), y, atol=ATOL, rtol=0)
    for path, (module, piece) in live.items():
        torch.testing.assert_close(piece.delta_weight(module).to_dense(), layers[path].get_delta_weight("default"),
                                   atol=1e-6, rtol=0)


def test_factorize_matches_peft() -> None:
    lokr_layer = pytest.importorskip("peft.tuners.lokr.layer")
    for dim in range(1, 300):
        for factor in (-1, 1, 2, 3, 4, 6, 8, 16, 500):
            assert factorize(dim, factor) == lokr_layer.factorization(dim, factor), (dim, factor)


# --- 10. bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,field", [
    (lambda: dt.LoHa(r=0), "LoHa.r"), (lambda: dt.LoHa(alpha=float("nan")), "LoHa.alpha"),
    (lambda: dt.LoKr(r=2.5), "LoKr.r"), (lambda: dt.LoKr(factor=0), "LoKr.factor"),
    (lambda: dt.LoKr(init="zeros"), "LoKr.init"), (lambda: dt.LoKr(decompose_both="maybe"), "LoKr.decompose_both"),
    (lambda: dt.SORSA(r=-1), "SORSA.r"), (lambda: dt.SORSA(gamma=-1e-3), "SORSA.gamma"),
])
def test_bad_configs_name_the_field(make, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make()


@pytest.mark.parametrize("cfg,match", [
    (dt.LoHa(targets=("embed_tokens",)), "Embedding"),
    (dt.LoKr(targets=("embed_tokens", "q_proj")), "Embedding"),
    (dt.SORSA(r=9, targets=("k_proj",)), "r=9 exceeds"),
])
def test_bad_targets_leave_the_model_untouched(cfg: dt.DeltaConfig, match: str) -> None:
    tiny = build_tiny("llama")
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with pytest.raises(TargetError, match=match):
        dt.attach(tiny.model, cfg, "m")
    assert not any("deltatune" in n for n, _ in tiny.model.named_modules())
    after = tiny.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in tiny.model.parameters())


def test_configs_roundtrip_json() -> None:
    for cfg in VARIANTS.values():
        assert dt.DeltaConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("variant", ["loha-r2", "lokr-lowrank-w2", "sorsa-r2"])
def test_half_precision_model_trains_in_float32(variant: str) -> None:
    tiny = build_tiny("llama")
    model = tiny.model.to(torch.bfloat16)
    y0 = tiny.logits(model)
    dt.attach(model, VARIANTS[variant], "m")
    for _, piece in pieces(model, "m").values():
        assert all(p.dtype == torch.float32 for p in piece.parameters())
    torch.testing.assert_close(tiny.logits(model), y0, atol=0, rtol=0)
    randomize(model, "m", scale=0.05)
    out = tiny.logits(model, grad=True)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for _, pc in pieces(model, "m").values()
               for p in pc.parameters())
    assert math.isfinite(float(out.float().abs().max()))


# --- 11. mixed batches: one delta per example ------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["loha-r2", "loha-r4", "lokr-lowrank-w2", "sorsa-r2"])
def test_mixed_batch_rows_follow_their_own_delta(variant: str) -> None:
    tiny, cfg = setup(variant, "llama")
    model = tiny.model
    dt.attach(model, dt.LoRA(r=2, alpha=4.0), "l")
    randomize(model, "m", seed=1)
    randomize(model, "l", seed=2)
    want = {name: tiny.logits(reference(tiny, model, named)) for name, named in
            (("m", {"m": cfg}), ("l", {"l": dt.LoRA(r=2, alpha=4.0)}), (None, {}))}
    rows = ["m", None] if variant != "sorsa-r2" else ["l", "m"]
    with dt.route(model, rows):
        y = tiny.logits()
    for b, name in enumerate(rows):
        torch.testing.assert_close(y[b], want[name][b], atol=ATOL, rtol=0)
