"""deltatune.serve: pool registration (metadata only, validated, versioned), device slots, per-token routing,
kind policy, continuous batching exact against dt.load + model.generate."""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

import deltatune as dt
from serve_http_fixtures import write_lora
from deltatune.errors import CorruptFileError, DeltaNameError, ShapeMismatchError, UnsupportedError
from deltatune.io.delta import Delta
from deltatune.serve import Engine, SamplingParams


def build_base(seed: int = 0):
    """The tiny Llama of conftest.py, wide enough (hidden 128) for rank-64 LoRAs on every linear layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, attention_dropout=0.0, pad_token_id=0)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).float().eval()


def make_lora(base, path: Path, r: int, seed: int, **kw) -> Path:
    return write_lora(base, path, seed, r=r, std=0.05, **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = build_base()
    root = tmp_path_factory.mktemp("deltas")
    paths = {f"r{r}_{i}": make_lora(base, root / f"r{r}_{i}", r, 10 * r + i) for r in (4, 8, 16, 64) for i in range(2)}
    return base, paths


def reference(base, path, prompt, n):
    m = copy.deepcopy(base)
    if path is not None:
        dt.load(m, path)
    out = m.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# --- 1. the pool ---------------------------------------------------------------------------------------------
def test_ten_thousand_registrations_read_no_tensors(setup, monkeypatch):
    base, paths = setup
    eng = Engine(copy.deepcopy(base), max_loaded=4, max_rank=64, rank_buckets={8: 2, 64: 2})
    import deltatune.io.safetensors_io as sio
    import deltatune.io.native as native

    original = sio.read_tensors

    def no_data(*a, header_only=False, **k):
        if not header_only:
            raise AssertionError("registration read tensor data")
        return original(*a, header_only=True, **k)  # the header alone: meta tensors

    monkeypatch.setattr(sio, "read_tensors", no_data)
    monkeypatch.setattr(native, "read_tensors", no_data)
    files = list(paths.values())
    for i in range(10_000):
        eng.register(f"n{i}", files[i % len(files)])
    assert len(eng.pool.entries) == 10_000 and eng.pool.disk_reads == 0 and eng.pool.host_used == 0


def test_bad_files_are_refused_and_change_nothing(setup, tmp_path):
    base, paths = setup
    eng = Engine(copy.deepcopy(base), max_loaded=2, max_rank=64)
    eng.register("a", paths["r4_0"])
    before = dict(eng.pool.entries)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in Path(paths["r4_0"]).iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "delta.safetensors").write_bytes((bad / "delta.safetensors").read_bytes()[:-10])
    with pytest.raises(CorruptFileError):
        eng.register("a", bad)
    meta = json.loads((bad / "delta.json").read_text())
    (bad / "delta.json").write_text("{not json")
    with pytest.raises(CorruptFileError):
        eng.register("b", bad)
    other = build_base()  # another shape of model: the file does not fit
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()
    with pytest.raises(ShapeMismatchError):
        Engine(small, max_loaded=1, max_rank=64).register("a", paths["r4_0"])
    with pytest.raises(DeltaNameError):
        eng.submit([1, 2], delta="nope")
    assert eng.pool.entries == before and eng.pool.entries["a"].version == 1 and meta and other is not None


def test_reregistration_replaces_for_new_requests_only(setup):
    base, paths = setup
    eng = Engine(copy.deepcopy(base), max_loaded=2, max_rank=64)
    eng.register("x", paths["r8_0"])
    sp = SamplingParams(max_tokens=6, eos=())
    old = eng.submit([3, 4, 5], "x", sp)
    eng.step()  # old is running, its slot pinned with version 1
    eng.register("x", paths["r8_1"])
    new = eng.submit([3, 4, 5], "x", sp)
    eng.run()
    assert old.tokens == reference(base, paths["r8_0"], [3, 4, 5], 6)
    assert new.tokens == reference(base, paths["r8_1"], [3, 4, 5], 6)
    assert all(k[0] != "x" or k[1] == 2 for k in eng.pool.host_cached)


def test_host_lru_stays_under_budget_and_slots_evict_lru(setup):
    base, paths = setup
    one = Delta.read(paths["r16_0"]).num_params * 4
    eng = Engine(copy.deepcopy(base), max_loaded=2, max_rank=64, host_bytes=int(2.5 * one))
    for name in ("r16_0", "r16_1", "r8_0", "r8_1"):
        eng.register(name, paths[name])
        eng.preload(name)
        assert eng.pool.host_used <= eng.pool.host_bytes
    assert eng.slots.evictions == 2 and sorted(k[0] for k in eng.slots.where) == ["r8_0", "r8_1"]


# --- 2. per-token routing, exact ------------------------------------------------------------------------------
def require_kernel():
    """The compiled routing kernel, built here; skipped only on a machine without a C++ compiler or ninja (then
    routing's torch ops are what runs, and they are tested too)."""
    from torch.utils.cpp_extension import is_ninja_available

    from deltatune.serve import kernel

    if shutil.which(os.environ.get("CXX", "c++")) is None or not is_ninja_available():
        pytest.skip("no C++ compiler or no ninja: the routing kernel cannot be built here")
    assert kernel.load() is not None, "a C++ compiler is here, so the routing kernel must build"
    return kernel.load()


def spy_on_kernel(monkeypatch, refuse: bool = False) -> list:
    """What `kernel.usable` answered at each call from now on (None where refused; `refuse`: refuse every call)."""
    from deltatune.serve import kernel

    calls = []
    monkeypatch.setattr(kernel, "usable",
                        lambda *a, _real=kernel.usable: calls.append(None if refuse else _real(*a)) or calls[-1])
    return calls


@pytest.fixture(params=["kernel", "torch-ops"])
def routes(request, monkeypatch):
    """Each routed test twice: through the compiled kernel (checked to have run, for every routed module) and
    through routing's torch ops (checked not to have consulted it)."""
    from deltatune.serve import routing

    if request.param == "kernel":
        require_kernel()
    monkeypatch.setattr(routing, "KERNEL", request.param == "kernel")
    calls = spy_on_kernel(monkeypatch)
    yield request.param
    if request.param == "kernel":
        assert calls and all(c is not None for c in calls)
    else:
        assert not calls


def test_mixed_batch_more_deltas_than_slots_is_exact(setup, routes):
    base, paths = setup
    eng = Engine(copy.deepcopy(base), max_loaded=3, max_rank=64, rank_buckets={8: 2, 64: 1})
    for n, p in paths.items():
        eng.register(n, p)
    names = [None, "r4_0", "r64_0", None, "r16_1", "r8_1", "r4_1", "r64_1", None]
    prompts = [[1 + i, 7, 2 * i % 60 + 1, 5][: 2 + i % 3] for i in range(len(names))]
    reqs = eng.generate(prompts, names, SamplingParams(max_tokens=6, eos=()))
    for r, p, n in zip(reqs, prompts, names):
        assert r.tokens == reference(base, paths.get(n), p, 6), n
    assert eng.slots.evictions > 0 and all(x == 0 for x in eng.slots.pins)


def test_base_tokens_get_exactly_the_base_output(setup, routes):
    base, paths = setup
    eng = Engine(copy.deepcopy(base), max_loaded=2, max_rank=64)
    eng.register("a", paths["r64_0"])
    slot = eng.preload("a")
    from deltatune.serve.routing import make_plan, use_plan

    x = torch.randint(1, 64, (3, 5))
    with torch.no_grad():
        plain = base(x).logits
        slots = [slot] * 5 + [-1] * 5 + [slot, -1, slot, -1, -1]
        with use_plan(make_plan(slots, eng.banks, torch.device("cpu"))):
            mixed = eng.model(x).logits
        assert torch.equal(mixed[1], plain[1]) and not torch.allclose(mixed[0], plain[0])
        outside = eng.model(x).logits  # no plan: the bare base
    assert torch.equal(outside, plain)


# --- 3. kind policy -------------------------------------------------------------------------------------------
def test_kind_policy(setup, tmp_path):
    base, paths = setup
    eng = Engine(copy.deepcopy(base), max_loaded=2, max_rank=128, rank_buckets={8: 1, 128: 1})
    m = copy.deepcopy(base)
    dt.attach(m, dt.LoRA(r=4, dora=True, targets=("q_proj", "v_proj")), name="dora")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    dora = dt.save(m, tmp_path / "dora")
    with pytest.raises(UnsupportedError, match="convert_rank"):
        eng.register("dora", dora)
    entry = eng.register("dora", dora, convert_rank=128)  # the full rank of these modules' updates: exact
    assert entry.policy == "converted" and entry.error < 1e-5
    low = eng.register("dora8", dora, convert_rank=1)
    assert low.error > entry.error
    [r] = eng.generate([[3, 9, 4]], ["dora"], SamplingParams(max_tokens=5, eos=()))
    assert r.tokens == reference(base, dora, [3, 9, 4], 5)
    p = copy.deepcopy(base)
    dt.attach(p, dt.PrefixTuning(n_tokens=2), name="pt")
    prompt = dt.save(p, tmp_path / "prompt")
    with pytest.raises(UnsupportedError, match="not a weight update"):
        eng.register("prompt", prompt)
    assert eng.register("lora", paths["r4_0"]).policy == "fast"


# --- 4. continuous batching -----------------------------------------------------------------------------------
@pytest.mark.parametrize("prefill_tokens,longest", [(256, 7), (3, 14)])
def test_churn_is_exact(setup, routes, prefill_tokens, longest):
    """Random arrivals, evictions, mixed ranks; with prefill_tokens=3 prompts are prefilled in chunks across steps
    while others decode, and the KV arena moves its columns several times."""
    base, paths = setup
    eng = Engine(copy.deepcopy(base), max_loaded=3, max_rank=64, rank_buckets={8: 2, 64: 1}, max_batch=4,
                 prefill_tokens=prefill_tokens)
    for n, p in paths.items():
        eng.register(n, p)
    rng = random.Random(0)
    names = [None, *paths]
    plan = [(rng.randrange(12), rng.choice(names), [rng.randrange(1, 64) for _ in range(rng.randrange(1, longest))],
             rng.randrange(1, 9)) for _ in range(14)]
    reqs, step = [], 0
    while step < 12 or not eng.idle:
        for at, name, prompt, n in plan:
            if at == step:
                reqs.append((eng.submit(prompt, name, SamplingParams(max_tokens=n, eos=())), name, prompt, n))
        eng.step()
        step += 1
    for r, name, prompt, n in reqs:
        assert r.tokens == reference(base, paths.get(name), prompt, n), name
    assert eng.slots.evictions > 0 and all(x == 0 for x in eng.slots.pins)
    assert eng.arena.moves > 0 and eng.arena.used == 0 and all(o is None for o in eng.arena.owner)


def test_sampling_streaming_cancel_and_eos(setup):
    base, paths = setup
    eng = Engine(copy.deepcopy(base), max_loaded=2, max_rank=64)
    eng.register("a", paths["r8_0"])
    seen = []
    sp = SamplingParams(max_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=7, eos=())
    a = eng.submit([5, 6, 7], "a", sp, on_token=lambda r, t: seen.append(t))
    eng.submit([1, 2], None, SamplingParams(max_tokens=3, eos=()))
    c = eng.submit([9, 9], "a", SamplingParams(max_tokens=50, eos=()))
    eng.step()
    eng.step()
    c.cancel()
    eng.run()
    assert seen == a.tokens and len(a.tokens) == 8
    assert c.finish_reason == "cancelled" and c.kv is None and all(x == 0 for x in eng.slots.pins)
    [b] = eng.generate([[5, 6, 7]], ["a"], sp)  # same seed, different batch: same tokens
    assert b.tokens == a.tokens
    first = reference(base, None, [1, 2], 1)[0]
    [e] = eng.generate([[1, 2]], None, SamplingParams(max_tokens=5, eos=(first,)))
    assert e.tokens == [first] and e.finish_reason == "eos"


def test_docs_example_runs():
    text = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    code = text.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "serving.md", "exec"), namespace)
    reqs = namespace["reqs"]
    assert all(len(r.tokens) == 5 for r in reqs) and namespace["engine"].slots.evictions >= 1
    assert len(namespace["streamed"]) == 15


# --- 5. the real model (slow) ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_churn_is_exact(tmp_path):
    """SmolLM2-135M: greedy engine tokens equal dt.load + model.generate for every request, under churn (arrivals
    at random steps, 4 deltas over 2 slots so slots are evicted, prompts prefilled in 8-token chunks)."""
    from deltatune import zoo

    try:
        base, tok = zoo.load_model("smollm2-135m")
    except zoo.MissingAssetError as e:
        pytest.skip(str(e))
    paths = {}
    for i, (r, targets) in enumerate([(16, "all-linear"), (16, "all-linear"), (8, ("q_proj", "v_proj")),
                                      (4, "all-linear")]):
        m = copy.deepcopy(base)
        torch.manual_seed(i)
        dt.attach(m, dt.LoRA(r=r, targets=targets), name="d")
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        paths[f"d{i}"] = dt.save(m, tmp_path / f"d{i}")
        del m
    eng = Engine(base, tokenizer=tok, max_loaded=2, max_rank=16, rank_buckets={8: 1, 16: 1}, max_batch=3,
                 prefill_tokens=8)
    for n, p in paths.items():
        eng.register(n, p)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,",
             "Water boils at", "List three colours:", "The quick brown fox", "import torch\nx =", "Hello"]
    rng = random.Random(0)
    names = [None, *paths]
    plan = [(rng.randrange(8), names[i % len(names)], tok(t)["input_ids"], rng.randrange(3, 7))
            for i, t in enumerate(texts)]
    reqs, step = [], 0
    while step < 8 or not eng.idle:
        for at, name, prompt, n in plan:
            if at == step:
                reqs.append((eng.submit(prompt, name, SamplingParams(max_tokens=n, eos=())), name, prompt, n))
        eng.step()
        step += 1
    eng.close()
    for r, name, prompt, n in reqs:
        m = copy.deepcopy(base)
        if name is not None:
            dt.load(m, paths[name])
        m.generation_config.eos_token_id = None  # the engine ran with eos=(): no early stop on either side
        out = m.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id or 0)
        assert r.tokens == out[0, len(prompt):].tolist(), name
    assert eng.slots.evictions > 0 and eng.arena.joins == len(texts)
