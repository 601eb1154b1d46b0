"""VeRA, LoRA-XS and RandLoRA: capabilities on the tiny models, each assertion numeric (fp32).

Expected updates are written out here from each paper's formula over the piece's raw tensors (trained vectors and
frozen factors), never taken from the code under test:

    VeRA      ΔW = diag(b) B diag(d) A                       A [r, in], B [out, r] frozen random; d, b trained
    LoRA-XS   ΔW = alpha/r · U_r R Σ_r V_rᵀ                  U, Σ, V from the SVD of the pretrained W; R trained
    RandLoRA  ΔW = alpha/r · Σ_{i=1..n} B_i Λ_i A Γ_i        n = ⌈min(in, out)/r⌉; Λ_i, Γ_i diagonal, trained;
              (transposed when in > out: Γ scales the smaller side)

The frozen factors themselves are checked separately against their definitions (seeded Kaiming / unit-variance
uniform draws, the SVD), and against PEFT (VeRA, RandLoRA) with the same weights copied into PEFT's layers.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune.core.errors import ConfigError, ShapeMismatchError, TargetError
from deltatune.runtime import state_of
from deltatune.methods.vera import projections as rp
from deltatune.methods.vera.randlora import RandLoRAPiece, ScaledBases

from conftest import Tiny, build_tiny, module_pieces

ATOL = 1e-5
MODELS = ("llama", "gpt2", "bert")
# small ranks so the tiny models (hidden 16) have several bases / a proper truncation; RandLoRA r=5 does not divide
# 16 or 8 (n = ⌈16/5⌉ = 4 bases, 20 ≥ 16 directions) and llama's k/v (out 8 < in 16) use the transposed form
CONFIGS = {
    "vera": dt.VeRA(r=4, d_initial=0.1),
    "lora_xs": dt.LoRAXS(r=4, alpha=8.0),
    "randlora": dt.RandLoRA(r=5, alpha=1.0),
}
MATRIX = [pytest.param(m, k, id=f"{m}-{k}") for m in CONFIGS for k in MODELS]
N_TARGETS = {"llama": 14, "gpt2": 8, "bert": 13}


def tiny_with_biases(kind: str) -> Tiny:
    """A tiny model whose biases are non-zero (HF initialises them to zero, which would hide bias handling)."""
    t = build_tiny(kind)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in t.model.named_parameters():
            if name.endswith(".bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return Tiny(kind, t.model, t.inputs)


def weight_view(module: nn.Module) -> Tensor:
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()  # Conv1D stores [in, out]


def to_native(module: nn.Module, dw: Tensor) -> Tensor:
    return dw if isinstance(module, nn.Linear) else dw.t()


# --- each paper's formula, from the piece's raw tensors ---------------------------------------------------
def expected_dw(method: str, cfg, module: nn.Module, piece: nn.Module) -> Tensor:
    d_out, d_in = weight_view(module).shape
    if method == "vera":
        a, b = (t.double() for t in piece.projections())
        assert a.shape == (cfg.r, d_in) and b.shape == (d_out, cfg.r)
        d, bv = piece.lambda_d.detach().double(), piece.lambda_b.detach().double()
        return (torch.diag(bv) @ b @ torch.diag(d) @ a).float()
    if method == "lora_xs":
        s = cfg.alpha / cfg.r
        return (s * piece.B.double() @ piece.R.detach().double() @ piece.A.double()).float()
    m, big = min(d_out, d_in), max(d_out, d_in)
    n = math.ceil(m / cfg.r)
    a, b = (t.double() for t in piece.bases())
    assert a.shape == (cfg.r, m) and b.shape == (big, n, cfg.r)
    lam, gam = piece.lambdas.detach().double(), piece.gammas.detach().double()
    total = torch.zeros(big, m, dtype=torch.float64)
    for i in range(n):  # Σ_i B_i Λ_i A Γ_i
        total += b[:, i, :] @ torch.diag(lam[i]) @ a @ torch.diag(gam[i])
    total *= cfg.alpha / cfg.r
    return (total if d_in <= d_out else total.t()).float()


def expected_params(method: str, cfg, d_out: int, d_in: int) -> int:
    """Trainable numbers per d_in × d_out layer, as each paper counts them."""
    if method == "vera":  # Kopiczko et al. 2024: |d| + |b| = r + d_out
        return cfg.r + d_out
    if method == "lora_xs":  # Bałazy et al. 2024: R ∈ R^{r×r}
        return cfg.r * cfg.r
    m = min(d_in, d_out)  # Albert et al. 2025: n = ⌈min(d_in, d_out)/r⌉ terms, each Λ_i (r) and Γ_i (min side)
    return math.ceil(m / cfg.r) * (cfg.r + m)


def attach(tiny: Tiny, method: str, name: str = "a", cfg=None) -> None:
    dt.attach(tiny.model, cfg or CONFIGS[method], name)


@torch.no_grad()
def randomize(model: nn.Module, name: str, seed: int = 7, size: float = 0.3) -> None:
    """Make every trained tensor of delta `name` non-trivial, in place."""
    g = torch.Generator().manual_seed(seed)
    for _, piece in module_pieces(model, name).values():
        for p in piece.parameters():
            p.add_(size * torch.randn(p.shape, generator=g))


def reference(tiny: Tiny, model: nn.Module, parts: list[tuple[str, str]]) -> nn.Module:
    """A plain copy of the base with W + Σ ΔW from the formulas; parts = [(delta name, method)]."""
    ref = tiny.fresh()
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for name, method in parts:
            cfg = state_of(model).deltas[name].config
            for path, (module, piece) in module_pieces(model, name).items():
                dw = expected_lora(cfg, piece) if method == "lora" else expected_dw(method, cfg, module, piece)
                mods[path].weight.add_(to_native(mods[path], dw))
    return ref


def expected_lora(cfg: dt.LoRA, piece: nn.Module) -> Tensor:
    return cfg.alpha / cfg.r * piece.lora_B.detach() @ piece.lora_A.detach()


def base_params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "deltatune" not in k}


# --- 1. identity at init ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kind", MATRIX)
def test_identity_at_init(method: str, kind: str) -> None:
    tiny = tiny_with_biases(kind)
    y0 = tiny.logits()
    attach(tiny, method, cfg=CONFIGS[method].replace(dropout=0.3))
    pieces = module_pieces(tiny.model, "a")
    assert len(pieces) == N_TARGETS[kind]
    for path, (module, piece) in pieces.items():
        # the update is zero only through the factor that starts at zero; everything else is non-trivial
        frozen = dict(piece.named_buffers())
        frozen.update(zip("AB", piece.projections() if method == "vera" else piece.bases() if method == "randlora" else ()))
        assert all(t.abs().max() > 1e-3 for k, t in frozen.items() if k != "shape"), path
        assert float(weight_view(module).abs().max()) > 0.01
    torch.testing.assert_close(tiny.logits(), y0, atol=1e-6, rtol=0)
    torch.testing.assert_close(tiny.logits(grad=True).detach(), y0, atol=1e-6, rtol=0)
    tiny.model.train()  # dropout on: the zero factor still keeps ΔW = 0
    torch.testing.assert_close(tiny.logits(grad=True).detach(), y0, atol=1e-6, rtol=0)


def test_initial_values_follow_the_papers() -> None:
    tiny = build_tiny("llama")
    for name, method in (("v", "vera"), ("x", "lora_xs"), ("r", "randlora")):
        attach(tiny, method, name)
    q = tiny.model.model.layers[0].self_attn.q_proj
    v, x, r = q.deltatune["v"], q.deltatune["x"], q.deltatune["r"]
    assert torch.equal(v.lambda_d, torch.full((4,), 0.1)) and torch.equal(v.lambda_b, torch.zeros(16))
    assert torch.equal(x.R, torch.zeros(4, 4))
    assert torch.equal(r.lambdas, torch.zeros(4, 5)) and torch.equal(r.gammas, torch.full((4, 16), 1 / 16))


# --- 2. forward = formula; merged == unmerged; unmerge restores -------------------------------------------
@pytest.mark.parametrize("method,kind", MATRIX)
def test_formula_merge_unmerge(method: str, kind: str) -> None:
    tiny = tiny_with_biases(kind)
    model = tiny.model
    attach(tiny, method)
    randomize(model, "a")
    w0 = base_params(model)
    y = tiny.logits()
    assert (y - tiny.logits(tiny.fresh())).abs().max() > 1e-3, "the randomised delta must change the logits"
    torch.testing.assert_close(tiny.logits(grad=True).detach(), y, atol=ATOL, rtol=0)
    torch.testing.assert_close(y, tiny.logits(reference(tiny, model, [("a", method)])), atol=ATOL, rtol=0)
    dt.merge(model)
    torch.testing.assert_close(tiny.logits(), y, atol=ATOL, rtol=0)
    dt.unmerge(model)
    for k, v in base_params(model).items():
        torch.testing.assert_close(v, w0[k], atol=1e-6, rtol=0, msg=f"unmerge left {k} changed")
    torch.testing.assert_close(tiny.logits(), y, atol=ATOL, rtol=0)


def test_vera_rank_may_exceed_the_layer() -> None:
    """VeRA's r is not bounded by the layer (the paper uses r = 1024 on 1024-wide layers): r = 32 > 16 still follows
    the formula, and ΔW has rank at most min(out, in)."""
    tiny = build_tiny("llama")
    cfg = dt.VeRA(r=32)
    attach(tiny, "vera", cfg=cfg)
    randomize(tiny.model, "a")
    torch.testing.assert_close(tiny.logits(), tiny.logits(reference(tiny, tiny.model, [("a", "vera")])), atol=ATOL, rtol=0)
    assert dt.summary(tiny.model)["a"].trainable == sum(32 + weight_view(m).shape[0]
                                                        for m, _ in module_pieces(tiny.model, "a").values())


# --- 3. save -> load ----------------------------------------------------------------------------------------
SAVED_KEYS = {"vera": {"lambda_d", "lambda_b", "shape"}, "lora_xs": {"A", "B", "R"},
              "randlora": {"lambdas", "gammas", "shape"}}


@pytest.mark.parametrize("method,kind", MATRIX)
def test_save_load_in_a_fresh_setting(method: str, kind: str, tmp_path: Path) -> None:
    tiny = tiny_with_biases(kind)
    attach(tiny, method)
    randomize(tiny.model, "a")
    y = tiny.logits()
    out = dt.save(tiny.model, tmp_path / "d", name="a")
    d = dt.Delta.read(out)
    assert d.config == CONFIGS[method]
    pieces = module_pieces(tiny.model, "a")
    for path, (module, piece) in pieces.items():
        assert set(d.state[path]) == SAVED_KEYS[method], "frozen random bases must not be saved"
        torch.testing.assert_close(d.tensors()[path].to_dense(), expected_dw(method, CONFIGS[method], module, piece),
                                   atol=1e-6, rtol=0)
    stored = sum(t.numel() for st in d.state.values() for k, t in st.items() if k != "shape")
    trained = dt.summary(tiny.model)["a"].trainable
    if method == "lora_xs":  # the SVD factors are saved: r(in + out) per module beside the r² trained numbers
        assert stored == trained + sum(4 * sum(weight_view(m).shape) for m, _ in pieces.values())
    else:  # only the trained vectors: the file is about as small as the trained count
        assert stored == trained
        assert (out / "delta.safetensors").stat().st_size < 4 * trained + 512 * len(pieces)
    # a fresh process: the shared table is empty, the model is new, nothing is left from this one
    rp.clear()
    fresh = tiny.fresh()
    dt.load(fresh, out)
    torch.testing.assert_close(tiny.logits(fresh), y, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in fresh.parameters())


def test_vera_bases_regenerate_identically_from_the_seed() -> None:
    from deltatune.methods.vera.randlora import randlora_bases
    from deltatune.methods.vera.vera import vera_projections

    a1, b1 = (t.clone() for t in vera_projections(3, 4, 24, 16))
    ra1, rb1 = (t.clone() for t in randlora_bases(3, 5, 16, 24))
    rp.clear()
    a2, b2 = vera_projections(3, 4, 24, 16)
    ra2, rb2 = randlora_bases(3, 5, 16, 24)
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and torch.equal(ra1, ra2) and torch.equal(rb1, rb2)
    a3, b3 = vera_projections(4, 4, 24, 16)  # another seed, other matrices
    assert (a3 - a1).abs().max() > 0.1 and (b3 - b1).abs().max() > 0.1


def test_bases_distributions() -> None:
    """VeRA: Kaiming uniform, U(±√(6/fan_in)) with fan_in = in for A and r for B; RandLoRA: unit variance."""
    from deltatune.methods.vera.randlora import randlora_bases
    from deltatune.methods.vera.vera import vera_projections

    a, b = vera_projections(0, 64, 512, 256)
    for t, fan_in in ((a, 256), (b, 64)):
        bound = math.sqrt(6 / fan_in)
        assert float(t.abs().max()) <= bound and float(t.abs().max()) > 0.99 * bound
        assert abs(float(t.std()) - bound / math.sqrt(3)) < 0.02 * bound
        assert abs(float(t.mean())) < 0.02 * bound
    ra, rb = randlora_bases(0, 32, 256, 512)
    for t in (ra, rb):
        assert abs(float(t.std()) - 1.0) < 0.02 and float(t.abs().max()) <= math.sqrt(3)


def test_bases_are_shared_not_copied_per_module() -> None:
    tiny = build_tiny("llama")
    attach(tiny, "vera", "v")
    attach(tiny, "randlora", "r")
    layers = tiny.model.model.layers
    q0, q1, o1 = layers[0].self_attn.q_proj, layers[1].self_attn.q_proj, layers[1].self_attn.o_proj  # all 16 × 16
    k0, down0 = layers[0].self_attn.k_proj, layers[0].mlp.down_proj  # 8 × 16 and 16 × 32
    for name, get in (("v", lambda p: p.projections()), ("r", lambda p: p.bases())):
        same = [get(m.deltatune[name]) for m in (q0, q1, o1)]
        for t in same[1:]:
            assert all(x is y for x, y in zip(t, same[0])), "modules of one size must hold the same tensors"
        assert get(k0.deltatune[name])[1] is not same[0][1]  # VeRA: B by out (8); RandLoRA: B by (n, M)
    assert q0.deltatune["v"].projections()[0] is not down0.deltatune["v"].projections()[0]  # VeRA: A by in (32)
    assert q0.deltatune["r"].bases()[0] is down0.deltatune["r"].bases()[0]  # RandLoRA: A by the smaller side (16)
    up0 = layers[0].mlp.up_proj  # 32 × 16: the same sides as down_proj (16 × 32), transposed
    assert all(x is y for x, y in zip(up0.deltatune["r"].bases(), down0.deltatune["r"].bases()))
    assert k0.deltatune["r"].bases()[0] is not q0.deltatune["r"].bases()[0]  # smaller side 8
    # one A and one B per distinct size, however many modules: llama has sizes 16x16, 8x16, 32x16, 16x32
    ptrs = {t.data_ptr() for _, (_, p) in module_pieces(tiny.model, "v").items() for t in p.projections()}
    assert len(ptrs) == 5  # A: in ∈ {16, 32}; B: out ∈ {16, 8, 32}
    held = rp.table_size()
    dt.detach(tiny.model, "v")
    dt.detach(tiny.model, "r")
    import gc

    gc.collect()
    assert rp.table_size() < held, "detaching the last delta that uses a matrix frees it"


def test_vera_b_of_a_smaller_output_is_a_prefix() -> None:
    """As PEFT slices one shared B: B(out=8) is the first 8 rows of B(out=32); RandLoRA slices both bases."""
    from deltatune.methods.vera.randlora import randlora_bases
    from deltatune.methods.vera.vera import vera_projections

    assert torch.equal(vera_projections(0, 4, 8, 16)[1], vera_projections(0, 4, 32, 16)[1][:8])
    small_a, small_b = randlora_bases(0, 4, 16, 20)
    big_a, big_b = randlora_bases(0, 4, 16, 48)
    assert torch.equal(small_b, big_b[:20]) and torch.equal(small_a, big_a)
    assert torch.equal(randlora_bases(0, 4, 12, 48)[0], randlora_bases(0, 4, 16, 48)[0][:, :12])


# --- 4. gradients reach only the delta's own parameters -------------------------------------------------------
@pytest.mark.parametrize("method,kind", MATRIX)
def test_grads_only_on_own_params(method: str, kind: str) -> None:
    tiny = tiny_with_biases(kind)
    model = tiny.model
    dt.attach(model, dt.LoRA(r=2), "other", activate=False)
    attach(tiny, method)
    randomize(model, "a")
    model.train()
    y = tiny.logits(grad=True)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    own = {id(p) for _, piece in module_pieces(model, "a").values() for p in piece.parameters()}
    assert own
    for n, p in model.named_parameters():
        if id(p) in own:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
        else:
            assert p.grad is None, f"{n} (not delta 'a') got a gradient"
    for _, piece in module_pieces(model, "a").values():
        assert all(not b.requires_grad for b in piece.buffers())


# --- 5. summed with an active LoRA delta: W + ΔW_lora + ΔW_method ------------------------------------------------
@pytest.mark.parametrize("method,kind", MATRIX)
def test_sum_with_active_lora(method: str, kind: str) -> None:
    tiny = tiny_with_biases(kind)
    model = tiny.model
    dt.attach(model, dt.LoRA(r=2, alpha=4), "l")
    attach(tiny, method)
    randomize(model, "l", seed=1)
    randomize(model, "a", seed=2)
    dt.activate(model, ["l", "a"])
    want = tiny.logits(reference(tiny, model, [("l", "lora"), ("a", method)]))
    torch.testing.assert_close(tiny.logits(), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(tiny.logits(grad=True).detach(), want, atol=ATOL, rtol=0)
    dt.merge(model, "a")  # one merged, one running
    torch.testing.assert_close(tiny.logits(), want, atol=ATOL, rtol=0)
    dt.merge(model, "l")
    torch.testing.assert_close(tiny.logits(), want, atol=ATOL, rtol=0)
    dt.unmerge(model, "a")  # not the newest: still exact
    torch.testing.assert_close(tiny.logits(), want, atol=ATOL, rtol=0)
    dt.unmerge(model)
    with dt.active(model, None):
        torch.testing.assert_close(tiny.logits(), tiny.logits(tiny.fresh()), atol=1e-6, rtol=0)


# --- 6. parameter counts: the papers' formulas ------------------------------------------------------------------
@pytest.mark.parametrize("method,kind", MATRIX)
def test_trainable_count_is_the_papers_formula(method: str, kind: str) -> None:
    tiny = build_tiny(kind)
    attach(tiny, method)
    want = 0
    for module, _ in module_pieces(tiny.model, "a").values():
        d_out, d_in = weight_view(module).shape
        want += expected_params(method, CONFIGS[method], d_out, d_in)
    row = dt.summary(tiny.model)["a"]
    assert (row.modules, row.params, row.trainable) == (N_TARGETS[kind], want, want)


@pytest.mark.parametrize("method,cfg,want", [
    ("vera", dt.VeRA(r=256), 256 + 4096),
    ("lora_xs", dt.LoRAXS(r=64), 64 * 64),
    ("randlora", dt.RandLoRA(r=256), 16 * (256 + 4096)),
])
def test_count_for_a_4096_layer(method: str, cfg, want: int) -> None:
    """The numbers docs/methods.md quotes, on a real 4096 × 4096 Linear (meta device: no memory, no SVD for VeRA
    and RandLoRA; LoRA-XS needs the weight's SVD, so its layer is 512 × 512 scaled by the formula)."""
    if method == "lora_xs":
        model = nn.Sequential(nn.Linear(512, 512))
        dt.attach(model, cfg, "a")
        assert dt.summary(model)["a"].trainable == want  # r², independent of the layer size
        return
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4096, 4096, bias=False))
    dt.attach(model, cfg, "a")
    assert dt.summary(model)["a"].trainable == want == expected_params(method, cfg, 4096, 4096)


# --- 7. detached Delta objects: update kinds, ranks ------------------------------------------------------------
def test_delta_tensor_kinds_and_ranks(tmp_path: Path) -> None:
    tiny = build_tiny("llama")
    for name, method in (("v", "vera"), ("x", "lora_xs"), ("r", "randlora")):
        attach(tiny, method, name)
        randomize(tiny.model, name)
    path = "model.layers.0.self_attn.q_proj"
    v, x, r = (dt.Delta.from_model(tiny.model, n).update(path)[0] for n in "vxr")
    assert isinstance(v, dt.LowRankDelta) and v.rank == 4 and torch.linalg.matrix_rank(v.to_dense()) == 4
    assert isinstance(x, dt.LowRankDelta) and x.rank == 4 and torch.linalg.matrix_rank(x.to_dense()) == 4
    assert isinstance(r, dt.DenseDelta) and torch.linalg.matrix_rank(r.to_dense()) == 16, "RandLoRA is full rank"
    both = v + x  # arithmetic stays exact (low-rank + low-rank concatenates)
    torch.testing.assert_close(both.to_dense(), v.to_dense() + x.to_dense(), atol=1e-6, rtol=0)


def test_lora_xs_factors_are_the_truncated_svd() -> None:
    tiny = build_tiny("gpt2")
    attach(tiny, "lora_xs")
    for path, (module, piece) in module_pieces(tiny.model, "a").items():
        w = weight_view(module).detach().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]  # Eckart–Young: the rank-4 truncation of W
        torch.testing.assert_close(piece.B.double() @ piece.A.double(), best, atol=1e-5, rtol=0)
        torch.testing.assert_close(piece.B.double().t() @ piece.B.double(), torch.eye(4, dtype=torch.float64),
                                   atol=1e-5, rtol=0)  # B = U_r: orthonormal columns
        torch.testing.assert_close(torch.linalg.vector_norm(piece.A.double(), dim=1), s[:4], atol=1e-5, rtol=0)


# --- 8. RandLoRA's two forward paths and its memory-lean autograd function ---------------------------------------
def test_randlora_scaled_bases_gradcheck() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 7, dtype=torch.float64, generator=g)
    lam = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    gam = torch.randn(4, 7, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l, q: ScaledBases.apply(a, l, q), (lam, gam))
    want = torch.stack([torch.diag(lam[i]) @ a @ torch.diag(gam[i]) for i in range(4)])  # Λ_i A Γ_i
    torch.testing.assert_close(ScaledBases.apply(a, lam, gam), want)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_randlora_dense_and_factored_paths_agree(kind: str, monkeypatch) -> None:
    tiny = build_tiny(kind)
    attach(tiny, "randlora")
    randomize(tiny.model, "a")
    tiny.model.train()
    results = []
    for dense in (False, True):
        monkeypatch.setattr(RandLoRAPiece, "dense_is_cheaper", lambda self, rows, dense=dense: dense)
        tiny.model.zero_grad()
        y = tiny.logits(grad=True)
        y.pow(2).sum().backward()
        grads = [p.grad.clone() for _, pc in module_pieces(tiny.model, "a").values() for p in pc.parameters()]
        results.append((y.detach(), grads, tiny.logits()))
    (y0, g0, n0), (y1, g1, n1) = results
    torch.testing.assert_close(y0, y1, atol=ATOL, rtol=0)
    torch.testing.assert_close(n0, n1, atol=ATOL, rtol=0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_randlora_picks_the_cheaper_path() -> None:
    tiny = build_tiny("llama")
    attach(tiny, "randlora")
    piece = tiny.model.model.layers[0].mlp.up_proj.deltatune["a"]  # 32 × 16: n·r = 20, m = 16, M = 32
    assert not piece.dense_is_cheaper(12)  # 20·16·32 + 12·16·32 > 12·20·48
    assert piece.dense_is_cheaper(1000)


# --- 9. dropout only in training ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(CONFIGS))
def test_dropout_only_in_train_mode(method: str) -> None:
    tiny = build_tiny("llama")
    attach(tiny, method, cfg=CONFIGS[method].replace(dropout=0.5))
    randomize(tiny.model, "a")
    y_eval = tiny.logits()
    tiny.model.train()
    torch.manual_seed(0)
    y_train = tiny.logits(grad=True).detach()
    assert (y_train - y_eval).abs().max() > 1e-4
    tiny.model.eval()
    torch.testing.assert_close(tiny.logits(grad=True).detach(), y_eval, atol=1e-6, rtol=0)


# --- 10. mixed batches (per-example routing) ----------------------------------------------------------------
@pytest.mark.parametrize("method", list(CONFIGS))
def test_mixed_batch_rows_follow_their_delta(method: str) -> None:
    tiny = build_tiny("llama")
    model = tiny.model
    dt.attach(model, dt.LoRA(r=2), "l")
    attach(tiny, method)
    randomize(model, "l", seed=1)
    randomize(model, "a", seed=2)
    with dt.active(model, "a"):
        y_a = tiny.logits()
    with dt.active(model, "l"):
        y_l = tiny.logits()
    with dt.route(model, ["a", "l"]):
        y = tiny.logits()
    torch.testing.assert_close(y[0], y_a[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(y[1], y_l[1], atol=ATOL, rtol=0)


# --- 11. bad input: named errors, model untouched -----------------------------------------------------------------
@pytest.mark.parametrize("cfg", [
    lambda: dt.VeRA(r=0), lambda: dt.VeRA(d_initial=float("nan")), lambda: dt.VeRA(d_initial=0.0), lambda: dt.VeRA(dropout=1.0),
    lambda: dt.VeRA(seed=-1), lambda: dt.LoRAXS(r=2.5), lambda: dt.LoRAXS(alpha=0),
    lambda: dt.RandLoRA(r=True), lambda: dt.RandLoRA(alpha=float("inf")), lambda: dt.RandLoRA(dropout=-0.1),
])
def test_bad_configs(cfg) -> None:
    with pytest.raises(ConfigError):
        cfg()


def test_lora_xs_rank_above_the_weight_is_refused_and_model_untouched() -> None:
    tiny = build_tiny("llama")
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with pytest.raises(TargetError, match=r"r=9 exceeds min\(out=8, in=16\).*k_proj"):
        dt.attach(tiny.model, dt.LoRAXS(r=9), "a")
    assert state_of(tiny.model) is None and all(p.requires_grad for p in tiny.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())


@pytest.mark.parametrize("method", ["vera", "randlora"])
def test_saved_size_of_another_module_is_refused(method: str, tmp_path: Path) -> None:
    """A file whose recorded [out, in] does not match (e.g. edited, or paths of another model) fails before anything
    is installed: the regenerated bases would otherwise silently be the wrong ones."""
    tiny = build_tiny("gpt2")
    attach(tiny, method, cfg=CONFIGS[method].replace(targets=("c_proj",)))
    d = dt.Delta.from_model(tiny.model, "a")
    path = next(p for p in d.state if p.endswith("attn.c_proj"))
    d.state[path]["shape"] = torch.tensor([16, 17])
    fresh = tiny.fresh()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ShapeMismatchError, match=r"\[16, 17\].*load it into the model it was trained on"):
        dt.io.files.apply(fresh, d)
    assert state_of(fresh) is None and all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_embedding_targets_are_refused() -> None:
    tiny = build_tiny("llama")
    for cfg in (dt.VeRA(targets=("embed_tokens",)), dt.LoRAXS(targets=("embed_tokens",)),
                dt.RandLoRA(targets=("embed_tokens",))):
        with pytest.raises(TargetError, match="Embedding"):
            dt.attach(tiny.model, cfg, "a")
        assert state_of(tiny.model) is None


# --- 12. half-precision models: pieces train in float32 ------------------------------------------------------------
@pytest.mark.parametrize("method", list(CONFIGS))
def test_bfloat16_model(method: str) -> None:
    tiny = build_tiny("llama")
    tiny.model.to(torch.bfloat16)
    attach(tiny, method)
    randomize(tiny.model, "a")
    for _, piece in module_pieces(tiny.model, "a").values():
        assert all(p.dtype == torch.float32 for p in piece.parameters())
    y = tiny.logits()
    assert y.dtype == torch.bfloat16
    # the formula in float32 on the bf16-rounded base weights (LoRA-XS's SVD is of those rounded weights)
    ref = tiny.fresh()
    ref.load_state_dict({k: v.float() for k, v in tiny.model.state_dict().items() if "deltatune" not in k})
    plain = tiny.logits(ref)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for path, (module, piece) in module_pieces(tiny.model, "a").items():
            mods[path].weight.add_(to_native(module, expected_dw(method, CONFIGS[method], mods[path], piece)))
    want = tiny.logits(ref)
    assert (want - plain).abs().max() > 0.05
    assert (y.float() - want).abs().max() < 0.02  # bf16 activations
    dt.merge(tiny.model)
    assert (tiny.logits().float() - want).abs().max() < 0.02  # plus bf16 rounding of the merged weights


# --- 13. PEFT as the oracle: the same weights give the same logits ------------------------------------------------
peft = pytest.importorskip("peft")


def _peft_module(pm, path: str) -> nn.Module:
    return pm.base_model.model.get_submodule(path)


PEFT_VERA = {  # model, targets: one input size per case (PEFT slices one shared A by in); outputs may differ
    "llama-in16": ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]),
    "llama-down": ("llama", ["down_proj"]),
    "gpt2-conv1d": ("gpt2", ["c_attn", "attn.c_proj", "c_fc"]),
    "bert-in16": ("bert", ["query", "key", "value", "attention.output.dense", "intermediate.dense"]),
}


@pytest.mark.parametrize("case", sorted(PEFT_VERA))
def test_vera_matches_peft(case: str) -> None:
    from peft import VeraConfig, get_peft_model

    kind, targets = PEFT_VERA[case]
    tiny = tiny_with_biases(kind)
    cfg = dt.VeRA(r=4, targets=tuple(targets))
    attach(tiny, "vera", cfg=cfg)
    randomize(tiny.model, "a", size=2.0)  # BERT's pooled logits move little otherwise
    ours = tiny.logits()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(tiny.fresh(), VeraConfig(r=4, target_modules=targets, fan_in_fan_out=kind == "gpt2"))
    pm.eval()
    shared_a, shared_b = pm.base_model.vera_A["default"], pm.base_model.vera_B["default"]
    written_a = torch.zeros_like(shared_a, dtype=torch.bool)
    with torch.no_grad():
        for path, (module, piece) in module_pieces(tiny.model, "a").items():
            layer = _peft_module(pm, path)
            a, b = piece.projections()
            d_out, d_in = weight_view(module).shape
            assert (layer.in_features, layer.out_features) == (d_in, d_out)
            if written_a[:, :d_in].any():  # layers of one input size share A: ours must agree already
                assert torch.equal(shared_a[:, :d_in], a)
            shared_a[:, :d_in] = a
            written_a[:, :d_in] = True
            shared_b[:d_out] = b  # B of a smaller output is a prefix of the larger (see the prefix test)
            layer.vera_lambda_d["default"].copy_(piece.lambda_d)
            layer.vera_lambda_b["default"].copy_(piece.lambda_b)
        for path, (module, piece) in module_pieces(tiny.model, "a").items():  # every layer still sees its own B
            assert torch.equal(shared_b[: weight_view(module).shape[0]], piece.projections()[1])
    assert (ours - tiny.logits(tiny.fresh())).abs().max() > 1e-3
    torch.testing.assert_close(tiny.logits(pm), ours, atol=ATOL, rtol=0)


PEFT_RANDLORA = {  # one smaller side (m = 16) per case, so every layer has n = ⌈16/r⌉ bases as in PEFT's slicing
    "llama": ("llama", ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "gpt2-conv1d": ("gpt2", ["c_attn", "c_proj", "c_fc"]),
    "bert": ("bert", ["query", "key", "value", "dense"]),
}


@pytest.mark.parametrize("case", sorted(PEFT_RANDLORA))
def test_randlora_matches_peft(case: str) -> None:
    from peft import RandLoraConfig, get_peft_model

    kind, targets = PEFT_RANDLORA[case]
    tiny = tiny_with_biases(kind)
    cfg = dt.RandLoRA(r=5, alpha=2.0, targets=tuple(targets))
    attach(tiny, "randlora", cfg=cfg)
    randomize(tiny.model, "a")
    ours = tiny.logits()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(tiny.fresh(), RandLoraConfig(r=5, randlora_alpha=2, target_modules=targets,
                                                         fan_in_fan_out=kind == "gpt2"))
    pm.eval()
    model = pm.base_model
    # PEFT draws its bases in bfloat16 when available: give it float32 buffers holding our bases
    big_a = torch.zeros(model.randlora_A["default"].shape, dtype=torch.float32)
    big_b = torch.zeros(model.randlora_B["default"].shape, dtype=torch.float32)
    with torch.no_grad():
        for path, (module, piece) in module_pieces(tiny.model, "a").items():
            layer = _peft_module(pm, path)
            a, b = piece.bases()  # a [r, m], b [M, n, r]
            big, n, r = b.shape
            big_a[:, 0, : a.shape[1]] = a
            # PEFT pairs row k·n + i of its scaled A (λ[k, i] A[k] γ[i]) with column k·n + i of its flattened B
            # (which it stores as [M, n, r]); our term i pairs B_i[:, k] with λ_i[k]: put B_i[:, k] in column k·n + i
            big_b[:big, :n] = b.permute(0, 2, 1).reshape(big, r * n).reshape(big, n, r)
            layer.randlora_lambda["default"].copy_(piece.lambdas.t())  # PEFT: [r, n]
            layer.randlora_gamma["default"].copy_(piece.gammas)  # [n, m]
        for path, (module, piece) in module_pieces(tiny.model, "a").items():
            a, b = piece.bases()
            big, n, r = b.shape
            assert torch.equal(big_a[:, 0, : a.shape[1]], a)
            assert torch.equal(big_b[:big, :n], b.permute(0, 2, 1).reshape(big, r * n).reshape(big, n, r))
        model.randlora_A["default"] = big_a
        model.randlora_B["default"] = big_b
    assert (ours - tiny.logits(tiny.fresh())).abs().max() > 1e-3
    torch.testing.assert_close(tiny.logits(pm), ours, atol=ATOL, rtol=0)
    with torch.no_grad():  # and PEFT's own ΔW equals the paper's sum written out here
        for path, (module, piece) in module_pieces(tiny.model, "a").items():
            want = to_native(module, expected_dw("randlora", cfg, module, piece))
            torch.testing.assert_close(_peft_module(pm, path).get_delta_weight("default"), want, atol=1e-5, rtol=0)
