"""Bad input: every failure raises a specific deltatune error with a useful message and leaves the model untouched."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
import deltatune.runtime.lifecycle
import deltatune.runtime.slot
from deltatune.core.errors import (ConfigError, CorruptFileError, DeltaNameError, DeltaNotFoundError, DeltaTuneError,
                              NonFiniteError, ShapeMismatchError, StateError, TargetError, UnsupportedError)
from deltatune.runtime import slot_of, state_of
from deltatune.io import atomic

TOKENS = torch.tensor([[1, 5, 9, 13, 2, 7, 3, 11], [4, 4, 8, 15, 16, 23, 42, 0]])


def tiny_llama(hidden: int = 32, layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def randomize(model, name: str, seed: int = 1) -> None:
    """Give delta `name` non-zero B so that it changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            slot = slot_of(module)
            if slot is not None and name in slot:
                b = slot[name].lora_B
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)


def with_delta(model, name: str = "a", cfg: dt.LoRA | None = None, seed: int = 1, **kw):
    dt.attach(model, cfg or dt.LoRA(r=4), name, **kw)
    randomize(model, name, seed)
    return model


def saved(tmp_path: Path, hidden: int = 32, layers: int = 3, name: str = "saved", cfg=None) -> Path:
    """A delta directory written by dt.save from a tiny Llama."""
    model = with_delta(tiny_llama(hidden, layers), name, cfg)
    out = tmp_path / f"delta-{name}-{hidden}-{layers}"
    dt.save(model, out, name)
    return out


# --- the model must be exactly as before ---------------------------------------------------------------
def _hooks(module: torch.nn.Module) -> tuple:
    return tuple(tuple(d.items()) for d in (module._forward_hooks, module._forward_pre_hooks,
                                            module._forward_hooks_with_kwargs, module._backward_hooks))


def snapshot(model: torch.nn.Module) -> dict:
    st = state_of(model)
    slots = {}
    for path, module in model.named_modules():
        slot = slot_of(module)
        if slot is not None:
            slots[path] = (tuple(slot.keys()), tuple(slot.internal.active), tuple(slot.internal.merged), slot.internal.handles)
    with torch.no_grad():
        logits = model(TOKENS).logits.clone()
    return {
        "params": {n: (p.detach().clone(), p.requires_grad, id(p))
                   for n, p in model.named_parameters(remove_duplicate=False)},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers(remove_duplicate=False)},
        "modules": {(n, type(m), id(m)) for n, m in model.named_modules(remove_duplicate=False)},
        "hooks": {n: _hooks(m) for n, m in model.named_modules()},
        "state_id": id(st),
        "state": None if st is None else (
            tuple(st.deltas), tuple(st.active), tuple(st.merged), dict(st.base_requires_grad),
            {k: (id(r), r.config, tuple(r.paths), r.trainable) for k, r in st.deltas.items()}),
        "slots": slots,
        "sd_keys": tuple(model.state_dict()),
        "training": {n: m.training for n, m in model.named_modules()},
        "logits": logits,
    }


def assert_untouched(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"], "modules were added, removed or replaced"
    assert after["params"].keys() == before["params"].keys()
    for n, (t, rg, pid) in before["params"].items():
        t2, rg2, pid2 = after["params"][n]
        assert torch.equal(t, t2), f"parameter {n} changed"
        assert rg == rg2, f"requires_grad of {n} changed"
        assert pid == pid2, f"parameter {n} was replaced"
    assert after["buffers"].keys() == before["buffers"].keys()
    for n, b in before["buffers"].items():
        assert torch.equal(b, after["buffers"][n]), f"buffer {n} changed"
    assert after["hooks"] == before["hooks"], "forward/backward hooks changed"
    assert after["state_id"] == before["state_id"]
    assert after["state"] == before["state"], "deltatune state (attached/active/merged) changed"
    assert after["slots"] == before["slots"]
    assert after["sd_keys"] == before["sd_keys"]
    assert after["training"] == before["training"]
    assert torch.equal(after["logits"], before["logits"])
    if before["state"] is None:
        assert state_of(model) is None
        assert not any("deltatune" in n for n, _ in model.named_modules()), "leftover deltatune submodules"


@pytest.fixture(params=["bare", "attached"])
def model(request):
    """A tiny Llama either bare or already carrying delta 'a' (active) and 'b' (inactive, on q_proj only)."""
    m = tiny_llama()
    if request.param == "attached":
        with_delta(m, "a", seed=1)
        with_delta(m, "b", dt.LoRA(r=2, targets=("q_proj",)), seed=2, activate=False)
        # one merged delta makes the state richer still
        dt.merge(m, "a")
    return m


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    """No code path of deltatune may unpickle anything: fail loudly if torch.load / pickle is used."""
    calls: list[str] = []

    def forbid(label):
        def f(*args, **kwargs):
            calls.append(label)
            raise AssertionError(f"{label} called: deltatune must never unpickle")
        return f

    class NoUnpickler(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            calls.append("pickle.Unpickler")
            raise AssertionError("pickle.Unpickler used: deltatune must never unpickle")

    monkeypatch.setattr(torch, "load", forbid("torch.load"))
    monkeypatch.setattr(torch.serialization, "load", forbid("torch.serialization.load"))
    monkeypatch.setattr(pickle, "load", forbid("pickle.load"))
    monkeypatch.setattr(pickle, "loads", forbid("pickle.loads"))
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    yield calls
    assert not calls, f"unpickling was attempted: {calls}"


def fails(model, exc: type[Exception], fn, *substrings: str) -> str:
    """Run fn, expect exactly `exc` (a DeltaTuneError), check the message, and that the model is untouched."""
    before = snapshot(model)
    with pytest.raises(exc) as info:
        fn()
    assert isinstance(info.value, DeltaTuneError)
    msg = str(info.value)
    for s in substrings:
        assert s in msg, f"{s!r} not in error message: {msg}"
    assert_untouched(model, before)
    return msg


def rewrite_json(path: Path, edit) -> None:
    meta = json.loads((path / "delta.json").read_text())
    edit(meta)
    (path / "delta.json").write_text(json.dumps(meta))


def rewrite_tensors(path: Path, edit) -> None:
    """Change the tensor file and fix up bytes/sha256 in delta.json so only deeper checks can catch it."""
    data = (path / "delta.safetensors").read_bytes()
    tensors = {k: v.clone() for k, v in st_load(data).items()}
    edit(tensors)
    new = st_save(tensors, metadata={"format": "deltatune.delta"})
    (path / "delta.safetensors").write_bytes(new)

    def fix(meta):
        meta["tensors"]["bytes"] = len(new)
        meta["tensors"]["sha256"] = hashlib.sha256(new).hexdigest()

    rewrite_json(path, fix)


# --- files that do not fit the model ------------------------------------------------------------------
def test_load_targets_missing_from_model(model, tmp_path):
    d = saved(tmp_path, layers=4)  # has model.layers.3.*, the model has 3 layers
    fails(model, TargetError, lambda: dt.load(model, d, "new"), "model.layers.3.", "LlamaForCausalLM", "lacks")


def test_load_shape_mismatch(model, tmp_path):
    d = saved(tmp_path, hidden=48)
    msg = fails(model, ShapeMismatchError, lambda: dt.load(model, d, "new"), "does not fit", "model.layers.0.")
    assert "48" in msg and "32" in msg


def test_load_shape_mismatch_without_recorded_shapes(model, tmp_path):
    """Even without base.weight_shapes in delta.json, the tensors' own shapes are checked against the model."""
    d = saved(tmp_path, hidden=48)
    rewrite_json(d, lambda meta: meta["base"].pop("weight_shapes"))
    fails(model, ShapeMismatchError, lambda: dt.load(model, d, "new"), "model.layers.0.", "shape")


def test_load_config_disagrees_with_tensors(model, tmp_path):
    """delta.json says r=8 but the tensors have r=4: caught before anything is attached."""
    d = saved(tmp_path)
    rewrite_json(d, lambda meta: meta["config"].update(r=8))
    fails(model, ShapeMismatchError, lambda: dt.load(model, d, "new"), "in the file", "on this model", "model.layers.")


# --- damaged files --------------------------------------------------------------------------------------
def test_load_truncated_tensor_file(model, tmp_path):
    d = saved(tmp_path)
    f = d / "delta.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    fails(model, CorruptFileError, lambda: dt.load(model, d, "new"), str(f), "truncated")


def test_load_tensor_file_truncated_inside_header(model, tmp_path):
    d = saved(tmp_path)
    f = d / "delta.safetensors"
    f.write_bytes(f.read_bytes()[:5])
    fails(model, CorruptFileError, lambda: dt.load(model, d, "new"), str(f))


def test_load_random_bytes_tensor_file(model, tmp_path):
    d = saved(tmp_path)
    f = d / "delta.safetensors"
    f.write_bytes(os.urandom(f.stat().st_size))
    fails(model, CorruptFileError, lambda: dt.load(model, d, "new"), str(f))


def test_load_flipped_tensor_bytes_caught_by_hash(model, tmp_path):
    """A valid safetensors header with damaged data is caught by the sha256 recorded in delta.json."""
    d = saved(tmp_path)
    f = d / "delta.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    st_load(bytes(data))  # still parses
    fails(model, CorruptFileError, lambda: dt.load(model, d, "new"), str(f), "hash")


def test_load_invalid_json(model, tmp_path):
    d = saved(tmp_path)
    (d / "delta.json").write_text('{"format": "deltatune.delta", "config": ')
    fails(model, CorruptFileError, lambda: dt.load(model, d, "new"), str(d / "delta.json"), "JSON")


def test_load_json_not_a_delta(model, tmp_path):
    d = saved(tmp_path)
    (d / "delta.json").write_text('[1, 2, 3]')
    fails(model, CorruptFileError, lambda: dt.load(model, d, "new"), str(d / "delta.json"))


def test_load_json_missing_modules(model, tmp_path):
    d = saved(tmp_path)
    rewrite_json(d, lambda meta: meta.pop("modules"))
    fails(model, CorruptFileError, lambda: dt.load(model, d, "new"), "modules", str(d / "delta.json"))


def test_load_tensor_file_missing(model, tmp_path):
    d = saved(tmp_path)
    (d / "delta.safetensors").unlink()
    fails(model, DeltaNotFoundError, lambda: dt.load(model, d, "new"), str(d / "delta.safetensors"))


def test_load_tensor_of_unlisted_module(model, tmp_path):
    d = saved(tmp_path)
    rewrite_json(d, lambda meta: meta["modules"].pop("model.layers.1.mlp.up_proj"))
    fails(model, CorruptFileError, lambda: dt.load(model, d, "new"), "model.layers.1.mlp.up_proj")


def test_load_listed_param_missing_from_tensors(model, tmp_path):
    d = saved(tmp_path)
    rewrite_tensors(d, lambda t: t.pop("model.layers.2.self_attn.v_proj.lora_B"))
    fails(model, CorruptFileError, lambda: dt.load(model, d, "new"), "model.layers.2.self_attn.v_proj", "lora_B")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_load_non_finite(model, tmp_path, value):
    d = saved(tmp_path)
    key = "model.layers.1.mlp.down_proj.lora_A"

    def poison(t):
        t[key][1, 3] = value

    rewrite_tensors(d, poison)
    fails(model, NonFiniteError, lambda: dt.load(model, d, "new"), key, "NaN/inf", "not loaded")


def test_read_non_finite_without_model(tmp_path):
    d = saved(tmp_path)
    rewrite_tensors(d, lambda t: t["model.layers.0.self_attn.q_proj.lora_B"].fill_(float("nan")))
    with pytest.raises(NonFiniteError, match="q_proj.lora_B"):
        dt.Delta.read(d)


# --- names ----------------------------------------------------------------------------------------------
def test_attach_name_collision(tmp_path):
    m = with_delta(tiny_llama(), "a")
    fails(m, DeltaNameError, lambda: dt.attach(m, dt.LoRA(r=2), "a"), "'a'", "already attached", "detach")


def test_load_name_collision(model, tmp_path):
    d = saved(tmp_path, name="a")
    if state_of(model) is None:
        dt.attach(model, dt.LoRA(r=2, targets=("v_proj",)), "a")
        randomize(model, "a", seed=7)
    fails(model, DeltaNameError, lambda: dt.load(model, d, "a"), "'a'", "already attached")
    fails(model, DeltaNameError, lambda: dt.load(model, d), "'a'", "already attached")  # the saved name


def test_load_collision_with_other_delta_attached(tmp_path):
    """Loading under a taken name fails; the existing delta and a second one stay bitwise as they were."""
    m = with_delta(tiny_llama(), "a", seed=3)
    with_delta(m, "other", dt.LoRA(r=2, targets=("o_proj",)), seed=4, activate=False)
    d = saved(tmp_path, name="x")
    fails(m, DeltaNameError, lambda: dt.load(m, d, "other"), "'other'")
    fails(m, DeltaNameError, lambda: dt.attach(m, dt.LoRA(r=3), "other"), "'other'")


@pytest.mark.parametrize("bad", ["", "a.b", "x/y", 3])
def test_bad_delta_name(model, tmp_path, bad):
    fails(model, DeltaNameError, lambda: dt.attach(model, dt.LoRA(r=2), bad), "name")


# --- configs --------------------------------------------------------------------------------------------
def test_unknown_constructor_key_lists_known_keys():
    with pytest.raises(ConfigError) as info:
        dt.LoRA(rank=4)
    msg = str(info.value)
    assert "rank" in msg and "'r'" in msg and "'alpha'" in msg and "'targets'" in msg


def test_unknown_key_in_delta_json(model, tmp_path):
    d = saved(tmp_path)
    rewrite_json(d, lambda meta: meta["config"].update(rank=4))
    msg = fails(model, ConfigError, lambda: dt.load(model, d, "new"), "'rank'", str(d / "delta.json"), "known keys")
    assert "'r'" in msg


def test_unknown_kind_in_delta_json(model, tmp_path):
    d = saved(tmp_path)
    rewrite_json(d, lambda meta: meta["config"].update(kind="lorax"))
    fails(model, ConfigError, lambda: dt.load(model, d, "new"), "'lorax'", "'lora'")


def test_invalid_value_in_delta_json(model, tmp_path):
    d = saved(tmp_path)
    rewrite_json(d, lambda meta: meta["config"].update(r=0))
    fails(model, ConfigError, lambda: dt.load(model, d, "new"), "LoRA.r", str(d / "delta.json"))


def test_higher_format_version(model, tmp_path):
    d = saved(tmp_path)
    rewrite_json(d, lambda meta: meta.update(format_version=99))
    fails(model, UnsupportedError, lambda: dt.load(model, d, "new"), "99", "upgrade deltatune")


# --- paths ----------------------------------------------------------------------------------------------
def test_path_does_not_exist(model, tmp_path):
    p = tmp_path / "no" / "such" / "delta"
    fails(model, DeltaNotFoundError, lambda: dt.load(model, p, "new"), str(p), "does not exist")


def test_directory_without_delta_files(model, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("hello")
    fails(model, DeltaNotFoundError, lambda: dt.load(model, tmp_path / "empty", "new"),
          str(tmp_path / "empty"), "delta.json", "adapter_config.json")


def test_peft_dir_with_only_pickle_weights(model, tmp_path, no_unpickling):
    """adapter_model.bin is a pickle: it must be refused without ever being unpickled."""
    d = tmp_path / "peft"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0,
        "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": None}))
    # a real pickle whose loading would run code
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"x": 1}))
    before = snapshot(model)
    with pytest.raises(DeltaTuneError) as info:
        dt.load(model, d, "new")
    msg = str(info.value)
    assert "adapter_model.bin" in msg and "safetensors" in msg and str(d) in msg, msg
    assert isinstance(info.value, UnsupportedError), type(info.value)
    assert_untouched(model, before)
    assert not no_unpickling


# --- targeting at attach time ----------------------------------------------------------------------------
def test_attach_targets_match_nothing(model):
    fails(model, TargetError, lambda: dt.attach(model, dt.LoRA(r=2, targets=("qkv",)), "new"),
          "match no module", "model.layers.0", "'qkv'")


def test_attach_regex_matches_unsupported_module(model):
    fails(model, TargetError, lambda: dt.attach(model, dt.LoRA(r=2, targets=r".*\.(q_proj|input_layernorm)"), "new"),
          "model.layers.0.input_layernorm", "LlamaRMSNorm", "exclude")


def test_rank_too_large_on_a_late_module(model):
    """Pieces for layers 0..1 are built before layer 2's down_proj fails: nothing may remain."""
    cfg = dt.LoRA(r=4, rank_pattern={r"model\.layers\.2\.mlp\.down_proj": 40})
    fails(model, TargetError, lambda: dt.attach(model, cfg, "new"), "r=40", "model.layers.2.mlp.down_proj",
          "rank_pattern")


def test_rank_too_large_for_first_module(model):
    fails(model, TargetError, lambda: dt.attach(model, dt.LoRA(r=33), "new"), "r=33", "model.layers.0.")


# --- failures inside install roll back ----------------------------------------------------------------------
@pytest.mark.parametrize("when", ["before", "after"])
def test_failure_inside_install_rolls_back(model, monkeypatch, when):
    """ensure_slot fails on its 3rd call (before or after creating the slot): all pieces and slots go away."""
    original = deltatune.runtime.slot.ensure_slot
    calls = []

    def flaky(module, layout, owner):
        calls.append(module)
        if len(calls) == 3 and when == "before":
            raise RuntimeError("injected failure")
        slot = original(module, layout, owner)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return slot

    monkeypatch.setattr(deltatune.runtime.slot, "ensure_slot", flaky)
    monkeypatch.setattr(deltatune.runtime.lifecycle, "ensure_slot", flaky)  # api imported it by name
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="injected"):
        dt.attach(model, dt.LoRA(r=2), "new")
    assert len(calls) == 3
    assert_untouched(model, before)


def test_failure_while_activating_rolls_back(model, monkeypatch):
    """A failure at the last step of install (setting the active set) removes every piece again."""
    def flaky(m, names):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(deltatune.runtime.lifecycle, "set_active", flaky)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="injected"):
        dt.attach(model, dt.LoRA(r=2), "new")
    monkeypatch.undo()
    assert_untouched(model, before)


def test_failure_after_activating_restores_active_set(monkeypatch):
    """Even after the active set was switched to the new delta, a failure restores the previous active set."""
    m = with_delta(tiny_llama(), "a", seed=1)
    with_delta(m, "b", dt.LoRA(r=2, targets=("q_proj",)), seed=2, activate=False)
    original = deltatune.runtime.lifecycle.set_active

    def flaky(model, names):
        original(model, names)
        raise RuntimeError("injected failure")

    monkeypatch.setattr(deltatune.runtime.lifecycle, "set_active", flaky)
    before = snapshot(m)
    with pytest.raises(RuntimeError, match="injected"):
        dt.attach(m, dt.LoRA(r=2), "new")
    monkeypatch.undo()
    assert_untouched(m, before)
    assert dt.active_names(m) == ("a",)


def test_failure_inside_install_during_load(model, monkeypatch, tmp_path):
    d = saved(tmp_path)
    original = deltatune.runtime.slot.ensure_slot
    calls = []

    def flaky(module, layout, owner):
        calls.append(module)
        if len(calls) == 5:
            raise RuntimeError("injected failure")
        return original(module, layout, owner)

    monkeypatch.setattr(deltatune.runtime.lifecycle, "ensure_slot", flaky)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="injected"):
        dt.load(model, d, "new")
    assert_untouched(model, before)


def test_model_usable_after_failures(tmp_path):
    """After a series of failed calls the model still attaches, saves and loads normally."""
    m = tiny_llama()
    for bad in (dt.LoRA(r=2, targets=("nothing",)), dt.LoRA(r=99)):
        with pytest.raises(TargetError):
            dt.attach(m, bad, "x")
    with_delta(m, "x")
    out = dt.save(m, tmp_path / "x", "x")
    fresh = tiny_llama()
    dt.load(fresh, out, "x")
    with torch.no_grad():
        assert torch.allclose(fresh(TOKENS).logits, m(TOKENS).logits, atol=1e-6)


# --- atomic writes ------------------------------------------------------------------------------------------
def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_atomic_write_replace_fails(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic.write_bytes(target, b"old contents")

    def boom(*a, **k):
        raise OSError("injected rename failure")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="injected"):
        atomic.write_bytes(target, b"new contents that never land")
    assert target.read_bytes() == b"old contents"
    assert _listing(tmp_path) == ["f.bin"]


def test_atomic_write_fails_mid_write(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic.write_bytes(target, b"old contents")
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError("injected: disk full")

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="disk full"):
        atomic.write_bytes(target, b"x" * 10_000)
    assert target.read_bytes() == b"old contents"
    assert _listing(tmp_path) == ["f.bin"]


def test_atomic_write_fsync_fails(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic.write_bytes(target, b"old contents")

    def boom(fd):
        raise OSError("injected fsync failure")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="fsync"):
        atomic.write_bytes(target, b"new")
    assert target.read_bytes() == b"old contents"
    assert _listing(tmp_path) == ["f.bin"]


def test_atomic_write_respects_umask(tmp_path):
    """Files are created with the usual permissions (not mkstemp's private 0600)."""
    old = os.umask(0o022)
    try:
        atomic.write_bytes(tmp_path / "new.bin", b"data")
        (tmp_path / "plain.bin").write_bytes(b"data")
    finally:
        os.umask(old)
    mode = (tmp_path / "new.bin").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.bin").stat().st_mode & 0o777 == 0o644


def test_save_over_existing_delta_is_all_or_nothing(tmp_path):
    """dt.save into a directory that holds a delta: if any file operation of the save fails (an OSError injected at
    each in turn: every write, fsync, rename, removal), the old delta is still there byte for byte, loads, and
    nothing is left beside it; a failure after the commit (in the clean-up) leaves the new delta."""
    from fault_injection import fail_at

    first = with_delta(tiny_llama(), "a", seed=5)
    d = tmp_path / "a"
    dt.save(first, d, "a")
    files_before = {p.name: p.read_bytes() for p in d.iterdir()}
    second = with_delta(tiny_llama(), "a", cfg=dt.LoRA(r=2), seed=6)
    failed = 0
    for k in range(1, 200):
        error, n = fail_at(k, lambda: dt.save(second, d, "a"))
        if n < k:  # nothing left to fail: every operation has had its turn
            assert error is None
            break
        if error is None:  # failed after the commit: the new delta is in place; put the old one back
            dt.save(first, d, "a")
            continue
        failed += 1
        assert isinstance(error, OSError) and "injected" in str(error)
        assert {p.name: p.read_bytes() for p in d.iterdir()} == files_before, f"old delta damaged (operation {k})"
        assert _listing(tmp_path) == ["a"], f"temporary files left (operation {k})"
        fresh = tiny_llama()
        dt.load(fresh, d, "a")
        with torch.no_grad():
            assert torch.allclose(fresh(TOKENS).logits, first(TOKENS).logits, atol=1e-6)
    assert failed >= 6


def test_save_unknown_format_and_name(tmp_path):
    m = with_delta(tiny_llama(), "a")
    with pytest.raises(ConfigError, match="'onnx'"):
        dt.save(m, tmp_path / "x", "a", format="onnx")
    with pytest.raises(DeltaNameError, match="'zzz'"):
        dt.save(m, tmp_path / "x", "zzz")
    with pytest.raises(DeltaNameError, match="nothing to save"):
        dt.save(tiny_llama(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_non_integer_format_version(model, tmp_path):
    d = saved(tmp_path)
    rewrite_json(d, lambda meta: meta.update(format_version="2"))
    fails(model, CorruptFileError, lambda: dt.load(model, d, "new"), "format_version", "'2'")


def test_load_config_implies_other_params(model, tmp_path):
    """delta.json says dora=True (a magnitude vector per module) but the tensors are plain LoRA."""
    d = saved(tmp_path)
    rewrite_json(d, lambda meta: meta["config"].update(dora=True))
    fails(model, ShapeMismatchError, lambda: dt.load(model, d, "new"), "magnitude", "file holds")


def test_modules_to_save_matching_nothing(model):
    fails(model, TargetError, lambda: dt.attach(model, dt.LoRA(r=2, modules_to_save=("classifier",)), "new"),
          "modules_to_save", "classifier")


def test_path_is_a_file_not_a_directory(model, tmp_path):
    d = saved(tmp_path)
    for f in (d / "delta.safetensors", d / "delta.json"):
        fails(model, DeltaNotFoundError, lambda: dt.load(model, f, "new"), str(f), "is a file", str(d))


@pytest.mark.parametrize("existed", [True, False])
def test_write_files_all_or_nothing(tmp_path, monkeypatch, existed):
    a, b = tmp_path / "a.bin", tmp_path / "b.json"
    if existed:
        atomic.write_files({a: b"old a", b: b"old b"})
    real_replace = os.replace
    calls = []

    def flaky(src, dst, *args, **kwargs):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("injected failure")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="injected"):
        atomic.write_files({a: b"new a", b: b"new b"})
    monkeypatch.undo()
    if existed:
        assert a.read_bytes() == b"old a" and b.read_bytes() == b"old b"
        assert _listing(tmp_path) == ["a.bin", "b.json"]
    else:
        assert _listing(tmp_path) == []
    atomic.write_files({a: b"new a", b: b"new b"})
    assert a.read_bytes() == b"new a" and b.read_bytes() == b"new b"
    assert _listing(tmp_path) == ["a.bin", "b.json"]


def test_merging_an_inactive_delta_is_refused_and_weights_untouched():
    from conftest import build_tiny

    m = build_tiny("llama").model
    dt.attach(m, dt.LoRA(r=2, targets=("q_proj",)), "a")
    dt.attach(m, dt.LoRA(r=2, targets=("q_proj",)), "b", activate=False)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(StateError, match="not active"):
        dt.merge(m, "b")
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert dt.active_names(m) == ("a",)
