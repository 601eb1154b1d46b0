"""LoRA options × module types × capabilities, every assertion numeric (fp32, tiny random models).

Expected updates are computed here from the config and the piece's raw tensors (s·B·A, DoRA's row rescaling,
weight-derived inits' frozen offset), never from the code under test, so a wrong scale, a wrong pattern
resolution or a wrong DoRA formula fails.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune.core.errors import StateError, TargetError, UnsupportedError
from deltatune.methods.lora.autograd import LoRAFunction

from conftest import Tiny, build_tiny

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]

# --- the matrix ---------------------------------------------------------------------------------------
# case: (model kind, extra config kwargs); module type is what the case adapts.
CASES = {
    "linear-llama": ("llama", {}),
    "linear-bert": ("bert", {}),
    "linear-mlp": ("mlp", {}),
    "conv1d-gpt2": ("gpt2", {}),
    "embedding-llama": ("llama", {"targets": ("embed_tokens",)}),
    "embedding-gpt2wpe": ("gpt2", {"targets": ("wpe",)}),  # position table: its input is position_ids
}
N_TARGETS = {"linear-llama": 14, "linear-bert": 13, "linear-mlp": 3, "conv1d-gpt2": 8,  # all-linear minus heads
             "embedding-llama": 1, "embedding-gpt2wpe": 1}
PATTERNS = {  # (rank_pattern, alpha_pattern) keyed by module-name suffix regexes of each model
    "llama": ({"q_proj": 2, "down_proj": 3, "embed_tokens": 2}, {"v_proj": 3.0, "down_proj": 24.0, "embed_tokens": 5.0}),
    "bert": ({"query": 2, r"output\.dense": 3}, {"value": 3.0, "query": 20.0}),
    "mlp": ({"0": 2, "4": 3}, {"2": 3.0, "4": 24.0}),
    "gpt2": ({"c_attn": 2, "wpe": 3}, {"c_fc": 3.0, "c_attn": 20.0, "wpe": 5.0}),
}
OPTIONS = {
    "plain": dict(),
    "rslora": dict(rslora=True),
    "dora": dict(dora=True),
    "dropout": dict(dropout=0.3),
    "bias": dict(bias="lora_only"),
    "gaussian": dict(init="gaussian"),
    "pissa": dict(init="pissa"),
    "milora": dict(init="milora"),
    "olora": dict(init="olora"),
    "patterns": dict(),  # filled per model from PATTERNS
    "dora-rslora-bias-dropout": dict(dora=True, rslora=True, bias="lora_only", dropout=0.2),
    "pissa-dora": dict(init="pissa", dora=True),
}


def _is_dora(option: str) -> bool:
    return bool(OPTIONS[option].get("dora"))


MATRIX = [pytest.param(c, o, id=f"{c}-{o}") for c in CASES for o in OPTIONS
          if not (c.startswith("embedding") and _is_dora(o))]


def make_cfg(case: str, option: str, r: int = 4, alpha: float = 8.0) -> dt.LoRA:
    kind, extra = CASES[case]
    kw = dict(r=r, alpha=alpha, **extra, **OPTIONS[option])
    if option == "patterns":
        kw["rank_pattern"], kw["alpha_pattern"] = PATTERNS[kind]
    return dt.LoRA(**kw)


def setup(case: str, option: str, name: str = "a") -> tuple[Tiny, dt.LoRA]:
    tiny = build_tiny(CASES[case][0])
    cfg = make_cfg(case, option)
    torch.manual_seed(123)
    dt.attach(tiny.model, cfg, name)
    return tiny, cfg


# --- helpers that do not trust the code under test ------------------------------------------------------
def pieces(model: nn.Module, name: str) -> list[tuple[str, nn.Module, nn.Module]]:
    """(path, module, piece) for every module carrying delta `name`."""
    out = []
    for path, module in model.named_modules():
        slot = module._modules.get("deltatune")
        if slot is not None and name in slot:
            out.append((path, module, slot[name]))
    assert out, f"delta {name!r} sits on no module"
    return out


def weight_view(module: nn.Module) -> Tensor:
    """W as [out, in] for Linear, Conv1D and Embedding, from the module types alone."""
    if isinstance(module, nn.Linear):
        return module.weight
    if isinstance(module, (Conv1D, nn.Embedding)):
        return module.weight.t()
    raise AssertionError(type(module))


def to_native(module: nn.Module, dw: Tensor) -> Tensor:
    return dw if isinstance(module, nn.Linear) else dw.t()


def resolved(cfg: dt.LoRA, path: str) -> tuple[int, float]:
    """(r, alpha) for `path`, applying rank/alpha patterns by hand (suffix regex after a dot)."""
    import re

    r, alpha = cfg.r, cfg.alpha
    for key, v in cfg.rank_pattern.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", path):
            r = v
            break
    for key, v in cfg.alpha_pattern.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", path):
            alpha = v
            break
    return r, alpha


def expected_dw(cfg: dt.LoRA, path: str, module: nn.Module, piece: nn.Module) -> Tensor:
    """ΔW [out, in] from the formula: s·(B A − B0 A0), and for DoRA m/‖W+ΔW_lora‖_row ⊙ (W+ΔW_lora) − W."""
    r, alpha = resolved(cfg, path)
    s = alpha / (math.sqrt(r) if cfg.rslora else r)
    a, b = piece.lora_A.detach().double(), piece.lora_B.detach().double()
    assert a.shape[0] == r and b.shape[1] == r, "rank does not follow rank_pattern"
    low = s * (b @ a)
    if cfg.init in ("pissa", "milora", "olora"):
        low = low - s * (piece.init_B.double() @ piece.init_A.double())
    w = weight_view(module).detach().double()
    if cfg.dora:
        v = w + low
        return (piece.magnitude.detach().double()[:, None] * v / v.norm(dim=1, keepdim=True) - w).float()
    return low.float()


@torch.no_grad()
def randomize(model: nn.Module, name: str, seed: int = 7) -> None:
    """Make every delta tensor non-trivial (B ≠ 0, A ≠ 0, magnitude ≠ ‖W‖, bias ≠ 0), in place."""
    g = torch.Generator().manual_seed(seed)
    for _, _, piece in pieces(model, name):
        for pname, p in piece.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if pname == "magnitude":
                p.mul_(1 + 0.2 * noise)
            else:
                p.add_(0.3 * noise)


def reference_model(tiny: Tiny, cfg: dt.LoRA, model: nn.Module, names: list[str]) -> nn.Module:
    """A plain copy of the base whose weights are W + Σ ΔW_name (and biases b + Σ Δb), from the formulas."""
    ref = tiny.fresh()
    ref_modules = dict(ref.named_modules())
    with torch.no_grad():
        for name in names:
            for path, module, piece in pieces(model, name):
                target = ref_modules[path]
                target.weight.add_(to_native(target, expected_dw(cfg, path, module, piece)))
                if hasattr(piece, "bias"):
                    target.bias.add_(piece.bias)
    return ref


def base_params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "deltatune" not in k}


# --- 1. identity at init --------------------------------------------------------------------------------
@pytest.mark.parametrize("case,option", MATRIX)
def test_noop_at_init(case: str, option: str) -> None:
    tiny = build_tiny(CASES[case][0])
    y0 = tiny.logits()
    cfg = make_cfg(case, option)
    dt.attach(tiny.model, cfg, "a")
    assert len(pieces(tiny.model, "a")) >= 1
    torch.testing.assert_close(tiny.logits(), y0, atol=1e-5, rtol=0)  # no_grad path
    torch.testing.assert_close(tiny.logits(grad=True).detach(), y0, atol=1e-5, rtol=0)  # autograd path
    tiny.model.train()  # dropout on, but B = 0 (or a cancelled init) keeps the update zero
    torch.testing.assert_close(tiny.logits(grad=True).detach(), y0, atol=1e-5, rtol=0)


def test_embedding_rejects_dora() -> None:
    tiny = build_tiny("llama")
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with pytest.raises(TargetError, match="Embedding"):
        dt.attach(tiny.model, dt.LoRA(r=2, dora=True, targets=("embed_tokens",)), "a")
    assert not any("deltatune" in n for n, _ in tiny.model.named_modules())
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
    assert all(p.requires_grad for p in tiny.model.parameters())


# --- 2. merge == unmerged forward; unmerge restores -----------------------------------------------------
@pytest.mark.parametrize("case,option", MATRIX)
def test_merge_equals_unmerged_and_unmerge_restores(case: str, option: str) -> None:
    tiny, cfg = setup(case, option)
    model = tiny.model
    randomize(model, "a")
    w0 = base_params(model)
    y_plain = tiny.logits(tiny.fresh())
    y = tiny.logits()
    assert (y - y_plain).abs().max() > 1e-3, "randomised delta should change the logits"
    torch.testing.assert_close(tiny.logits(grad=True).detach(), y, atol=1e-5, rtol=0)  # autograd == in-place path
    torch.testing.assert_close(y, tiny.logits(reference_model(tiny, cfg, model, ["a"])), atol=1e-5, rtol=0)
    dt.merge(model)
    assert dt.summary(model)["a"].merged
    torch.testing.assert_close(tiny.logits(), y, atol=1e-5, rtol=0)
    dt.unmerge(model)
    for k, v in base_params(model).items():
        torch.testing.assert_close(v, w0[k], atol=1e-6, rtol=0, msg=f"unmerge left {k} changed")
    torch.testing.assert_close(tiny.logits(), y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case,option", [m for m in MATRIX if m.values[1] == "dora"])
def test_dora_merge_unmerge_cycles_are_stable(case: str, option: str) -> None:
    tiny, _ = setup(case, option)
    randomize(tiny.model, "a")
    w0 = base_params(tiny.model)
    y = tiny.logits()
    for _ in range(3):
        dt.merge(tiny.model)
        dt.unmerge(tiny.model)
    for k, v in base_params(tiny.model).items():
        torch.testing.assert_close(v, w0[k], atol=1e-5, rtol=0)
    torch.testing.assert_close(tiny.logits(), y, atol=1e-5, rtol=0)


# --- 3. save -> load ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case,option", MATRIX)
def test_save_load_roundtrip(case: str, option: str, tmp_path) -> None:
    tiny, cfg = setup(case, option)
    randomize(tiny.model, "a")
    y = tiny.logits()
    dt.save(tiny.model, tmp_path / "d", name="a")

    d = dt.Delta.read(tmp_path / "d")
    assert d.config == cfg
    assert d.name == "a"
    live = {path: piece.state_dict() for path, _, piece in pieces(tiny.model, "a")}
    assert set(d.state) == set(live)
    for path, st in live.items():
        assert set(d.state[path]) == set(st)
        for k, t in st.items():
            assert torch.equal(d.state[path][k], t), f"{path}.{k} changed on disk"
    if cfg.dora:
        with pytest.raises(UnsupportedError):
            d.tensors()
    else:
        modules = dict(tiny.model.named_modules())
        tensors = d.tensors()
        for path, _, piece in pieces(tiny.model, "a"):
            want = expected_dw(cfg, path, modules[path], piece)
            torch.testing.assert_close(tensors[path].to_dense(), want, atol=1e-6, rtol=0)

    fresh = tiny.fresh()
    dt.load(fresh, tmp_path / "d")
    assert dt.active_names(fresh) == ("a",)
    torch.testing.assert_close(tiny.logits(fresh), y, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in fresh.parameters()), "a loaded delta is frozen by default"


# --- 4. gradients reach only delta parameters --------------------------------------------------------------
@pytest.mark.parametrize("case,option", MATRIX)
def test_grads_only_on_delta_params(case: str, option: str) -> None:
    tiny, _ = setup(case, option)
    model = tiny.model
    randomize(model, "a")
    model.train()
    y = tiny.logits(grad=True)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    for n, p in model.named_parameters():
        if "deltatune" in n:
            continue
        assert not p.requires_grad, f"base parameter {n} is trainable"
        assert p.grad is None, f"base parameter {n} got a gradient"
    delta_params = [(f"{path}.{k}", p) for path, _, piece in pieces(model, "a") for k, p in piece.named_parameters()]
    assert delta_params
    for n, p in delta_params:
        assert p.requires_grad, n
        assert p.grad is not None and p.grad.abs().sum() > 0, f"delta parameter {n} got no gradient"


# --- 5. several active deltas: W + ΔW_a + ΔW_b ---------------------------------------------------------
@pytest.mark.parametrize("case,option", MATRIX)
def test_sum_of_two_active_deltas(case: str, option: str) -> None:
    tiny, cfg = setup(case, option)
    model = tiny.model
    torch.manual_seed(321)
    dt.attach(model, cfg, "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    dt.activate(model, ["a", "b"])
    want = tiny.logits(reference_model(tiny, cfg, model, ["a", "b"]))
    torch.testing.assert_close(tiny.logits(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(tiny.logits(grad=True).detach(), want, atol=1e-5, rtol=0)
    # each alone is the reference with only its own update
    for name in ("a", "b"):
        with dt.active(model, name):
            torch.testing.assert_close(tiny.logits(), tiny.logits(reference_model(tiny, cfg, model, [name])),
                                       atol=1e-5, rtol=0)
    # merging both at once, or one after the other, gives the same model; unmerging in any order is exact
    dt.merge(model, ["a", "b"])
    torch.testing.assert_close(tiny.logits(), want, atol=1e-5, rtol=0)
    if cfg.dora:  # a DoRA delta left running unmerged would compute from a weight holding the other one
        with pytest.raises(StateError, match="unmerge all"):
            dt.unmerge(model, "a")
        dt.unmerge(model)
    else:
        dt.unmerge(model, "a")
        torch.testing.assert_close(tiny.logits(), want, atol=1e-5, rtol=0)
        dt.unmerge(model, "b")
    torch.testing.assert_close(tiny.logits(), want, atol=1e-5, rtol=0)
    if cfg.dora:
        return
    dt.merge(model, "b")
    torch.testing.assert_close(tiny.logits(), want, atol=1e-5, rtol=0)
    dt.merge(model, "a")
    torch.testing.assert_close(tiny.logits(), want, atol=1e-5, rtol=0)
    dt.unmerge(model, "b")  # not the newest: still exact
    torch.testing.assert_close(tiny.logits(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("order", ["together", "dora-first", "dora-first-unmerge-lora"])
def test_merge_next_to_dora_keeps_sum_semantics(order: str) -> None:
    """DoRA's update depends on W: every merge computes it against the weight without merged deltas."""
    tiny = build_tiny("mlp")
    model = tiny.model
    dt.attach(model, dt.LoRA(r=2, bias="lora_only"), "a")
    dt.attach(model, dt.LoRA(r=2, dora=True), "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    dt.activate(model, ["a", "b"])
    want = tiny.logits()
    if order == "together":
        dt.merge(model, ["a", "b"])
    else:
        dt.merge(model, "b")
        dt.merge(model, "a")
        with pytest.raises(StateError, match="unmerge all"):
            dt.unmerge(model, "b")  # DoRA would run unmerged on a weight that holds "a"
        if order == "dora-first-unmerge-lora":
            dt.unmerge(model, "a")
    torch.testing.assert_close(tiny.logits(), want, atol=1e-5, rtol=0)
    dt.unmerge(model)
    torch.testing.assert_close(tiny.logits(), want, atol=1e-5, rtol=0)
    with dt.active(model, None):
        torch.testing.assert_close(tiny.logits(), tiny.logits(tiny.fresh()), atol=1e-6, rtol=0)


def test_merging_under_an_active_dora_is_refused() -> None:
    """Merging only the LoRA would change the weight the still-running DoRA delta computes from."""
    tiny = build_tiny("mlp")
    model = tiny.model
    dt.attach(model, dt.LoRA(r=2), "a")
    dt.attach(model, dt.LoRA(r=2, dora=True), "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    dt.activate(model, ["a", "b"])
    want = tiny.logits()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(StateError, match="'b'"):
        dt.merge(model, "a")
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    torch.testing.assert_close(tiny.logits(), want, atol=0, rtol=0)


def test_sum_lora_plus_dora_by_formula() -> None:
    tiny = build_tiny("gpt2")
    model = tiny.model
    lora, dora = dt.LoRA(r=2, alpha=4, bias="lora_only"), dt.LoRA(r=3, alpha=6, dora=True)
    dt.attach(model, lora, "a")
    dt.attach(model, dora, "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    dt.activate(model, ["a", "b"])
    ref = tiny.fresh()
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for name, cfg in (("a", lora), ("b", dora)):
            for path, module, piece in pieces(model, name):
                mods[path].weight.add_(to_native(module, expected_dw(cfg, path, module, piece)))
                if hasattr(piece, "bias"):
                    mods[path].bias.add_(piece.bias)
    torch.testing.assert_close(tiny.logits(), tiny.logits(ref), atol=1e-5, rtol=0)
    torch.testing.assert_close(tiny.logits(grad=True).detach(), tiny.logits(ref), atol=1e-5, rtol=0)


# --- 6. the LoRA autograd function ---------------------------------------------------------------------
def _formula(x: Tensor, acc: Tensor, a: Tensor, b: Tensor, s: float, mask: Tensor | None = None) -> Tensor:
    xd = x if mask is None else x * mask
    return acc + s * (xd @ a.t()) @ b.t()


def test_lora_function_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    acc = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(2, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: LoRAFunction.apply(*t, 1.7, 0.0), (x, acc, a, b))


@pytest.mark.parametrize("needs", ["all", "no_x", "only_b"])
def test_lora_function_matches_autograd_without_dropout(needs: str) -> None:
    g = torch.Generator().manual_seed(1)
    x0, acc0 = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 5, generator=g)
    a0, b0 = torch.randn(3, 6, generator=g), torch.randn(5, 3, generator=g)
    gout = torch.randn(3, 4, 5, generator=g)
    flags = {"all": (True, True, True, True), "no_x": (False, True, True, True), "only_b": (False, False, False, True)}[needs]
    ins1 = [t.clone().requires_grad_(f) for t, f in zip((x0, acc0, a0, b0), flags)]
    ins2 = [t.clone().requires_grad_(f) for t, f in zip((x0, acc0, a0, b0), flags)]
    y1 = LoRAFunction.apply(*ins1, 0.5, 0.0)
    y2 = _formula(*ins2, 0.5)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    y1.backward(gout)
    y2.backward(gout)
    for t1, t2 in zip(ins1, ins2):
        if t2.requires_grad:
            torch.testing.assert_close(t1.grad, t2.grad, atol=1e-5, rtol=1e-5)
        else:
            assert t1.grad is None


def test_lora_function_dropout_backward_uses_forward_mask() -> None:
    """Recover the mask with A = B = I (so out − acc = x ⊙ mask), then rerun with real A, B from the same RNG
    state: forward and every gradient must match plain autograd on the formula with that mask."""
    p, s, n, d = 0.4, 0.7, 64, 6
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, n // 4, d, generator=g).abs() + 0.1  # no zeros: the mask is recoverable
    acc0 = torch.randn(4, n // 4, d, generator=g)

    torch.manual_seed(99)
    out = LoRAFunction.apply(x0, acc0, torch.eye(d), torch.eye(d), 1.0, p)
    mask = (out - acc0) / x0
    keep = 1.0 / (1.0 - p)
    assert torch.all((mask.abs() < 1e-5) | ((mask - keep).abs() < 1e-4)), "mask values must be 0 or 1/(1-p)"
    mask = torch.where(mask.abs() < 1e-5, 0.0, keep)
    frac = float((mask > 0).float().mean())
    assert 0.35 < frac < 0.85 and 0 < (mask == 0).sum(), f"kept fraction {frac} is not near 1-p"

    a0, b0 = torch.randn(3, d, generator=g), torch.randn(5, 3, generator=g)
    acc5 = torch.randn(4, n // 4, 5, generator=g)
    gout = torch.randn(4, n // 4, 5, generator=g)
    ins1 = [t.clone().requires_grad_() for t in (x0, acc5, a0, b0)]
    ins2 = [t.clone().requires_grad_() for t in (x0, acc5, a0, b0)]
    torch.manual_seed(99)
    y1 = LoRAFunction.apply(*ins1, s, p)
    torch.manual_seed(12345)  # backward must not depend on the global RNG state
    y2 = _formula(*ins2, s, mask)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    y1.backward(gout)
    y2.backward(gout)
    for t1, t2, what in zip(ins1, ins2, ("x", "acc", "A", "B")):
        torch.testing.assert_close(t1.grad, t2.grad, atol=1e-5, rtol=1e-5, msg=f"grad of {what}")
    # the documented identity: dL/dA = (g B s)ᵀ (x ⊙ mask)
    g2, x2, m2 = gout.reshape(-1, 5), x0.reshape(-1, d), mask.reshape(-1, d)
    torch.testing.assert_close(ins1[2].grad, (g2 @ b0 * s).t() @ (x2 * m2), atol=1e-5, rtol=1e-5)


def test_piece_dropout_is_active_only_in_train_mode() -> None:
    tiny, _ = setup("linear-mlp", "dropout")
    randomize(tiny.model, "a")
    y_eval = tiny.logits(grad=True)
    tiny.model.train()
    torch.manual_seed(0)
    y1 = tiny.logits(grad=True)
    torch.manual_seed(1)
    y2 = tiny.logits(grad=True)
    assert (y1 - y_eval).abs().max() > 1e-4 and (y1 - y2).abs().max() > 1e-4
    torch.manual_seed(0)
    torch.testing.assert_close(tiny.logits(grad=True), y1, atol=0, rtol=0)  # seeded -> reproducible
    tiny.model.eval()
    torch.testing.assert_close(tiny.logits(grad=True), y_eval, atol=0, rtol=0)


# --- 7. DoRA's cached weight norm ------------------------------------------------------------------------
@pytest.fixture
def dora_counted(monkeypatch):
    from deltatune.methods.lora.lora import LoRAPiece

    calls = {"n": 0}
    original = LoRAPiece._weight_norm

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LoRAPiece, "_weight_norm", counting)
    tiny, _ = setup("conv1d-gpt2", "dora")
    randomize(tiny.model, "a")
    return tiny, calls, len(pieces(tiny.model, "a"))


def test_dora_norm_is_cached_and_recomputed_after_in_place_change(dora_counted) -> None:
    tiny, calls, n_pieces = dora_counted
    calls["n"] = 0
    y1 = tiny.logits()
    y2 = tiny.logits()
    assert calls["n"] == n_pieces, "two no_grad forwards must compute each norm once"
    assert torch.equal(y1, y2)
    with torch.no_grad():  # what an optimizer step does
        for _, _, piece in pieces(tiny.model, "a"):
            piece.lora_B.add_(0.1)
    calls["n"] = 0
    y3 = tiny.logits()
    assert calls["n"] == n_pieces, "changing lora_B in place must trigger a recomputation"
    assert (y3 - y1).abs().max() > 1e-3
    torch.testing.assert_close(y3, tiny.logits(grad=True).detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(y3, tiny.logits(reference_model(tiny, make_cfg("conv1d-gpt2", "dora"), tiny.model, ["a"])),
                               atol=1e-5, rtol=0)


def test_dora_norm_cache_follows_base_weight_changes(dora_counted) -> None:
    tiny, calls, n_pieces = dora_counted
    y1 = tiny.logits()
    with torch.no_grad():
        w = tiny.model.transformer.h[1].mlp.c_fc.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    y2 = tiny.logits()
    assert (y2 - y1).abs().max() > 1e-3
    torch.testing.assert_close(y2, tiny.logits(grad=True).detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("opt", ["sgd", "adamw-foreach", "adamw-fused"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dora_norm_cache_after_optimizer_step(dora_counted, opt: str, mode: str) -> None:
    """Fused optimizers (the HF Trainer default) update parameters without bumping their version counter."""
    tiny, _, _ = dora_counted
    model = tiny.model
    tiny.logits()  # warm the cache
    params = [p for p in model.parameters() if p.requires_grad]
    optim = {"sgd": lambda: torch.optim.SGD(params, lr=10.0),
             "adamw-foreach": lambda: torch.optim.AdamW(params, lr=0.1, foreach=True),
             "adamw-fused": lambda: torch.optim.AdamW(params, lr=0.1, fused=True)}[opt]()
    model.train(mode == "train")
    before = tiny.logits()
    tiny.logits(grad=True)[..., :8].sum().backward()
    optim.step()
    model.eval()
    y = tiny.logits()
    assert (y - before).abs().max() > 1e-3
    torch.testing.assert_close(y, tiny.logits(grad=True).detach(), atol=1e-5, rtol=0)


# --- 8. detach / unload restore the plain model -----------------------------------------------------------
def _assert_plain(model: nn.Module, keys: list[str], flags: dict[str, bool]) -> None:
    assert list(model.state_dict()) == keys
    assert not any("deltatune" in n for n, _ in model.named_modules())
    for n, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hook left on {n!r}"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert dt.active_names(model) == ()
    with pytest.raises(StateError):
        dt.activate(model, None)


def _prepare_flags(model: nn.Module) -> dict[str, bool]:
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 3 != 0)  # a mix, so restoring "all True" would be caught
    return {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", ["linear-llama", "conv1d-gpt2", "embedding-llama", "linear-bert"])
@pytest.mark.parametrize("how", ["detach", "unload", "unload-merged-first", "unload-merge_active", "merge_and_unload"])
def test_detach_and_unload_restore(case: str, how: str) -> None:
    tiny = build_tiny(CASES[case][0])
    model = tiny.model
    keys, flags = list(model.state_dict()), _prepare_flags(model)
    w0 = base_params(model)
    y0 = tiny.logits()
    option = "plain" if case.startswith("embedding") else "dora-rslora-bias-dropout"
    cfg_a, cfg_b = make_cfg(case, option), make_cfg(case, "plain")
    dt.attach(model, cfg_a, "a")
    dt.attach(model, cfg_b, "b")
    randomize(model, "a", 1)
    randomize(model, "b", 2)
    dt.activate(model, "a")
    y_a = tiny.logits()
    ref_a = reference_model(tiny, cfg_a, model, ["a"])

    if how == "detach":
        dt.detach(model, "b")
        torch.testing.assert_close(tiny.logits(), y_a, atol=1e-6, rtol=0)
        dt.merge(model, "a")
        dt.detach(model, "a")  # unmerges first
        y_end = y0
    elif how == "unload":
        y_end = y0
        dt.unload(model)
    elif how == "unload-merged-first":  # merged deltas stay in the weights, as with peft's merge_adapter + unload
        dt.merge(model, "a")
        dt.unload(model)
        y_end = y_a
        for k, v in base_params(model).items():
            torch.testing.assert_close(v, dict(ref_a.named_parameters())[k], atol=1e-6, rtol=0)
    elif how == "merge_and_unload":
        dt.merge_and_unload(model)
        y_end = y_a
        for k, v in base_params(model).items():
            torch.testing.assert_close(v, dict(ref_a.named_parameters())[k], atol=1e-6, rtol=0)
    else:
        dt.unload(model, merge_active=True)
        y_end = y_a
        torch.testing.assert_close(tiny.logits(), tiny.logits(ref_a), atol=1e-5, rtol=0)
        for k, v in base_params(model).items():
            torch.testing.assert_close(v, dict(ref_a.named_parameters())[k], atol=1e-6, rtol=0)
    _assert_plain(model, keys, flags)
    torch.testing.assert_close(tiny.logits(), y_end, atol=1e-5, rtol=0)
    if how in ("detach", "unload"):
        for k, v in base_params(model).items():
            torch.testing.assert_close(v, w0[k], atol=1e-6, rtol=0)
    # the plain model takes a new delta again
    dt.attach(model, dt.LoRA(r=2, targets=CASES[case][1].get("targets", "all-linear")), "c")
    torch.testing.assert_close(tiny.logits(), y_end, atol=1e-5, rtol=0)


# --- 9. dt.active(model, None) ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["linear-llama", "conv1d-gpt2", "embedding-llama"])
def test_active_none_gives_base_and_restores(case: str) -> None:
    tiny = build_tiny(CASES[case][0])
    y0 = tiny.logits()
    cfg = make_cfg(case, "plain")
    dt.attach(tiny.model, cfg, "a")
    dt.attach(tiny.model, cfg, "b")
    randomize(tiny.model, "a", 1)
    randomize(tiny.model, "b", 2)
    dt.activate(tiny.model, ["a", "b"])
    y_ab = tiny.logits()
    with dt.active(tiny.model, None):
        assert dt.active_names(tiny.model) == ()
        torch.testing.assert_close(tiny.logits(), y0, atol=1e-6, rtol=0)
    assert dt.active_names(tiny.model) == ("a", "b")
    torch.testing.assert_close(tiny.logits(), y_ab, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="boom"), dt.active(tiny.model, "b"):
        raise RuntimeError("boom")
    assert dt.active_names(tiny.model) == ("a", "b")
    torch.testing.assert_close(tiny.logits(), y_ab, atol=0, rtol=0)


def test_active_none_while_merged_gives_base() -> None:
    tiny, _ = setup("linear-llama", "plain")
    randomize(tiny.model, "a")
    y0, y_a = tiny.logits(tiny.fresh()), tiny.logits()
    dt.merge(tiny.model)
    with dt.active(tiny.model, None):
        torch.testing.assert_close(tiny.logits(), y0, atol=1e-5, rtol=0)
    torch.testing.assert_close(tiny.logits(), y_a, atol=1e-5, rtol=0)


def test_attaching_new_active_delta_while_another_is_merged() -> None:
    tiny, cfg = setup("linear-llama", "plain")
    randomize(tiny.model, "a")
    dt.merge(tiny.model)
    dt.attach(tiny.model, cfg, "b")  # becomes the only active delta: "a" must no longer act
    randomize(tiny.model, "b", 3)
    want = tiny.logits(reference_model(tiny, cfg, tiny.model, ["b"]))
    torch.testing.assert_close(tiny.logits(), want, atol=1e-5, rtol=0)


# --- 10. LoRA+ parameter groups ---------------------------------------------------------------------------
@pytest.mark.parametrize("case,option", [pytest.param(c, o, id=f"{c}-{o}") for c in ("linear-bert", "conv1d-gpt2", "embedding-llama")
                                         for o in ("plain", "dora-rslora-bias-dropout", "pissa")
                                         if not (c.startswith("embedding") and _is_dora(o))])
def test_param_groups_lora_plus(case: str, option: str) -> None:
    tiny, _ = setup(case, option)
    model = tiny.model
    groups = dt.param_groups(model, 1e-3, lr_ratio=16)
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    slow, fast = ({id(p) for p in g["params"]} for g in groups)
    ps = pieces(model, "a")
    assert fast == {id(piece.lora_B) for _, _, piece in ps}
    others = {id(p) for _, _, piece in ps for n, p in piece.named_parameters() if n != "lora_B"}
    assert slow == others
    assert not (slow | fast) & {id(p) for n, p in model.named_parameters() if "deltatune" not in n}
    single = dt.param_groups(model, 1e-3)
    assert len(single) == 1 and {id(p) for p in single[0]["params"]} == slow | fast


# --- 11. summary counts ------------------------------------------------------------------------------
@pytest.mark.parametrize("case,option", MATRIX)
def test_summary_counts(case: str, option: str) -> None:
    tiny = build_tiny(CASES[case][0])
    n_base = sum(p.numel() for p in tiny.model.parameters())
    cfg = make_cfg(case, option)
    dt.attach(tiny.model, cfg, "a")
    want, n_modules = 0, 0
    for path, module in tiny.model.named_modules():
        slot = module._modules.get("deltatune")
        if slot is None:
            continue
        n_modules += 1
        out_f, in_f = weight_view(module).shape
        r, _ = resolved(cfg, path)
        want += r * (in_f + out_f)
        want += out_f if cfg.dora else 0
        want += out_f if cfg.bias == "lora_only" and getattr(module, "bias", None) is not None else 0
    assert n_modules == N_TARGETS[case]
    row = dt.summary(tiny.model)["a"]
    assert (row.modules, row.params, row.trainable) == (n_modules, want, want)
    assert dt.summary(tiny.model).base_params == n_base


def test_merge_refuses_tied_embedding_and_leaves_model_intact() -> None:
    tiny = build_tiny("gpt2")  # wte is tied to lm_head: the hook adapts lookups only, a merge would hit both
    model = tiny.model
    dt.attach(model, dt.LoRA(r=2, targets=("wte",)), "a")
    randomize(model, "a")
    w0, y = base_params(model), tiny.logits()
    with pytest.raises(UnsupportedError, match="tied|shared"):
        dt.merge(model)
    with pytest.raises(UnsupportedError, match="tied|shared"):
        dt.unload(model, merge_active=True)
    assert all(torch.equal(v, w0[k]) for k, v in base_params(model).items())
    assert dt.summary(model)["a"].merged is False
    torch.testing.assert_close(tiny.logits(), y, atol=0, rtol=0)


def test_merge_that_fails_midway_takes_back_what_it_added(monkeypatch) -> None:
    """All or nothing: an error while merging the third module leaves every weight as before."""
    from deltatune.runtime import DeltaSlot

    tiny = build_tiny("llama")
    model = tiny.model
    dt.attach(model, dt.LoRA(r=2), "a")
    randomize(model, "a", seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = {"n": 0}
    orig = DeltaSlot.merge_pieces

    def flaky(self, module, names, known=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return orig(self, module, names, known)

    monkeypatch.setattr(DeltaSlot, "merge_pieces", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        dt.merge(model, "a")
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)
    assert dt.active_names(model) == ("a",)
    monkeypatch.setattr(DeltaSlot, "merge_pieces", orig)
    dt.merge(model, "a")
    dt.unmerge(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)
