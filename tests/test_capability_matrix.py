"""The capability matrix: every registered delta kind against what its pieces declare (core/piece.py).

The kinds come from the registry (`deltatune.core.config._REGISTRY`), not from a list here: registering a method
puts it in every row below. What a check expects is read from the declarations of the kind's pieces — `position`,
`mergeable`, `fuses`, `keywords` — and from the config (`follows`, and `example()` for a small valid instance).

    identity at init     pieces at the input / weight / output position (the ones a block runs at a module);
                         attention-position pieces add keys, values or tokens, fusion layers run only under Fuse
    save -> load         dt.save / dt.load into an untouched copy: equal logits, after randomising the delta
    gradients            reach the delta's own parameters and nothing else (kinds without parameters: none)
    merge                mergeable kinds: merged == unmerged, and unmerge restores the base weights
    Sum with a LoRA      at one module where both act, per position (docs/composition.md): weight pieces add
                         their changes, output pieces act on the value after every weight piece, input pieces
                         on the module's input, which the weight pieces then see
    detached update      mergeable kinds: Delta.from_model(...).tensors(base=model) equals the live delta_weight

Each kind runs on the first tiny model (llama, gpt2, bert; non-zero biases) that its example config fits; one that
fits none fails with each model's reason.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.compose.blocks import POSITIONS as BLOCK_POSITIONS
from deltatune.core.config import _REGISTRY, DeltaConfig
from deltatune.core.errors import TargetError
from deltatune.core.layouts import layout_of
from deltatune.core.targeting import linear_types
from deltatune.io.delta import Delta

from conftest import Tiny, build_tiny_with_biases, module_pieces, randomize_delta

KINDS = sorted(_REGISTRY)  # `import deltatune` imported every module of deltatune.methods (discovery)
MODELS = ("llama", "gpt2", "bert")
NAME = "d"
ATOL = 1e-5

#: values for the per-call keywords pieces declare (Piece.keywords), by keyword
KEYWORD_VALUES: dict[str, Callable[[Tiny], Any]] = {
    "task_ids": lambda tiny: torch.zeros(_batch_size(tiny), dtype=torch.long),  # task 0 exists for any n_tasks
}


def _batch_size(tiny: Tiny) -> int:
    return next(iter(tiny.inputs.values())).shape[0]


def example(cls: type[DeltaConfig]) -> DeltaConfig:
    """A small valid config of `cls`: its `example()` hook (default: the defaults)."""
    make = getattr(cls, "example", None)
    return make() if make is not None else cls()


@dataclass
class Case:
    """One kind attached as NAME to a tiny model, with what running it needs."""

    tiny: Tiny
    cfg: DeltaConfig
    block: Any                   # what to activate: NAME, or a Fuse over the deltas a fusion layer follows
    keywords: dict[str, Any]     # per-call keyword values its pieces read

    @property
    def model(self) -> nn.Module:
        return self.tiny.model

    def pieces(self, name: str = NAME) -> dict[str, tuple[nn.Module, nn.Module]]:
        return module_pieces(self.model, name)

    @contextmanager
    def calls(self) -> Iterator[None]:
        with dt.batch(**self.keywords):
            yield

    def logits(self, model: nn.Module | None = None, grad: bool = False) -> torch.Tensor:
        with self.calls():
            return self.tiny.logits(model, grad=grad)


def randomize(model: nn.Module, name: str, seed: int = 0, std: float = 0.3) -> None:
    """Random parameters, so every check can fail; a delta without parameters keeps its update in buffers (a
    stored ternary ΔW's scale): then its floating-point buffers get positive noise."""
    pieces = [piece for _, piece in module_pieces(model, name).values()]
    if any(True for piece in pieces for _ in piece.parameters()):
        randomize_delta(model, name, seed=seed, std=std)
        return
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for piece in pieces:
            for b in piece.buffers():
                if b.is_floating_point():
                    b.add_(torch.randn(b.shape, generator=g).abs().to(b.device, b.dtype) * std)


def attach_followed(model: nn.Module, cfg: DeltaConfig, seed: int = 10) -> None:
    """The deltas a config goes on (a fusion layer's): small LoRAs, frozen and randomised."""
    for i, name in enumerate(cfg.follows()):
        dt.attach(model, dt.LoRA(r=2), name=name, activate=False, trainable=False)
        randomize(model, name, seed=seed + i)


def make_case(kind: str, fits: Callable[[Case], str | None] | None = None) -> Case:
    """Kind `kind` attached as NAME (from its example config) to the first tiny model it fits, active. `fits` may
    turn a model down for one check (it returns the reason); the check is skipped if every model is turned down."""
    cls = _REGISTRY[kind]
    cfg = example(cls)
    reasons, turned_down = [], False
    for model_kind in MODELS:
        tiny = build_tiny_with_biases(model_kind)
        attach_followed(tiny.model, cfg)
        try:
            dt.attach(tiny.model, cfg, name=NAME)
        except TargetError as e:  # the method adapts no module of this model (BitFit on bias-free Llama, ...)
            reasons.append(f"{model_kind}: {e}")
            continue
        pieces = [piece for _, piece in module_pieces(tiny.model, NAME).values()]
        block = dt.Fuse(*cfg.follows(), fusion=NAME) if any(p.fuses for p in pieces) else NAME
        dt.activate(tiny.model, block)
        wanted = sorted({k for p in pieces for k in p.keywords})
        unknown = [k for k in wanted if k not in KEYWORD_VALUES]
        if unknown:
            pytest.fail(f"{kind}'s pieces read per-call keyword(s) {unknown}; add a value for each to KEYWORD_VALUES "
                        f"in {__file__}")
        case = Case(tiny, cfg, block, {k: KEYWORD_VALUES[k](tiny) for k in wanted})
        reason = fits(case) if fits is not None else None
        if reason is None:
            return case
        reasons.append(f"{model_kind}: {reason}")
        turned_down = True
    if turned_down:
        pytest.skip(f"{kind} fits no tiny model for this check: " + "; ".join(reasons))
    pytest.fail(f"{kind}: {cls.__name__}'s example config {cfg!r} fits none of the tiny models:\n" + "\n".join(reasons))


def piece_classes(case: Case) -> list[type]:
    return sorted({type(p) for _, p in case.pieces().values()}, key=lambda c: c.__name__)


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if ".deltatune." not in k}


def mergeable_here(case: Case) -> str | None:
    """None if the kind is a weight update that can be merged into this model, else why not (a Δb needs a bias
    parameter to go into: SSF's shift on a bias-free Llama projection runs unmerged)."""
    classes = piece_classes(case)
    if not any(c.mergeable for c in classes):
        pytest.skip(f"{[c.__name__ for c in classes]} declare mergeable = False: not a weight update")
    assert all(c.mergeable for c in classes), f"some pieces of one kind are mergeable, some not: {classes}"
    for path, (module, piece) in case.pieces().items():
        if getattr(module, "bias", None) is None and piece.delta_bias(module) is not None:
            return f"{type(piece).__name__} at {path!r} changes a bias the module does not have"
    return None


# --- identity at init --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init(kind: str) -> None:
    case = make_case(kind)
    other = sorted({p.position for _, p in case.pieces().values()} - set(BLOCK_POSITIONS))
    if other:
        pytest.skip(f"pieces at the {other} position: extra keys/values or tokens (attention), or a fusion layer "
                    f"run only under Fuse — not the identity at init by design")
    torch.testing.assert_close(case.logits(), case.logits(case.tiny.fresh()), atol=ATOL, rtol=0)


# --- save -> load --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_gives_equal_logits(kind: str, tmp_path) -> None:
    case = make_case(kind)
    randomize(case.model, NAME)
    want = case.logits()
    fresh = case.tiny.fresh()
    for name in case.cfg.follows():  # a fusion layer loads onto the deltas it fuses
        dt.save(case.model, tmp_path / name, name=name)
        dt.load(fresh, tmp_path / name, activate=False)
    dt.save(case.model, tmp_path / NAME, name=NAME)
    dt.load(fresh, tmp_path / NAME)
    dt.activate(fresh, case.block)
    assert Delta.read(tmp_path / NAME).config.kind == kind
    torch.testing.assert_close(case.logits(fresh), want, atol=1e-6, rtol=0)


# --- gradients -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_only_the_delta(kind: str) -> None:
    case = make_case(kind)
    own = {f"{path}.deltatune.{NAME}.{n}" for path, (_, piece) in case.pieces().items()
           for n, _ in piece.named_parameters()}
    if not own:
        assert not any(p.requires_grad for p in case.model.parameters()), "no delta parameters, yet something trains"
        pytest.skip(f"{kind} has no parameters (a stored update): nothing to train")
    randomize(case.model, NAME)  # off the init, where some factors get no gradient (LoRA's A while B = 0)
    case.model.train()
    case.logits(grad=True).float().pow(2).mean().backward()
    grads = {name: p.grad for name, p in case.model.named_parameters()}
    stray = [name for name, g in grads.items() if name not in own and g is not None]
    missing = [name for name in own if grads[name] is None]
    assert not stray, f"parameters outside delta {NAME!r} got gradients: {stray[:5]}"
    assert not missing, f"delta parameters the gradient does not reach: {missing[:5]}"
    # not every entry need be non-zero (a saturated softmax, a dead ReLU unit, Fusion's b_k, which shifts every
    # candidate's score alike), but the delta as a whole must learn something
    assert sum(float(grads[name].abs().sum()) for name in own) > 0, "every delta gradient is zero"


# --- merge -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_merged_equals_unmerged_and_unmerge_restores(kind: str) -> None:
    case = make_case(kind, fits=mergeable_here)
    randomize(case.model, NAME)
    w0, want = base_weights(case.model), case.logits()
    dt.merge(case.model, NAME)
    merged = base_weights(case.model)
    changed = [k for k, v in merged.items() if not torch.equal(v, w0[k])]
    assert changed, "merging the randomised delta changed no weight"
    torch.testing.assert_close(case.logits(), want, atol=ATOL, rtol=0)
    dt.unmerge(case.model, NAME)
    for k, v in base_weights(case.model).items():
        # W + ΔW − ΔW is W up to the rounding of the merged value (a few ulp of max |W + ΔW|)
        tol = 1e-6 + 4 * torch.finfo(v.dtype).eps * float(merged[k].abs().max())
        torch.testing.assert_close(v, w0[k], atol=tol, rtol=0, msg=f"unmerge left {k} changed")
    torch.testing.assert_close(case.logits(), want, atol=ATOL, rtol=0)


# --- detached update -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_detached_update_equals_live_update(kind: str) -> None:
    case = make_case(kind)
    mergeable_here(case)  # skips kinds that are not weight updates; a Δb without a bias is fine here
    randomize(case.model, NAME)
    delta = Delta.from_model(case.model, NAME)
    tensors, biases = delta.tensors(base=case.model), delta.biases(base=case.model)
    pieces = case.pieces()
    assert set(tensors) == set(pieces)
    for path, (module, piece) in pieces.items():
        live = piece.delta_weight(module).to_dense()
        torch.testing.assert_close(tensors[path].to_dense(), live, atol=1e-6, rtol=1e-5, msg=path)
        live_b = piece.delta_bias(module)
        assert (path in biases) == (live_b is not None), path
        if live_b is not None:
            torch.testing.assert_close(biases[path], live_b, atol=1e-6, rtol=1e-5, msg=path)


# --- Sum with a LoRA, at one module ----------------------------------------------------------------------------------
def _lora_paths(model: nn.Module, path: str, position: str) -> list[str]:
    """Where the partner LoRA goes for a piece at `path`: the module itself when it is a Linear / Conv1D; for a
    weight-position piece on a block (a parallel adapter on an MLP), the Linear / Conv1D modules inside it — its
    change depends on the block's input only, so it still adds to whatever the block computes."""
    module = dict(model.named_modules())[path]
    if isinstance(module, linear_types()):
        return [path]
    if position != "weight":
        return []
    return [f"{path}.{p}" for p, m in module.named_modules() if p and ".deltatune" not in f".{p}"
            and isinstance(m, linear_types())]


def _call_args(case: Case, module: nn.Module) -> tuple[tuple, dict]:
    """The arguments `module` receives in a forward of the bare model."""
    seen: list[tuple[tuple, dict]] = []

    def record(m: nn.Module, args: tuple, kwargs: dict) -> None:
        if not seen:
            seen.append((tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args), dict(kwargs)))

    handle = module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with dt.active(case.model, None):
            case.logits()
    finally:
        handle.remove()
    return seen[0]


def _run(case: Case, module: nn.Module, block: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    """`module` alone on fixed arguments, with `block` active (its hooks and those of the modules inside it run)."""
    with dt.active(case.model, block), case.calls(), torch.no_grad():
        return module(*args, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_sum_with_lora_adds_changes_per_position(kind: str) -> None:
    case = make_case(kind)
    randomize(case.model, NAME)
    model, modules = case.model, dict(case.model.named_modules())
    first: dict[str, str] = {}
    for path, (_, piece) in case.pieces().items():
        first.setdefault(piece.position, path)
    checked = []
    for position in BLOCK_POSITIONS:
        if position not in first:
            continue
        path = first[position]
        lora_paths = _lora_paths(model, path, position)
        if not lora_paths:
            continue
        module = modules[path]
        partner = f"lora_{position}"
        dt.attach(model, dt.LoRA(r=2, alpha=2.0, targets=tuple(lora_paths)), name=partner, activate=False)
        randomize(model, partner, seed=3)
        args, kwargs = _call_args(case, module)
        y0 = _run(case, module, None, args, kwargs)
        y_lora = _run(case, module, partner, args, kwargs)
        y_own = _run(case, module, NAME, args, kwargs)
        y_sum = _run(case, module, dt.Sum(NAME, partner), args, kwargs)
        assert not torch.allclose(y_own, y0, atol=1e-6) and not torch.allclose(y_lora, y0, atol=1e-6), \
            f"a randomised delta does not change {path!r}"
        if position == "weight":  # h + (a(h) - h) + (b(h) - h), each change a function of x only
            want = y_lora + (y_own - y0)
        elif position == "output":  # g(h) of the value after the weight pieces: the base with ΔW_LoRA, then g
            want = _with_lora_weight(case, module, path, partner, args, kwargs)
        else:  # input: s(x) first, then the module with the LoRA on s(x)
            want = _run(case, module, partner, *_transformed_args(case, module, args, kwargs))
        torch.testing.assert_close(y_sum, want, atol=ATOL, rtol=0, msg=f"{position} position at {path!r}")
        checked.append(position)
        dt.detach(model, partner)
    if not checked:
        positions = sorted({p.position for _, p in case.pieces().values()})
        pytest.skip(f"no module where a LoRA and {kind} both act at the input/weight/output position "
                    f"(its pieces act at {positions} on {sorted({type(m).__name__ for m, _ in case.pieces().values()})})")


def _with_lora_weight(case: Case, module: nn.Module, path: str, partner: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """The delta alone on the module whose weight holds the partner LoRA's ΔW = s·B A, written in by hand."""
    (_, lora), = [v for p, v in module_pieces(case.model, partner).items() if p == path]
    layout = layout_of(module, path)
    dw = (lora.lora_B @ lora.lora_A * lora.scale).detach()
    w = module.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.add_(layout.to_native(dw))
    try:
        return _run(case, module, NAME, args, kwargs)
    finally:
        with torch.no_grad():
            w.copy_(saved)


def _transformed_args(case: Case, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The arguments the module body receives with the delta alone active: after its input-position pieces (a
    pre-hook registered after deltatune's sees what deltatune's returned)."""
    seen: list[tuple[tuple, dict]] = []

    def record(m: nn.Module, a: tuple, kw: dict) -> None:
        seen.append((tuple(t.detach().clone() if torch.is_tensor(t) else t for t in a), dict(kw)))

    handle = module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        _run(case, module, NAME, args, kwargs)
    finally:
        handle.remove()
    before = [t for t in (*args, *kwargs.values()) if torch.is_tensor(t)]
    after = [t for t in (*seen[0][0], *seen[0][1].values()) if torch.is_tensor(t)]
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "the input-position delta changed no argument"
    return seen[0]
