"""Data-driven LoRA initialisations (EVA, CorDA, LoRA-GA), every assertion numeric on the tiny models.

The expected factors are computed here from the formulas of the papers, on inputs and gradients captured by this
file's own hooks and autograd calls (float64), never by the code under test; peft 0.21.2 is the reference
implementation where it has the method (EVA, CorDA, LoRA-GA).
"""
from __future__ import annotations

import dataclasses
import sys
import types
import warnings

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune.core.errors import ConfigError, DeltaNameError, TargetError

from conftest import Tiny, build_tiny, build_tiny_with_biases, module_pieces

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]

ATOL = 1e-5
R, ALPHA = 4, 8.0
KINDS = ("llama", "gpt2", "bert")
METHODS = ("eva", "corda-ipm", "corda-kpm", "lora_ga")


# --- helpers that do not trust the code under test ------------------------------------------------------
_tiny = build_tiny_with_biases


def _batches(kind: str, n: int = 3, seed: int = 0, size: int = 3, seq: int = 10) -> list[dict[str, Tensor]]:
    """Batches with right padding (attention_mask 0) and labels (per token: -100 on padding; bert: classes)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (size, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[0, seq - 3:] = 0  # one padded row
        if kind == "bert":
            labels = torch.randint(0, 3, (size,), generator=g)
        else:
            labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _cfg(kind: str, **kw) -> dt.LoRA:
    return dt.LoRA(**{"r": R, "alpha": ALPHA, **kw})


def _run(method: str, model: nn.Module, cfg: dt.LoRA, batches: list, name: str = "a", **kw) -> nn.Module:
    if method == "eva":
        return dt.init.eva(model, cfg, batches, name, progress=False, **kw)
    if method.startswith("corda"):
        return dt.init.corda(model, cfg, batches, name, mode=method.split("-")[1], progress=False, **kw)
    return dt.init.lora_ga(model, cfg, batches, name, progress=False, **kw)


pieces = module_pieces


def weight_view(module: nn.Module) -> Tensor:
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def to_native(module: nn.Module, dw: Tensor) -> Tensor:
    return dw.t() if isinstance(module, Conv1D) else dw


def expected_dw(piece: nn.Module, s: float) -> Tensor:
    """s·(B A − B0 A0) from the piece's raw tensors (B0 A0: the frozen offset, absent for EVA)."""
    dw = s * (piece.lora_B.detach().double() @ piece.lora_A.detach().double())
    if hasattr(piece, "init_A"):
        dw = dw - s * (piece.init_B.double() @ piece.init_A.double())
    return dw.float()


def token_rows(model: nn.Module, paths: list[str], batches: list[dict]) -> dict[str, Tensor]:
    """Every module's input rows (float64) over the batches, keeping tokens with attention_mask=1 and label != -100."""
    modules = dict(model.named_modules())
    rows: dict[str, list[Tensor]] = {p: [] for p in paths}
    current = {}

    def hook(path):
        def fn(mod, args):
            x = args[0].detach().double()
            m = current["mask"]
            rows[path].append(x[m] if x.shape[:-1] == m.shape else x.reshape(-1, x.shape[-1]))
        return fn

    handles = [modules[p].register_forward_pre_hook(hook(p)) for p in paths]
    try:
        with torch.no_grad():
            for b in batches:
                m = b["attention_mask"].bool()
                if b["labels"].shape == m.shape:
                    m = m & (b["labels"] != -100)
                current["mask"] = m
                model(**b)
    finally:
        for h in handles:
            h.remove()
    return {p: torch.cat(v) for p, v in rows.items()}


def mean_gradients(model: nn.Module, paths: list[str], batches: list[dict]) -> dict[str, Tensor]:
    """∂L/∂W ([out, in], float64) averaged over the batches, by plain autograd on the model's weights."""
    modules = dict(model.named_modules())
    ws = [modules[p].weight for p in paths]
    flags = [w.requires_grad for w in ws]
    for w in ws:
        w.requires_grad_(True)
    total = [torch.zeros_like(w, dtype=torch.float64) for w in ws]
    for b in batches:
        for t, g in zip(total, torch.autograd.grad(model(**b).loss, ws)):
            t += g.double()
    for w, f in zip(ws, flags):
        w.requires_grad_(f)
    return {p: (t.t() if isinstance(modules[p], Conv1D) else t) / len(batches) for p, t in zip(paths, total)}


def projector(rows: Tensor) -> Tensor:
    """Orthogonal projector onto the row space of `rows` [k, d]."""
    q, _ = torch.linalg.qr(rows.double().t())
    return q @ q.t()


def lora_paths(kind: str) -> list[str]:
    """All-linear targets of the tiny model (Linear/Conv1D, output heads excluded), listed by module type."""
    model = build_tiny(kind).model
    heads = ("lm_head", "classifier")
    return [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and not p.startswith(heads)]


@torch.no_grad()
def randomize(model: nn.Module, name: str, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, piece in pieces(model, name).values():
        for p in piece.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def base_params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "deltatune" not in k}


def reference(tiny: Tiny, model: nn.Module, scales: dict[str, float]) -> nn.Module:
    """A plain copy of the base with W + Σ s·(B A − B0 A0) for the named deltas (scale per delta)."""
    ref = tiny.fresh()
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for name, s in scales.items():
            for path, (module, piece) in pieces(model, name).items():
                mods[path].weight.add_(to_native(module, expected_dw(piece, s)))
    return ref


# --- 1. the model is unchanged at step 0 ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init(method: str, kind: str) -> None:
    tiny = _tiny(kind)
    y0 = tiny.logits()
    w0 = base_params(tiny.model)
    _run(method, tiny.model, _cfg(kind), _batches(kind))
    ps = pieces(tiny.model, "a")
    assert len(ps) == len(lora_paths(kind))
    for _, piece in ps.values():  # not a zero-init in disguise: A is set (and B too, where the method sets it)
        assert piece.lora_A.abs().sum() > 0
        assert (piece.lora_B.abs().sum() > 0) == (method != "eva")
    torch.testing.assert_close(tiny.logits(), y0, atol=ATOL, rtol=0)
    torch.testing.assert_close(tiny.logits(grad=True).detach(), y0, atol=ATOL, rtol=0)
    for k, v in base_params(tiny.model).items():
        assert torch.equal(v, w0[k]), f"the init changed the base parameter {k}"


# --- 2. EVA ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_eva_a_spans_top_principal_directions(kind: str) -> None:
    """rho=1: A's rows span the top-r eigenvectors of each module's centered input covariance; B = 0."""
    tiny = _tiny(kind)
    batches = _batches(kind)
    paths = lora_paths(kind)
    xs = token_rows(tiny.model, paths, batches)
    dt.init.eva(tiny.model, _cfg(kind), batches, "a", rho=1, progress=False)
    for path, (module, piece) in pieces(tiny.model, "a").items():
        x = xs[path]
        c = (x - x.mean(0)).t() @ (x - x.mean(0)) / x.shape[0]
        evals, evecs = torch.linalg.eigh(c)
        top = evecs[:, -R:].t()
        assert evals[-R] > 1.01 * evals[-R - 1], "test data should separate the top-r subspace"
        a = piece.lora_A.detach().double()
        torch.testing.assert_close(a @ a.t(), torch.eye(R, dtype=torch.float64), atol=1e-5, rtol=0)  # orthonormal rows
        torch.testing.assert_close(projector(a), projector(top), atol=1e-4, rtol=0, msg=path)
        assert torch.equal(piece.lora_B, torch.zeros_like(piece.lora_B))


@pytest.mark.parametrize("r,rho", [(4, 2.0), (1, 8.0)])
def test_eva_rank_redistribution_follows_explained_variance(r: int, rho: float, tmp_path) -> None:
    """ranks = how many of the global top-(Σr) explained-variance ratios λ/tr(C) each module holds (at most
    round(rho·r) and min(out, in)); α follows so that s = α/r stays the configured scale; A = that many top
    components; modules left with none are not adapted (r=1, rho=8 drops some) and the delta saves and loads."""
    tiny = _tiny("llama")
    batches = _batches("llama")
    paths = lora_paths("llama")
    xs = token_rows(tiny.model, paths, batches)
    modules = dict(tiny.model.named_modules())
    cands = []
    tops = {}
    for i, p in enumerate(paths):
        x = xs[p]
        c = (x - x.mean(0)).t() @ (x - x.mean(0)) / x.shape[0]
        evals, evecs = torch.linalg.eigh(c)
        evals, evecs = evals.flip(0), evecs.flip(1)
        tops[p] = evecs.t()
        cap = min(round(rho * r), *weight_view(modules[p]).shape)
        cands += [(-(evals[j] / evals.clamp_min(0).sum()).item(), i, j, p) for j in range(cap)]
    want = {p: 0 for p in paths}
    for *_, p in sorted(cands)[: r * len(paths)]:
        want[p] += 1
    assert len(set(want.values())) > 1, "the test data should make ranks differ"
    y0 = tiny.logits()
    dt.init.eva(tiny.model, dt.LoRA(r=r, alpha=2.0 * r), batches, "a", rho=rho, progress=False)
    ps = pieces(tiny.model, "a")
    assert set(ps) == {p for p, k in want.items() if k > 0}
    assert (len(ps) < len(paths)) == (r == 1)
    assert sum(piece.lora_A.shape[0] for _, piece in ps.values()) == r * len(paths)  # the rank budget is kept
    for path, (module, piece) in ps.items():
        k = want[path]
        assert piece.lora_A.shape == (k, weight_view(module).shape[1]), path
        assert piece.scale == pytest.approx(2.0)
        torch.testing.assert_close(projector(piece.lora_A.detach()), projector(tops[path][:k]), atol=1e-4, rtol=0)
    # the formula of trainable parameters with per-module ranks: Σ r_i (d_in + d_out)
    assert dt.summary(tiny.model)["a"].trainable == sum(want[p] * sum(weight_view(modules[p]).shape) for p in ps)
    torch.testing.assert_close(tiny.logits(), y0, atol=ATOL, rtol=0)
    randomize(tiny.model, "a")
    y = tiny.logits()
    dt.save(tiny.model, tmp_path / "d", name="a")
    fresh = tiny.fresh()
    dt.load(fresh, tmp_path / "d")
    assert set(pieces(fresh, "a")) == set(ps)
    torch.testing.assert_close(tiny.logits(fresh), y, atol=ATOL, rtol=0)


def test_eva_whiten_divides_by_root_of_singular_values() -> None:
    tiny = _tiny("gpt2")
    batches = _batches("gpt2")
    xs = token_rows(tiny.model, ["transformer.h.0.attn.c_attn"], batches)
    dt.init.eva(tiny.model, _cfg("gpt2", targets=("c_attn",)), batches, "a", rho=1, whiten=True, progress=False)
    piece = pieces(tiny.model, "a")["transformer.h.0.attn.c_attn"][1]
    x = xs["transformer.h.0.attn.c_attn"]
    sigma = torch.linalg.svdvals(x - x.mean(0))[:R]  # singular values of the centered [n, d] input matrix
    torch.testing.assert_close(piece.lora_A.detach().double().norm(dim=1), sigma.rsqrt(), atol=1e-5, rtol=1e-4)


# --- 3. CorDA --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_factors_are_the_context_components(mode: str, kind: str) -> None:
    """s·B·A = U_r Σ_r V_rᵀ C'⁻¹ from SVD(W C'), C' = E[xxᵀ] + 0.01·mean(diag)·I: the r largest (ipm) or smallest
    (kpm) components; the frozen offset equals the starting factors."""
    tiny = _tiny(kind)
    batches = _batches(kind)
    paths = lora_paths(kind)
    xs = token_rows(tiny.model, paths, batches)
    dt.init.corda(tiny.model, _cfg(kind), batches, "a", mode=mode, progress=False)
    for path, (module, piece) in pieces(tiny.model, "a").items():
        x = xs[path]
        c = x.t() @ x / x.shape[0]
        c = c + 0.01 * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
        w = weight_view(module).detach().double()
        u, s, vh = torch.linalg.svd(w @ c, full_matrices=False)
        sl = slice(0, R) if mode == "ipm" else slice(s.numel() - R, s.numel())
        want = u[:, sl] @ torch.diag(s[sl]) @ vh[sl] @ torch.linalg.inv(c)
        got = (ALPHA / R) * piece.lora_B.detach().double() @ piece.lora_A.detach().double()
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-3, msg=path)
        assert torch.equal(piece.init_A, piece.lora_A.detach()) and torch.equal(piece.init_B, piece.lora_B.detach())
        # the remaining components plus the adapted ones rebuild W exactly
        torch.testing.assert_close(u @ torch.diag(s) @ vh @ torch.linalg.inv(c), w, atol=1e-6, rtol=1e-6)


# --- 4. LoRA-GA ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_lora_ga_factors_from_gradient_svd(kind: str) -> None:
    """ArB2r + stable scale: A = c·V[:, :r]ᵀ, B = c·U[:, r:2r] of the mean gradient, c = d_out^¼/√16."""
    tiny = _tiny(kind)
    batches = _batches(kind)
    paths = lora_paths(kind)
    grads = mean_gradients(tiny.model, paths, batches)
    dt.init.lora_ga(tiny.model, _cfg(kind), batches, "a", progress=False)
    for path, (module, piece) in pieces(tiny.model, "a").items():
        u, s, vh = torch.linalg.svd(grads[path], full_matrices=False)
        assert s[R - 1] > 1.02 * s[R], "test gradients should separate the halves"
        assert s.numel() == 2 * R or s[2 * R - 1] > 1.02 * s[2 * R], "test gradients should separate 2r directions"
        c = weight_view(module).shape[0] ** 0.25 / 4
        a, b = piece.lora_A.detach().double(), piece.lora_B.detach().double()
        torch.testing.assert_close(a @ a.t(), c * c * torch.eye(R, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(b.t() @ b, c * c * torch.eye(R, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(projector(a), projector(vh[:R]), atol=1e-4, rtol=0, msg=path)
        torch.testing.assert_close(projector(b.t()), projector(u[:, R:2 * R].t()), atol=1e-4, rtol=0, msg=path)
        # singular vectors' signs are fixed (B A pairs different singular values, so they matter): each row of A and
        # column of B has its largest-magnitude entry positive
        for vec in (*a, *b.t()):
            assert vec[vec.abs().argmax()] > 0


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lora_ga_first_step_follows_the_full_gradient(kind: str) -> None:
    """The first plain-SGD step of learning rate η moves ΔW = s·(B A − B0 A0) by −η·s·(B0·∂L/∂A + ∂L/∂B·A0) to first
    order; for LoRA-GA that is −η·ζ·G₂ᵣ (ζ = s²c², G₂ᵣ the best rank-2r part of the full gradient G), and its cosine
    with −G beats the default init's."""
    tiny = _tiny(kind)
    batches = _batches(kind)
    paths = lora_paths(kind)
    grads = mean_gradients(tiny.model, paths, batches)
    s = ALPHA / R
    cosines = {}
    for init in ("lora_ga", "default"):
        model = tiny.fresh()
        if init == "lora_ga":
            dt.init.lora_ga(model, _cfg(kind), batches, "a", progress=False)
        else:
            torch.manual_seed(0)
            dt.attach(model, _cfg(kind), "a")
        (sum(model(**b).loss for b in batches) / len(batches)).backward()
        cos = []
        for path, (module, piece) in pieces(model, "a").items():
            a0, b0 = piece.lora_A.detach().double(), piece.lora_B.detach().double()
            step = -s * (b0 @ piece.lora_A.grad.double() + piece.lora_B.grad.double() @ a0)  # per unit of η
            g = grads[path]
            cos.append(float(torch.nn.functional.cosine_similarity(step.flatten(), -g.flatten(), dim=0)))
            if init == "lora_ga":
                u, sv, vh = torch.linalg.svd(g, full_matrices=False)
                g2r = u[:, : 2 * R] @ torch.diag(sv[: 2 * R]) @ vh[: 2 * R]
                zeta = s * s * weight_view(module).shape[0] ** 0.5 / 16
                torch.testing.assert_close(step, -zeta * g2r, atol=1e-3 * float((zeta * g2r).abs().max()), rtol=0,
                                           msg=path)
        cosines[init] = sum(cos) / len(cos)
    assert cosines["lora_ga"] > 0.9
    assert cosines["lora_ga"] > cosines["default"] + 0.2


# --- 5. peft as the reference implementation ---------------------------------------------------------------
LLAMA_SQUARE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]  # d_in = 16: peft's low-rank SVDs are exact


def test_eva_matches_peft() -> None:
    peft = pytest.importorskip("peft")
    tiny = _tiny("llama")
    batch = _batches("llama", n=1, size=4, seq=12)[0]
    batches = [batch] * 4  # peft's incremental PCA stops once converged: identical batches make its data ours
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_SQUARE, init_lora_weights="eva",
                             eva_config=peft.EvaConfig(rho=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_eva_state_dict(tiny.fresh(), batches, config, show_progress_bar=False)
    dt.init.eva(tiny.model, dt.LoRA(r=8, alpha=16, targets=tuple(LLAMA_SQUARE)), batches, "a", rho=1, progress=False)
    ps = pieces(tiny.model, "a")
    assert set(ps) == set(theirs)
    for path, (_, piece) in ps.items():
        torch.testing.assert_close(projector(piece.lora_A.detach()), projector(theirs[path]), atol=1e-4, rtol=0, msg=path)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_matches_peft(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """peft writes W − s·B·A into the base; ours keeps W and a frozen offset: the same trained factors must give
    the same logits, and the offsets must equal peft's change of the base weights."""
    peft = pytest.importorskip("peft")
    try:
        import attr  # noqa: F401
    except ImportError:  # peft's corda.py takes `dataclass` from attrs, which peft does not require; stdlib's does the same there
        monkeypatch.setitem(sys.modules, "attr", types.SimpleNamespace(dataclass=dataclasses.dataclass))
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    tiny = _tiny("llama")
    batch = {"input_ids": torch.randint(1, 64, (1, 24), generator=torch.Generator().manual_seed(3))}  # peft: batch 1
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, init_lora_weights="corda",
                             corda_config=CordaConfig(corda_method=mode))
    base = tiny.fresh()
    preprocess_corda(base, config, run_model=lambda: base(**batch))
    pm = peft.get_peft_model(base, config)
    dt.init.corda(tiny.model, _cfg("llama", targets=tuple(targets)), [batch], "a", mode=mode, progress=False)
    modules = dict(pm.base_model.model.named_modules())
    ours = pieces(tiny.model, "a")
    assert len(ours) == 8
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for path, (module, piece) in ours.items():
            layer = modules[path]
            offset = module.weight - layer.base_layer.weight  # what peft removed from the base: s·B0·A0
            torch.testing.assert_close((ALPHA / R) * piece.init_B @ piece.init_A, offset, atol=1e-5, rtol=1e-3, msg=path)
            a = layer.lora_A["default"].weight + 0.2 * torch.randn(piece.lora_A.shape, generator=g)
            b = layer.lora_B["default"].weight + 0.2 * torch.randn(piece.lora_B.shape, generator=g)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
            piece.lora_A.copy_(a)
            piece.lora_B.copy_(b)
    pm.eval()
    torch.testing.assert_close(tiny.logits(), tiny.logits(pm), atol=ATOL, rtol=0)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_lora_ga_matches_peft() -> None:
    """Same gradient directions as peft's LoRA-GA (peft scales B by the singular values; the paper and its
    reference code do not, so only the spans are compared)."""
    peft = pytest.importorskip("peft")
    tiny = _tiny("llama")
    batches = _batches("llama")
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=LLAMA_SQUARE, init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig(direction="ArB2r"))
    base = tiny.fresh()

    def train_step() -> None:
        for b in batches:
            base(**b).loss.backward()

    peft.preprocess_loraga(base, config, train_step)
    pm = peft.get_peft_model(base, config)
    dt.init.lora_ga(tiny.model, _cfg("llama", targets=tuple(LLAMA_SQUARE)), batches, "a", progress=False)
    modules = dict(pm.base_model.model.named_modules())
    ours = pieces(tiny.model, "a")
    assert len(ours) == 12
    for path, (_, piece) in ours.items():
        layer = modules[path]
        torch.testing.assert_close(projector(piece.lora_A.detach()), projector(layer.lora_A["default"].weight.detach()),
                                   atol=1e-4, rtol=0, msg=path)
        torch.testing.assert_close(projector(piece.lora_B.detach().t()),
                                   projector(layer.lora_B["default"].weight.detach().t()), atol=1e-4, rtol=0, msg=path)


@pytest.mark.parametrize("method", ["corda-kpm", "lora_ga"])
def test_peft_export_of_an_offset_delta(method: str, tmp_path) -> None:
    """Saved in PEFT format, s·(B A − B0 A0) becomes a rank-2r LoRA that peft runs to the same logits."""
    peft = pytest.importorskip("peft")
    tiny, _ = _setup(method, "llama")
    y = tiny.logits()
    dt.save(tiny.model, tmp_path / "p", name="a", format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny.fresh(), tmp_path / "p")
    pm.eval()
    torch.testing.assert_close(tiny.logits(pm), y, atol=ATOL, rtol=1e-5)


# --- 6. capabilities every delta gets --------------------------------------------------------------------
def _setup(method: str, kind: str) -> tuple[Tiny, list]:
    tiny = _tiny(kind)
    batches = _batches(kind)
    _run(method, tiny.model, _cfg(kind), batches)
    randomize(tiny.model, "a")  # non-zero updates, so the checks below can fail
    return tiny, batches


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge_and_save_load(method: str, kind: str, tmp_path) -> None:
    tiny, _ = _setup(method, kind)
    model = tiny.model
    w0 = base_params(model)
    y = tiny.logits()
    assert (y - tiny.logits(tiny.fresh())).abs().max() > 1e-3
    torch.testing.assert_close(y, tiny.logits(reference(tiny, model, {"a": ALPHA / R})), atol=ATOL, rtol=0)
    dt.merge(model)
    torch.testing.assert_close(tiny.logits(), y, atol=ATOL, rtol=0)
    dt.unmerge(model)
    # exact up to float32 rounding of W + ΔW − ΔW (CorDA's factors carry C⁻¹, so its ΔW here reach ~100)
    big = max(1.0, max(float(expected_dw(pc, ALPHA / R).abs().max()) for _, pc in pieces(model, "a").values()))
    for k, v in base_params(model).items():
        torch.testing.assert_close(v, w0[k], atol=1e-6 * big, rtol=0, msg=f"unmerge left {k} changed")
    dt.save(model, tmp_path / "d", name="a")
    fresh = tiny.fresh()
    dt.load(fresh, tmp_path / "d")
    torch.testing.assert_close(tiny.logits(fresh), y, atol=ATOL, rtol=0)
    d = dt.Delta.read(tmp_path / "d")
    for path, (module, piece) in pieces(model, "a").items():
        torch.testing.assert_close(d.tensors()[path].to_dense(), expected_dw(piece, ALPHA / R), atol=1e-7 * big, rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_grads_only_on_own_parameters(method: str) -> None:
    tiny, _ = _setup(method, "gpt2")
    model = tiny.model
    torch.manual_seed(0)
    dt.attach(model, _cfg("gpt2"), "other", activate=False)
    y = tiny.logits(grad=True)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    own = {id(p) for _, pc in pieces(model, "a").values() for p in pc.parameters()}
    assert len(own) == 2 * len(pieces(model, "a"))  # lora_A, lora_B; the frozen offset is a buffer
    for n, p in model.named_parameters():
        if id(p) in own:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, f"{n} got a gradient"
    for _, pc in pieces(model, "a").values():
        for name, buf in pc.named_buffers():
            assert not buf.requires_grad, name


@pytest.mark.parametrize("method", METHODS)
def test_sum_with_an_active_lora(method: str) -> None:
    tiny, _ = _setup(method, "llama")
    model = tiny.model
    torch.manual_seed(1)
    dt.attach(model, dt.LoRA(r=2, alpha=6.0), "b")
    randomize(model, "b", seed=3)
    dt.activate(model, ["a", "b"])
    want = tiny.logits(reference(tiny, model, {"a": ALPHA / R, "b": 3.0}))
    torch.testing.assert_close(tiny.logits(), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(tiny.logits(grad=True).detach(), want, atol=ATOL, rtol=0)
    dt.merge(model, ["a", "b"])
    torch.testing.assert_close(tiny.logits(), want, atol=ATOL, rtol=0)


def test_mixed_batch_routes_rows_to_their_delta() -> None:
    """dt.route: row b runs with delta rows[b] (the frozen offset included) exactly as that delta alone."""
    tiny = _tiny("llama")
    batches = _batches("llama")
    dt.init.corda(tiny.model, _cfg("llama"), batches, "a", mode="kpm", progress=False)
    dt.init.lora_ga(tiny.model, _cfg("llama"), batches, "b", progress=False)
    dt.init.eva(tiny.model, _cfg("llama"), batches, "c", progress=False)
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        randomize(tiny.model, name, seed)
    ids = torch.randint(1, 64, (4, 7), generator=torch.Generator().manual_seed(9))
    rows = ["a", "b", None, "c"]
    with torch.no_grad(), dt.route(tiny.model, rows):
        mixed = tiny.model(input_ids=ids).logits
    for i, name in enumerate(rows):
        dt.activate(tiny.model, name)
        with torch.no_grad():
            alone = tiny.model(input_ids=ids[i:i + 1]).logits
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=ATOL, rtol=0, msg=f"row {i} ({name})")


@pytest.mark.parametrize("method", ["corda-ipm", "lora_ga"])
def test_dora_on_top_is_identity_at_init(method: str) -> None:
    tiny = _tiny("bert")
    y0 = tiny.logits()
    _run(method, tiny.model, _cfg("bert", dora=True), _batches("bert"))
    torch.testing.assert_close(tiny.logits(), y0, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["corda-kpm", "lora_ga"])
def test_trainable_count_is_lora_formula(method: str) -> None:
    """LoRA's count (Hu et al. 2021): r·(d_in + d_out) per adapted d_in×d_out matrix (8·(4096+4096) = 65,536 for a
    4096×4096 layer at r=8), plus the head trained whole with modules_to_save."""
    tiny = _tiny("bert")
    _run(method, tiny.model, _cfg("bert", modules_to_save=("classifier",)), _batches("bert"))
    modules = dict(tiny.model.named_modules())
    want = sum(R * (weight_view(modules[p]).shape[0] + weight_view(modules[p]).shape[1]) for p in lora_paths("bert"))
    head = modules["classifier"].weight.numel() + modules["classifier"].bias.numel()
    assert dt.summary(tiny.model)["a"].trainable == want + head


# --- 7. streaming: bounded memory, shared inputs ------------------------------------------------------------
def _count_forwards(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("method", METHODS)
def test_memory_budget_streams_one_module_at_a_time(method: str) -> None:
    """memory=1 byte: one pass per module (per group of modules sharing an input), same factors as one pass."""
    batches = _batches("llama")
    got = {}
    for memory in (None, 1):
        tiny = _tiny("llama")
        calls = _count_forwards(tiny.model)
        _run(method, tiny.model, _cfg("llama"), iter(batches), memory=memory)  # a one-shot iterator, several passes
        got[memory] = {p: (pc.lora_A.detach().clone(), pc.lora_B.detach().clone()) for p, (_, pc) in pieces(tiny.model, "a").items()}
        per_layer = 4 if method != "lora_ga" else 7  # inputs: (q, k, v), o, (gate, up), down; gradients: every weight
        passes = 1 if memory is None else 2 * per_layer
        probe = 0 if method == "lora_ga" else 1
        assert calls[0] == probe + passes * len(batches)
    for p, (a, b) in got[None].items():
        a1, b1 = got[1][p]
        torch.testing.assert_close(projector(a1), projector(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(b1 @ a1, b @ a, atol=1e-5, rtol=1e-4)


def test_eva_shares_one_decomposition_between_modules_with_the_same_input() -> None:
    tiny = _tiny("llama")
    dt.init.eva(tiny.model, _cfg("llama"), _batches("llama"), "a", rho=1, progress=False)
    ps = pieces(tiny.model, "a")
    for layer in (0, 1):
        q = ps[f"model.layers.{layer}.self_attn.q_proj"][1].lora_A
        for other in ("k_proj", "v_proj"):
            assert torch.equal(ps[f"model.layers.{layer}.self_attn.{other}"][1].lora_A, q)


def test_given_init_alone_starts_as_default_lora() -> None:
    tiny = _tiny("llama")
    y0 = tiny.logits()
    dt.attach(tiny.model, dt.LoRA(r=R, init="given"), "a")
    for _, piece in pieces(tiny.model, "a").values():
        assert torch.equal(piece.init_B, torch.zeros_like(piece.init_B))
        assert torch.equal(piece.lora_B, torch.zeros_like(piece.lora_B)) and piece.lora_A.abs().sum() > 0
    torch.testing.assert_close(tiny.logits(), y0, atol=ATOL, rtol=0)


# --- 8. bad input: a deltatune error naming the problem, the model untouched -------------------------------------
def _untouched(tiny: Tiny, w0: dict[str, Tensor], flags: dict[str, bool]) -> None:
    model = tiny.model
    assert not any("deltatune" in n for n, _ in model.named_modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for k, v in base_params(model).items():
        assert torch.equal(v, w0[k])
    assert not model.training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


BAD = {
    "not-lora": (dict(cfg=dt.Dense()), ConfigError, "dt.LoRA config"),
    "pissa-init": (dict(cfg=dt.LoRA(r=2, init="pissa")), ConfigError, "leave LoRA.init"),
    "embedding": (dict(cfg=dt.LoRA(r=2, targets=("embed_tokens",))), TargetError, "Embedding"),
    "rank-too-big": (dict(cfg=dt.LoRA(r=12, targets=("k_proj",))), TargetError, "exceeds"),
    "no-batches": (dict(batches=[]), ConfigError, "no batches"),
    "bad-batch": (dict(batches=[{"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.ones(2, 3, dtype=torch.long)},
                                {"input_ids": torch.ones(2, 3)}]), RuntimeError, "Long|Int"),  # fails mid-way
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_leaves_model_untouched(method: str, case: str) -> None:
    tiny = _tiny("llama")
    w0, flags = base_params(tiny.model), {n: p.requires_grad for n, p in tiny.model.named_parameters()}
    kw, error, match = BAD[case]
    cfg = kw.get("cfg", _cfg("llama"))
    batches = kw.get("batches", _batches("llama"))
    with pytest.raises(error, match=match):
        _run(method, tiny.model, cfg, batches)
    _untouched(tiny, w0, flags)


@pytest.mark.parametrize("method,kw,match", [
    ("eva", dict(rho=0.5), "rho"), ("corda-ipm", dict(damping=0.0), "damping"),
    ("lora_ga", dict(direction="up"), "direction"), ("lora_ga", dict(scale="big"), "scale"),
    ("lora_ga", dict(gamma=-1), "gamma"), ("eva", dict(memory=0), "memory"),
])
def test_bad_options(method: str, kw: dict, match: str) -> None:
    tiny = _tiny("llama")
    w0, flags = base_params(tiny.model), {n: p.requires_grad for n, p in tiny.model.named_parameters()}
    with pytest.raises(ConfigError, match=match):
        _run(method, tiny.model, _cfg("llama"), _batches("llama"), **kw)
    _untouched(tiny, w0, flags)


def test_corda_bad_mode_and_lora_ga_rank() -> None:
    tiny = _tiny("llama")
    with pytest.raises(ConfigError, match="ipm"):
        dt.init.corda(tiny.model, _cfg("llama"), _batches("llama"), mode="both", progress=False)
    with pytest.raises(TargetError, match="2r=10.*k_proj"):  # k_proj is 8x16: 2r must fit 8
        dt.init.lora_ga(tiny.model, dt.LoRA(r=5), _batches("llama"), progress=False)


@pytest.mark.parametrize("method", METHODS)
def test_modes_restored_after_success_and_failure(method: str) -> None:
    """Input statistics run in eval mode, gradients in the model's own; every submodule gets its mode back."""
    tiny = _tiny("llama")
    tiny.model.train()
    tiny.model.model.layers[1].eval()  # a mixed-mode model
    modes = {n: m.training for n, m in tiny.model.named_modules()}
    seen = []
    tiny.model.model.norm.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    bad = _batches("llama")[:1] + [{"input_ids": torch.ones(2, 3)}]
    with pytest.raises(RuntimeError):
        _run(method, tiny.model, _cfg("llama"), bad)
    _run(method, tiny.model, _cfg("llama"), _batches("llama"))
    assert {n: m.training for n, m in tiny.model.named_modules() if "deltatune" not in n} == modes
    assert set(seen) == ({True} if method == "lora_ga" else {False})


def test_taken_name_fails_before_any_forward() -> None:
    tiny = _tiny("llama")
    dt.attach(tiny.model, _cfg("llama"), "a")
    calls = _count_forwards(tiny.model)
    for method in METHODS:
        with pytest.raises(DeltaNameError, match="already attached"):
            _run(method, tiny.model, _cfg("llama"), _batches("llama"), name="a")
    assert calls[0] == 0


def test_lora_ga_needs_a_loss() -> None:
    tiny = _tiny("llama")
    w0, flags = base_params(tiny.model), {n: p.requires_grad for n, p in tiny.model.named_parameters()}
    no_labels = [{"input_ids": b["input_ids"]} for b in _batches("llama")]
    with pytest.raises(ConfigError, match="no .loss"):
        dt.init.lora_ga(tiny.model, _cfg("llama"), no_labels, progress=False)
    _untouched(tiny, w0, flags)
    # a custom loss works without labels
    dt.init.lora_ga(tiny.model, _cfg("llama"), no_labels, progress=False,
                    loss_fn=lambda m, b: m(**b).logits.float().pow(2).mean())
    assert len(pieces(tiny.model, "default")) == len(lora_paths("llama"))
