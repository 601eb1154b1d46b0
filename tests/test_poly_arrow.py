"""Poly / MHR (learned per-task routing over LoRA skills; peft as oracle) and Arrow (training-free per-token
routing by each delta's top right-singular vector; reference by hand with plain hooks)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.errors import ConfigError
from conftest import build_tiny, pieces_of, randomize_delta

ATOL = 1e-5


_pieces = pieces_of


_randomize = randomize_delta


# --- Poly / MHR -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("splits", [1, 2])
def test_poly_matches_peft(splits):
    from peft import PolyConfig, get_peft_model

    tiny = build_tiny("llama")
    targets = ["q_proj", "v_proj", "down_proj"]
    cfg = dt.Poly(r=2, n_skills=3, n_tasks=4, n_splits=splits, targets=tuple(targets))
    dt.attach(tiny.model, cfg, name="poly")
    _randomize(tiny.model, "poly", 1)
    theirs = get_peft_model(tiny.fresh(), PolyConfig(r=2, n_skills=3, n_tasks=4, n_splits=splits,
                                                     target_modules=targets)).eval()
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for path, piece in _pieces(tiny.model, "poly").items():
            pre = f"base_model.model.{path}"
            params[f"{pre}.poly_lora_A.default"].copy_(piece.poly_A)
            params[f"{pre}.poly_lora_B.default"].copy_(piece.poly_B)
            params[f"{pre}.poly_router.default.module_logits"].copy_(piece.logits)
    ids = tiny.inputs["input_ids"]
    tasks = torch.tensor([3, 1])
    with torch.no_grad():
        ours = tiny.model(input_ids=ids, task_ids=tasks).logits
        ref = theirs.base_model(input_ids=ids, task_ids=tasks).logits  # PolyModel takes task_ids
        with dt.batch(task_ids=tasks):
            ctx = tiny.model(input_ids=ids).logits
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(ctx, ours, atol=0, rtol=0)
    assert (ours - tiny.logits(tiny.fresh())).abs().max() > 1e-3  # the delta does something
    # parameter count: per module n_skills·r·(in + out) + n_tasks·n_splits·n_skills
    expect = sum(3 * 2 * (i + o) + 4 * splits * 3 for i, o in ((16, 16), (16, 8), (32, 16)) for _ in range(2))
    assert dt.summary(tiny.model)["poly"].trainable == expect == sum(p.numel() for p in theirs.parameters()
                                                                       if p.requires_grad)


def test_poly_is_identity_at_init_and_learns_task_routing():
    torch.manual_seed(0)  # the relaxed-Bernoulli routing samples in training
    tiny = build_tiny("llama")
    dt.attach(tiny.model, dt.Poly(r=2, n_skills=2, n_tasks=2, targets=("q_proj", "v_proj")), name="poly")
    ids = tiny.inputs["input_ids"]
    torch.testing.assert_close(tiny.model(input_ids=ids, task_ids=torch.tensor([0, 1])).logits.detach(),
                               tiny.logits(tiny.fresh()), atol=0, rtol=0)
    piece = next(iter(_pieces(tiny.model, "poly").values()))
    w0 = piece.mixing(torch.tensor([0, 1])).detach()
    params = [p for p in tiny.model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-2)
    # two tasks with different targets: task 0 copies its input, task 1 predicts a fixed other sequence
    labels = torch.stack([ids[0], torch.randint(1, 64, ids[1].shape, generator=torch.Generator().manual_seed(5))])
    tiny.model.train()
    losses = []
    for step in range(25):
        loss = tiny.model(input_ids=ids, labels=labels, task_ids=torch.tensor([0, 1])).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for n, p in tiny.model.named_parameters() if ".deltatune.poly." not in n)
        opt.step()
        losses.append(float(loss.detach()))
    tiny.model.eval()
    assert losses[-1] < losses[0]
    w = piece.mixing(torch.tensor([0, 1])).detach()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 1), atol=1e-6, rtol=0)
    # the routing was learned: it moved from its init, and the two tasks now differ far more than at init
    assert (w - w0).abs().max() > 1e-2
    assert (w[0] - w[1]).abs().max() > 5 * (w0[0] - w0[1]).abs().max()


def test_poly_errors_leave_the_model_usable():
    tiny = build_tiny("llama")
    dt.attach(tiny.model, dt.Poly(r=2, n_tasks=2, targets=("q_proj",)), name="poly")
    ids = tiny.inputs["input_ids"]
    with pytest.raises(ConfigError, match="task ids"):
        tiny.model(input_ids=ids)
    with pytest.raises(ConfigError, match=r"\[0, 2\)"):
        tiny.model(input_ids=ids, task_ids=torch.tensor([0, 2]))
    with pytest.raises(ConfigError):
        dt.Poly(n_splits=0)
    with pytest.raises(dt.errors.TargetError):
        dt.attach(tiny.model, dt.Poly(n_splits=3, targets=("q_proj",)), name="mhr")
    tiny.model(input_ids=ids, task_ids=torch.tensor([1, 0]))


def test_deltas_keyword_routes_one_call():
    tiny = build_tiny("llama")
    for i, n in enumerate(("a", "b")):
        dt.attach(tiny.model, dt.LoRA(r=2), name=n, activate=False)
        _randomize(tiny.model, n, i + 1)
    ids = tiny.inputs["input_ids"]
    with torch.no_grad():
        out = tiny.model(input_ids=ids, deltas=["b", None]).logits
        with dt.route(tiny.model, ["b", None]):
            ref = tiny.model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert dt.active_block(tiny.model) is None


# --- Arrow ----------------------------------------------------------------------------------------------------
def _arrow_reference(tiny, dws: dict[str, dict[str, torch.Tensor]], top_k: int, temperature: float):
    """Plain hooks on a fresh base: per token, |x·v_i| with v_i from an SVD of the dense ΔW, top-k, softmax."""
    ref = tiny.fresh()
    names = list(dws)
    for path, mod in ref.named_modules():
        if path not in dws[names[0]]:
            continue
        mats = [dws[n][path].double() for n in names]
        protos = torch.stack([torch.linalg.svd(m)[2][0] for m in mats])

        def hook(module, args, out, mats=mats, protos=protos):
            x = args[0].double()
            s = (x @ protos.T).abs() / temperature
            top, idx = s.topk(top_k, -1)
            w = torch.zeros_like(s).scatter(-1, idx, torch.softmax(top, -1))
            extra = sum(w[..., i:i + 1] * (x @ m.T) for i, m in enumerate(mats))
            return out + extra.to(out.dtype)

        mod.register_forward_hook(hook)
    return ref


@pytest.mark.parametrize("top_k,temperature", [(1, 1.0), (2, 0.5), (3, 2.0)])
def test_arrow_matches_the_formula(top_k, temperature):
    tiny = build_tiny("llama")
    dws = {}
    for i, (n, r) in enumerate((("a", 4), ("b", 2), ("c", 3))):
        dt.attach(tiny.model, dt.LoRA(r=r, targets=("q_proj", "up_proj")), name=n, activate=False)
        _randomize(tiny.model, n, i + 1)
        mods = dict(tiny.model.named_modules())
        dws[n] = {p: pc.delta_weight(mods[p]).to_dense().detach() for p, pc in _pieces(tiny.model, n).items()}
    dt.activate(tiny.model, dt.Arrow("a", "b", "c", top_k=top_k, temperature=temperature))
    ref = _arrow_reference(tiny, dws, top_k, temperature)
    torch.testing.assert_close(tiny.logits(), tiny.logits(ref), atol=ATOL, rtol=0)


def test_arrow_with_one_delta_is_that_delta_and_caches_prototypes():
    tiny = build_tiny("llama")
    dt.attach(tiny.model, dt.LoRA(r=2), name="a", activate=False)
    dt.attach(tiny.model, dt.LoRA(r=2, targets=("q_proj",)), name="b", activate=False)
    _randomize(tiny.model, "a", 1)
    _randomize(tiny.model, "b", 2)
    with dt.active(tiny.model, "a"):
        alone = tiny.logits()
    dt.activate(tiny.model, dt.Arrow("a", top_k=1))
    torch.testing.assert_close(tiny.logits(), alone, atol=ATOL, rtol=0)
    # where only "a" acts, Arrow over (a, b) gives weight 1 to a
    dt.activate(tiny.model, dt.Arrow("a", "b", top_k=1))
    out = tiny.logits()
    slot = tiny.model.model.layers[0].mlp.up_proj.deltatune
    protos = slot.internal.cache[dt.Arrow][1]
    assert protos.shape == (1, 16)  # one prototype there: only "a" acts on up_proj
    torch.testing.assert_close(tiny.logits(), out, atol=0, rtol=0)
    assert slot.internal.cache[dt.Arrow][1] is protos  # reused across forwards
    _randomize(tiny.model, "a", 9)  # an in-place change: prototypes are recomputed
    tiny.logits()
    assert slot.internal.cache[dt.Arrow][1] is not protos


def test_per_call_keywords_clean_up_and_refuse_checkpointing():
    from deltatune.core.calls import batch_value

    tiny = build_tiny("llama")
    dt.attach(tiny.model, dt.LoRA(r=2), name="a", activate=False)
    ids = tiny.inputs["input_ids"]
    with pytest.raises(dt.errors.DeltaNameError):
        tiny.model(input_ids=ids, task_ids=torch.tensor([0, 1]), deltas=["a", "nope"])
    assert batch_value("task_ids") is None and dt.active_block(tiny.model) is None
    tiny.model.gradient_checkpointing_enable()
    tiny.model.train()
    with pytest.raises(ConfigError, match="checkpoint"):
        tiny.model(input_ids=ids, deltas=["a", None])
    assert dt.active_block(tiny.model) is None


def test_poly_is_refused_under_route_and_repeats_task_ids_for_generate():
    tiny = build_tiny("llama")
    dt.attach(tiny.model, dt.Poly(r=2, n_tasks=2, targets=("q_proj",)), name="poly")
    _randomize(tiny.model, "poly", 1)
    with pytest.raises(ConfigError, match="Route"):
        dt.activate(tiny.model, dt.Route(["poly", None]))
    ids = tiny.inputs["input_ids"][:1]
    with dt.batch(task_ids=torch.tensor([1])), torch.no_grad():
        out = tiny.model.generate(ids, max_new_tokens=2, do_sample=False, num_beams=2, num_return_sequences=2,
                                  pad_token_id=0)
    assert out.shape == (2, ids.shape[1] + 2)
