"""Per-call compositions are context-local: threads sharing one model each get their single-threaded result.

4 threads × 200 calls over one tiny Llama with LoRA, (IA)3, a bottleneck adapter and Poly attached, each call
picking its own composition — `deltas=` per row, `with dt.active(...)` with Sum/Stack/Average, `task_ids=`, or
nothing — must equal the result computed alone beforehand, and leave the model's shared state as it was."""
from __future__ import annotations

import random
import threading

import pytest
import torch

import deltatune as dt
from deltatune.errors import StateError
from deltatune.runtime import slot_of

from conftest import build_tiny, randomize_delta

THREADS, CALLS = 4, 200


def _model():
    tiny = build_tiny("llama")
    torch.manual_seed(0)
    dt.attach(tiny.model, dt.LoRA(r=2), "a", activate=False)
    dt.attach(tiny.model, dt.LoRA(r=4, targets=("q_proj", "v_proj")), "b", activate=False)
    dt.attach(tiny.model, dt.IA3(), "ia3", activate=False)
    dt.attach(tiny.model, dt.Houlsby(), "ad", activate=False)
    dt.attach(tiny.model, dt.Poly(n_tasks=2, n_skills=2, r=2), "poly", activate=False)
    for i, name in enumerate(("a", "b", "ia3", "ad", "poly")):
        randomize_delta(tiny.model, name, seed=i)
    return tiny


def _cases(ids: torch.Tensor):
    """(label, callable running one forward) for every kind of per-call composition."""
    rows = len(ids)
    task = torch.tensor([0, 1] * (rows // 2))

    def call(model, **kw):
        return model(input_ids=ids, **kw).logits

    def inside(model, node, **kw):
        with dt.active(model, node):
            return call(model, **kw)

    return [
        ("bare", lambda m: call(m)),
        ("deltas a/b", lambda m: call(m, deltas=["a", "b"] * (rows // 2))),
        ("deltas b/None", lambda m: call(m, deltas=["b", None] * (rows // 2))),
        ("deltas ia3/a", lambda m: call(m, deltas=["ia3", "a"] * (rows // 2))),
        ("active a", lambda m: inside(m, "a")),
        ("active Sum", lambda m: inside(m, dt.Sum("a", "b", "ia3"))),
        ("active Stack", lambda m: inside(m, dt.Stack("ad", "b"))),
        ("active Average", lambda m: inside(m, dt.Average("a", "b", weights=[0.3, 0.7]))),
        ("poly", lambda m: inside(m, "poly", task_ids=task)),
        ("poly + deltas", lambda m: inside(m, "poly", task_ids=task.flip(0))),
    ]


def test_threads_sharing_a_model_each_get_their_own_result() -> None:
    tiny = _model()
    model = tiny.model
    ids = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(3))
    cases = _cases(ids)
    with torch.no_grad():
        expected = [fn(model) for _, fn in cases]
    assert all(not torch.equal(expected[0], e) for e in expected[1:])  # every case changes the output
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with torch.no_grad():
                for _ in range(CALLS):
                    i = rng.randrange(len(cases))
                    got = cases[i][1](model)
                    if not torch.allclose(got, expected[i], atol=1e-6, rtol=0):
                        errors.append(f"{cases[i][0]}: max diff {(got - expected[i]).abs().max().item():.3g}")
        except Exception as e:  # noqa: BLE001 - reported below, with the thread's case
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert not errors, f"{len(errors)} of {THREADS * CALLS} calls wrong, e.g. {errors[:3]}"
    # nothing left behind: the shared composition is still the bare model, and so are the outputs
    assert dt.active_block(model) is None and dt.active_names(model) == ()
    assert all(not slot_of(m).internal.plans for m in model.modules() if slot_of(m) is not None)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, tiny.fresh()(input_ids=ids).logits, atol=0, rtol=0)


def test_a_thread_sees_its_own_active_composition() -> None:
    tiny = _model()
    model = tiny.model
    dt.activate(model, "a")
    seen: dict[str, object] = {}
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with dt.active(model, dt.Sum("b", "ia3")):
            seen["other"] = dt.active_block(model)
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    t.start()
    inside.wait(10)
    seen["main"] = dt.active_block(model)
    release.set()
    t.join(10)
    assert seen["other"] == dt.Sum("b", "ia3") and seen["main"] == "a" and dt.active_block(model) == "a"


def test_shared_changes_are_serialised() -> None:
    """attach/detach from several threads at once: every delta lands, nothing is half-installed."""
    tiny = build_tiny("llama")
    errors: list[BaseException] = []

    def attach_detach(i: int) -> None:
        try:
            for j in range(5):
                dt.attach(tiny.model, dt.LoRA(r=2, targets=("q_proj",)), f"d{i}_{j}", activate=False)
            for j in range(0, 5, 2):
                dt.detach(tiny.model, f"d{i}_{j}")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=attach_detach, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    names = sorted(dt.summary(tiny.model).__getattribute__("rows"), key=lambda r: r.name)
    assert [r.name for r in names] == sorted(f"d{i}_{j}" for i in range(4) for j in (1, 3))
    slot = slot_of(tiny.model.model.layers[0].self_attn.q_proj)
    assert sorted(slot.keys()) == sorted(f"d{i}_{j}" for i in range(4) for j in (1, 3))


def test_detaching_inside_a_temporary_composition_and_deep_copies() -> None:
    tiny = _model()
    model = tiny.model
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with dt.active(model, dt.Sum("a", "b")):
            model(input_ids=ids)
            dt.detach(model, "a")  # plans cached for this context name "a": rebuilt, not a KeyError
            only_b = model(input_ids=ids).logits
        with dt.active(model, "b"):
            torch.testing.assert_close(only_b, model(input_ids=ids).logits, atol=0, rtol=0)
        import copy

        twin = copy.deepcopy(model)  # its slots point at its own state: compositions do not leak between the two
        base = model(input_ids=ids).logits
        with dt.active(model, "b"):
            torch.testing.assert_close(twin(input_ids=ids).logits, base, atol=0, rtol=0)
        with dt.active(twin, "b"):
            torch.testing.assert_close(twin(input_ids=ids).logits, only_b, atol=0, rtol=0)
            torch.testing.assert_close(model(input_ids=ids).logits, base, atol=0, rtol=0)


def test_merge_inside_a_temporary_composition_is_refused() -> None:
    tiny = _model()
    dt.activate(tiny.model, "a")
    with dt.active(tiny.model, "b"):
        with pytest.raises(StateError, match="outside"):
            dt.merge(tiny.model)
    assert dt.summary(tiny.model)["a"].merged is False
