"""The Piece contract: declarations are checked when a class is defined, and a mergeable method's one `update` gives
the same (ΔW, Δb) attached (`delta_weight` / `delta_bias`) and detached (`Delta.tensors(base=)` / `biases(base=)`)."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune.core.errors import UnsupportedError
from deltatune.core.piece import Piece
from deltatune.methods.ia3 import IA3InputPiece, IA3Piece
from deltatune.methods.lora.lora import DoRAPiece, LoRAPiece

from conftest import Tiny, build_tiny_with_biases, module_pieces, randomize_delta


# --- declarations are checked at class definition --------------------------------------------------------------------
def _forward(self, x, base_out, acc, base):  # noqa: ANN001, ANN202
    return acc


def test_mergeable_without_update_is_refused() -> None:
    with pytest.raises(TypeError, match="NoUpdate declares mergeable = True but defines no update"):
        type("NoUpdate", (Piece,), {"mergeable": True, "forward": _forward})


def test_low_rank_and_needs_base_together_are_refused() -> None:
    def update(cls, state, cfg, layout, weight=None, bias=None):  # noqa: ANN001, ANN202
        return None, None

    with pytest.raises(TypeError, match="Both declares low_rank and needs_base"):
        type("Both", (Piece,), {"mergeable": True, "low_rank": True, "needs_base": True, "forward": _forward,
                                "update": classmethod(update)})


def test_fuses_without_fuse_is_refused() -> None:
    with pytest.raises(TypeError, match="NoFuse declares fuses = True but defines no fuse"):
        type("NoFuse", (Piece,), {"fuses": True, "forward": _forward})


@pytest.mark.parametrize("flag", ["needs_base", "needs_shape", "low_rank"])
def test_update_flags_without_mergeable_are_refused(flag: str) -> None:
    with pytest.raises(TypeError, match="declare mergeable = True"):
        type("NotMergeable", (Piece,), {flag: True, "forward": _forward})


def test_unknown_position_is_refused() -> None:
    with pytest.raises(TypeError, match="position must be one of"):
        type("Elsewhere", (Piece,), {"position": "nowhere", "forward": _forward})


def test_config_dependent_piece_classes() -> None:
    """DoRA and (IA)3's two positions are their own classes, chosen by the (resolved) config."""
    assert dt.LoRA().piece_class() is LoRAPiece and dt.LoRA(dora=True).piece_class() is DoRAPiece
    assert DoRAPiece.needs_base and not DoRAPiece.low_rank and "Embedding" not in DoRAPiece.supported
    assert LoRAPiece.low_rank and not LoRAPiece.needs_base
    cfg = dt.IA3()
    assert cfg.for_module("model.layers.0.mlp.down_proj").piece_class() is IA3InputPiece
    assert cfg.for_module("model.layers.0.self_attn.k_proj").piece_class() is IA3Piece
    assert (IA3InputPiece.position, IA3Piece.position) == ("input", "output")


# --- every registered kind: one update, attached and detached -----------------------------------------------------
FULL_PATH = "transformer.h.0.attn.c_attn"

def _ternary(model: nn.Module) -> None:
    """A ternary delta attached fresh is zero (scale 0): give it a scale, so its update is ±0.5 on its mask."""
    dt.attach(model, dt.Ternary(k=3, bias=True), "d")
    with torch.no_grad():
        for _, piece in module_pieces(model, "d").values():
            piece.scale.fill_(0.5)


# kind -> (tiny model, builder(model) attaching delta "d"): the built-in kinds (the capability matrix takes every
# registered kind from the registry)
KINDS: dict[str, tuple[str, Callable[[nn.Module], None]]] = {
    "lora": ("gpt2", lambda m: dt.attach(m, dt.LoRA(r=2, bias="lora_only"), "d")),
    "dense": ("gpt2", lambda m: dt.attach(m, dt.Dense(bias=True), "d")),
    "sparse": ("gpt2", lambda m: dt.attach(m, dt.Sparse(k=5, bias=True), "d")),
    "paca": ("gpt2", lambda m: dt.attach(m, dt.PaCA(r=2, bias=True), "d")),
    "ternary": ("gpt2", lambda m: _ternary(m)),
    "full": ("gpt2", lambda m: dt.attach(m, dt.Full(targets=(FULL_PATH,)), "d")),
    "ia3": ("llama", lambda m: dt.attach(m, dt.IA3(), "d")),
    "ssf": ("gpt2", lambda m: dt.attach(m, dt.SSF(), "d")),
    "bitfit": ("gpt2", lambda m: dt.attach(m, dt.BitFit(), "d")),
    "ln_tuning": ("gpt2", lambda m: dt.attach(m, dt.LNTuning(), "d")),
    "loha": ("gpt2", lambda m: dt.attach(m, dt.LoHa(r=2), "d")),
    "lokr": ("gpt2", lambda m: dt.attach(m, dt.LoKr(r=2), "d")),
    "sorsa": ("gpt2", lambda m: dt.attach(m, dt.SORSA(r=2), "d")),
    "vera": ("gpt2", lambda m: dt.attach(m, dt.VeRA(r=4), "d")),
    "lora_xs": ("gpt2", lambda m: dt.attach(m, dt.LoRAXS(r=2), "d")),
    "randlora": ("gpt2", lambda m: dt.attach(m, dt.RandLoRA(r=4), "d")),
    "adalora": ("gpt2", lambda m: dt.attach(m, dt.AdaLoRA(init_r=4, target_r=2), "d")),
    "poly": ("gpt2", lambda m: dt.attach(m, dt.Poly(r=2, n_skills=2, n_tasks=2), "d")),
    "prompt": ("llama", lambda m: dt.attach(m, dt.PromptTuning(n_tokens=2), "d")),
    "prefix": ("llama", lambda m: dt.attach(m, dt.PrefixTuning(n_tokens=2), "d")),
    "houlsby": ("gpt2", lambda m: dt.attach(m, dt.Houlsby(), "d")),
    "pfeiffer": ("gpt2", lambda m: dt.attach(m, dt.Pfeiffer(), "d")),
    "parallel_adapter": ("gpt2", lambda m: dt.attach(m, dt.ParallelAdapter(), "d")),
    "adaptformer": ("gpt2", lambda m: dt.attach(m, dt.AdaptFormer(), "d")),
    "fusion": ("gpt2", lambda m: (dt.attach(m, dt.Pfeiffer(), "a", activate=False),
                                  dt.attach(m, dt.Pfeiffer(), "b", activate=False),
                                  dt.attach(m, dt.Fusion(deltas=("a", "b")), "d", activate=False))),
}
# DoRA is a piece class of its own (LoRA with dora=True)
CASES = sorted(KINDS) + ["dora"]
KINDS["dora"] = ("gpt2", lambda m: dt.attach(m, dt.LoRA(r=2, dora=True, bias="lora_only"), "d"))


def _setup(case: str) -> tuple[Tiny, dict[str, tuple[nn.Module, Piece]]]:
    model_kind, build = KINDS[case]
    tiny = build_tiny_with_biases(model_kind)
    build(tiny.model)
    randomize_delta(tiny.model, "d", seed=3, std=0.2)
    return tiny, module_pieces(tiny.model, "d")


def _close(got: Tensor | None, want: Tensor | None) -> None:
    if want is None:
        assert got is None
    else:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_declarations_are_class_level(case: str) -> None:
    _, pieces = _setup(case)
    for module, piece in pieces.values():
        assert "position" not in vars(piece), "position is declared on the class, not set per piece"
        assert (piece.layout is None) == (type(piece).supported is None)
        if piece.low_rank:
            assert piece.mergeable and not piece.needs_base


@pytest.mark.parametrize("case", CASES)
def test_detached_update_equals_the_attached_one(case: str) -> None:
    tiny, pieces = _setup(case)
    delta = dt.Delta.from_model(tiny.model, "d")
    classes = {type(p) for _, p in pieces.values()}
    if not all(c.mergeable for c in classes):
        assert not any(c.mergeable for c in classes)
        with pytest.raises(UnsupportedError, match="not a weight update"):
            delta.tensors(base=tiny.model)
        return
    tensors, biases = delta.tensors(base=tiny.model), delta.biases(base=tiny.model)
    assert set(tensors) == set(pieces)
    assert any(t.norm() > 0 for t in tensors.values()) or any(bool(b.any()) for b in biases.values())
    for path, (module, piece) in pieces.items():
        _close(tensors[path].to_dense(), piece.delta_weight(module).to_dense())
        _close(biases.get(path), piece.delta_bias(module))
    if any(c.needs_base or c.needs_shape for c in classes):
        with pytest.raises(UnsupportedError, match="pass base="):
            delta.tensors()
    else:  # no base needed: the same without one
        for path, (module, piece) in pieces.items():
            _close(delta.update(path)[0].to_dense(), piece.delta_weight(module).to_dense())


def test_more_contradictions_fail_at_class_definition() -> None:
    import pytest as _pytest
    from deltatune.core.piece import Piece as _Piece

    with _pytest.raises(TypeError, match="keywords"):
        type("BadKeywords", (_Piece,), {"keywords": "lang", "forward": lambda self, *a: a[2]})
    with _pytest.raises(TypeError, match="supported = None"):
        type("NoView", (_Piece,), {"mergeable": True, "supported": None, "forward": lambda self, *a: a[2],
                                   "update": classmethod(lambda cls, *a, **k: (None, None))})
    with _pytest.raises(TypeError, match="classmethod"):
        type("Static", (_Piece,), {"mergeable": True, "forward": lambda self, *a: a[2],
                                   "update": staticmethod(lambda *a, **k: (None, None))})


def test_none_means_none_for_modules_to_save_and_feedforward() -> None:
    import deltatune as _dt

    assert _dt.LoRA(modules_to_save=None).modules_to_save == ()
    assert _dt.DeltaConfig.from_dict({"kind": "lora", "modules_to_save": None}).modules_to_save == ()
    assert _dt.IA3(feedforward=None).scales_input("model.layers.0.mlp.down_proj") is False


def test_merge_computes_each_update_once(monkeypatch) -> None:
    """The merge's checks (a Δb on a module without bias) and the merge itself share one computation."""
    import deltatune as _dt
    from deltatune.core.piece import Piece as _Piece
    from conftest import build_tiny as _build

    tiny = _build("llama")
    _dt.attach(tiny.model, _dt.LoRA(r=2, dora=True, targets=("q_proj",)), "d")
    calls = []
    original = _Piece.live_update

    def counting(self, *args, **kwargs):
        calls.append(self.path)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(_Piece, "live_update", counting)
    _dt.merge(tiny.model)
    assert sorted(calls) == sorted(set(calls))  # once per module
