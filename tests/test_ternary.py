"""The ternary storage kind (ComPEFT results): bit packing, the stored update, files, forward, merge, bad input.

Oracles do not use the code under test: numpy's `packbits(bitorder="little")` for the bit layout, ComPEFT's formula
written out on the raw tensors, and the base model with ΔŴ added to its weights for logits.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune.core.errors import CorruptFileError, ShapeMismatchError, UnsupportedError
from deltatune.merging.compress import compress
from deltatune.methods.ternary import decode, pack_bits, unpack_bits
from deltatune.core.tensors import DenseDelta, SparseDelta

from conftest import build_tiny, compeft_oracle as compeft


# --- oracles -----------------------------------------------------------------------------------------------


def np_pack(bits: Tensor) -> bytes:
    return np.packbits(bits.numpy().astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def ternary_size(numel: int, k: int) -> int:
    """mask bits + sign bits + float32 scale + int64 [2] shape."""
    return math.ceil(numel / 8) + math.ceil(k / 8) + 4 + 16


def sparse_size(k: int) -> int:
    """The old storage: int64 index + float32 value per kept entry + int64 [2] shape."""
    return 12 * k + 16


def tensor_data_bytes(file: Path) -> int:
    """Bytes of a safetensors file after its 8-byte length prefix and JSON header."""
    (n,) = struct.unpack("<Q", file.read_bytes()[:8])
    return file.stat().st_size - 8 - n


def weight_view(module: nn.Module) -> Tensor:
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def add_update(model: nn.Module, updates: dict[str, Tensor], biases: dict[str, Tensor] | None = None) -> nn.Module:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path, dw in updates.items():
            m = modules[path]
            m.weight += (dw if isinstance(m, nn.Linear) else dw.t()).to(m.weight.dtype)
        for path, db in (biases or {}).items():
            modules[path].bias += db.to(modules[path].bias.dtype)
    return model


def random_updates(model: nn.Module, seed: int = 0, suffixes: tuple[str, ...] = ("proj", "c_attn", "c_fc", "c_proj",
                                                                                 "query", "value", "dense")) -> dict[str, Tensor]:
    """A random dense ΔW ([out, in] view) for every Linear/Conv1D whose name ends with one of `suffixes`."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, m in model.named_modules():
        if path.endswith(suffixes) and hasattr(m, "weight") and m.weight.dim() == 2 and "embed" not in path:
            out[path] = torch.randn(weight_view(m).shape, generator=g) * 0.05
    return out


def module_types(model: nn.Module, paths) -> dict[str, str]:
    modules = dict(model.named_modules())
    return {p: "Linear" if isinstance(modules[p], nn.Linear) else "Conv1D" for p in paths}


def ternary_delta(updates: dict[str, Tensor], types: dict[str, str], density: float = 0.3, alpha: float = 1.5,
                  name: str = "t") -> tuple[dt.Delta, dict[str, Tensor]]:
    """ComPEFT of dense updates through `compress`; returns the delta and the formula's ΔŴ per module."""
    dense = dt.Delta.from_tensors(name, {p: DenseDelta(w) for p, w in updates.items()}, module_types=types)
    out, _ = compress(dense, "compeft", density=density, alpha=alpha)
    return out, {p: compeft(w, density, alpha) for p, w in updates.items()}


# --- bit packing ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 13, 64, 1001])
@pytest.mark.parametrize("fill", ["none", "one", "all", "random"])
def test_pack_unpack_matches_numpy_little_bit_order(n, fill):
    g = torch.Generator().manual_seed(n)
    bits = torch.zeros(n, dtype=torch.bool)
    if fill == "one" and n:
        bits[int(torch.randint(n, (1,), generator=g))] = True
    elif fill == "all":
        bits[:] = True
    elif fill == "random":
        bits = torch.rand(n, generator=g) < 0.3
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 8)
    assert packed.numpy().tobytes() == np_pack(bits)               # entry i = bit i % 8 of byte i // 8
    assert torch.equal(unpack_bits(packed, n), bits)
    assert not unpack_bits(packed)[n:].any()                        # padding bits are 0


def test_pack_bits_is_row_major_over_a_matrix():
    bits = torch.zeros(3, 5, dtype=torch.bool)
    bits[0, 0] = bits[1, 2] = bits[2, 4] = True                    # flat 0, 7, 14
    assert pack_bits(bits).tolist() == [1 | 1 << 7, 1 << 6]


# --- the stored update ----------------------------------------------------------------------------------------
def test_compeft_result_is_ternary_and_equals_the_formula():
    shapes = {"a": (12, 10), "b": (7, 9), "c": (1, 3), "d": (5, 1)}  # numel 120, 63, 3, 5: not all multiples of 8
    g = torch.Generator().manual_seed(3)
    updates = {p: torch.randn(s, generator=g) for p, s in shapes.items()}
    density, alpha = 0.3, 0.7
    delta, expect = ternary_delta(updates, {p: "Linear" for p in shapes}, density, alpha)
    assert delta.config.kind == "ternary"
    for path, x in updates.items():
        st = delta.state[path]
        assert sorted(st) == ["mask", "scale", "shape", "signs"]
        want = expect[path].flatten()
        # the raw bits, checked against numpy: kept entries (row-major), then their signs in that order
        assert st["mask"].numpy().tobytes() == np_pack(want != 0)
        assert st["signs"].numpy().tobytes() == np_pack(want[want != 0] < 0)
        assert st["scale"].dim() == 0 and st["scale"].dtype == torch.float32
        assert float(st["scale"]) == pytest.approx(alpha * float(x.double().std()), rel=1e-6)
        assert st["shape"].tolist() == list(shapes[path])
        got = delta.tensors()[path]
        assert isinstance(got, SparseDelta) and got.nnz == max(1, round(density * x.numel()))
        assert got.values.abs().unique().numel() == 1                # exactly ±scale
        torch.testing.assert_close(got.to_dense().double(), expect[path], atol=1e-6, rtol=0)


def test_zero_update_and_one_entry_store_and_decode():
    zero = SparseDelta(torch.tensor([0, 5]), torch.zeros(2), (3, 3))   # kept entries that are 0 are dropped
    one = SparseDelta(torch.tensor([8]), torch.tensor([-0.25]), (3, 3))
    full = SparseDelta(torch.arange(9), torch.tensor([0.5, -0.5] * 4 + [0.5]), (3, 3))
    d = dt.Delta.from_tensors("t", {"z": zero, "o": one, "f": full}, kind="ternary")
    assert d.state["z"]["mask"].tolist() == [0, 0] and d.state["z"]["signs"].numel() == 0
    assert d.state["o"]["mask"].tolist() == [0, 1] and d.state["o"]["signs"].tolist() == [1]
    assert d.state["f"]["mask"].tolist() == [255, 1] and d.state["f"]["signs"].tolist() == [0b10101010, 0]
    for path, t in {"z": zero, "o": one, "f": full}.items():
        torch.testing.assert_close(d.tensors()[path].to_dense(), t.to_dense(), atol=0, rtol=0)


# --- files, forward, merge -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # Linear without bias; Conv1D (W stored transposed)
def test_save_read_load_gives_the_direct_logits_and_merges(kind, tmp_path):
    tiny = build_tiny(kind)
    updates = random_updates(tiny.model)
    delta, expect = ternary_delta(updates, module_types(tiny.model, updates))
    delta.write(tmp_path / "t")
    loaded = tiny.fresh()
    dt.load(loaded, tmp_path / "t")
    assert dt.Delta.read(tmp_path / "t").config.kind == "ternary"
    direct = add_update(tiny.fresh(), expect)
    want = tiny.logits(direct)
    torch.testing.assert_close(tiny.logits(loaded), want, atol=1e-5, rtol=0)
    assert not torch.allclose(want, tiny.logits(tiny.fresh()), atol=1e-3)   # the update is not nil
    assert dt.summary(loaded)["t"].params == 0                             # buffers only: nothing to train
    dt.save(loaded, tmp_path / "again", name="t")                            # a loaded ternary delta saves as it came
    again = dt.Delta.read(tmp_path / "again")
    assert again.config == delta.config and all(torch.equal(again.state[p][k], t) for p, st in delta.state.items()
                                                for k, t in st.items())
    before = {n: p.detach().clone() for n, p in loaded.named_parameters()}
    dt.merge(loaded, "t")
    torch.testing.assert_close(tiny.logits(loaded), want, atol=1e-5, rtol=0)
    dt.unmerge(loaded)
    for n, p in loaded.named_parameters():
        torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)


def test_bias_is_stored_and_added(tmp_path):
    tiny = build_tiny("bert")  # Linear layers with bias
    updates = random_updates(tiny.model, suffixes=("query", "value"))
    g = torch.Generator().manual_seed(5)
    biases = {p: torch.randn(w.shape[0], generator=g) * 0.1 for p, w in updates.items()}
    sparse = {p: SparseDelta.from_dense(compeft(w, 0.2, 1.0).float()) for p, w in updates.items()}
    d = dt.Delta.from_tensors("b", sparse, biases, module_types=module_types(tiny.model, updates), kind="ternary")
    d.write(tmp_path / "b")
    loaded = tiny.fresh()
    dt.load(loaded, tmp_path / "b")
    direct = add_update(tiny.fresh(), {p: s.to_dense() for p, s in sparse.items()}, biases)
    torch.testing.assert_close(tiny.logits(loaded), tiny.logits(direct), atol=1e-5, rtol=0)
    dt.merge(loaded, "b")
    torch.testing.assert_close(tiny.logits(loaded), tiny.logits(direct), atol=1e-5, rtol=0)


def test_stacks_with_a_trainable_delta_and_lets_its_gradients_through():
    tiny = build_tiny("llama")
    updates = random_updates(tiny.model)
    delta, expect = ternary_delta(updates, module_types(tiny.model, updates))
    model = tiny.fresh()
    dt.io.files.apply(model, delta, "t")
    dt.attach(model, dt.LoRA(r=2, targets=("q_proj",)), "l")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    dt.activate(model, ["t", "l"])
    with torch.inference_mode():                                    # a ΔW decoded here must not leak into autograd
        tiny.logits(model)
    lora = {p: (m.deltatune["l"].delta_weight(m).to_dense()) for p, m in model.named_modules()
            if hasattr(m, "deltatune") and "l" in m.deltatune}
    both = {p: expect[p] + lora.get(p, 0) for p in expect}
    torch.testing.assert_close(tiny.logits(model), tiny.logits(add_update(tiny.fresh(), both)), atol=1e-5, rtol=0)
    tiny.logits(model, grad=True).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


def test_fresh_piece_is_the_zero_update_and_has_no_parameters():
    tiny = build_tiny("gpt2")
    dt.attach(tiny.model, dt.Ternary(k=5, k_pattern={"c_fc": 9}), "t")
    torch.testing.assert_close(tiny.logits(), tiny.logits(tiny.fresh()), atol=0, rtol=0)
    pieces = {p: m.deltatune["t"] for p, m in tiny.model.named_modules() if hasattr(m, "deltatune")}
    assert {p: pc.k for p, pc in pieces.items() if p.endswith("c_fc")} == {"transformer.h.0.mlp.c_fc": 9,
                                                                           "transformer.h.1.mlp.c_fc": 9}
    assert dt.summary(tiny.model)["t"].params == 0


def test_cached_weight_follows_the_buffers():
    """Forward builds ΔW once; loading another state into the same piece must change the output."""
    tiny = build_tiny("mlp")
    first = random_updates(tiny.model, seed=1, suffixes=("2",))
    second = {p: w.flip(0) for p, w in first.items()}
    types = module_types(tiny.model, first)
    a, ea = ternary_delta(first, types)
    b, eb = ternary_delta(second, types)
    model = tiny.fresh()
    dt.io.files.apply(model, a, "t")
    torch.testing.assert_close(tiny.logits(model), tiny.logits(add_update(tiny.fresh(), ea)), atol=1e-5, rtol=0)
    piece = model[2].deltatune["t"]
    piece.load_state_dict(b.state["2"])
    torch.testing.assert_close(tiny.logits(model), tiny.logits(add_update(tiny.fresh(), eb)), atol=1e-5, rtol=0)
    with torch.no_grad():
        piece.scale.mul_(2.0)                                       # in-place edit: rebuilt as well
    torch.testing.assert_close(tiny.logits(model), tiny.logits(add_update(tiny.fresh(), {p: 2 * w for p, w in eb.items()})),
                               atol=1e-5, rtol=0)


def test_file_size_matches_the_report_and_beats_sparse_storage(tmp_path):
    shapes = {"a": (256, 512), "b": (96, 200), "c": (33, 7)}
    g = torch.Generator().manual_seed(0)
    dense = dt.Delta.from_tensors("d", {p: DenseDelta(torch.randn(s, generator=g)) for p, s in shapes.items()},
                                  module_types={p: "Linear" for p in shapes})
    density = 0.1
    out, report = compress(dense, "compeft", density=density)
    ks = {p: round(density * o * i) for p, (o, i) in shapes.items()}
    assert {m.path: m.bytes for m in report.modules} == {p: ternary_size(o * i, ks[p]) for p, (o, i) in shapes.items()}
    assert all(m.kind == "ternary" and m.ternary_bytes is None for m in report.modules)
    out.write(tmp_path / "t")
    assert tensor_data_bytes(tmp_path / "t" / "delta.safetensors") == report.bytes
    assert json.loads((tmp_path / "t" / "delta.json").read_text())["tensors"]["bytes"] == \
        (tmp_path / "t" / "delta.safetensors").stat().st_size
    # the same updates in the old storage (kind "sparse": int64 index + float32 value per entry)
    old = dt.Delta.from_tensors("d", out.tensors(), module_types=out.module_types)
    assert old.config.kind == "sparse"
    old.write(tmp_path / "s")
    old_data = tensor_data_bytes(tmp_path / "s" / "delta.safetensors")
    assert old_data == sum(sparse_size(k) for k in ks.values())
    expected = old_data / report.bytes                               # ≈ 12·d / ((1 + d) / 8) = 8.7 at d = 0.1
    assert expected == pytest.approx(96 * density / (1 + density), rel=0.02)
    on_disk = (tmp_path / "s" / "delta.safetensors").stat().st_size / (tmp_path / "t" / "delta.safetensors").stat().st_size
    assert 0.9 * expected < on_disk < expected                       # + a JSON header of ~100 bytes a tensor
    for p in shapes:
        torch.testing.assert_close(dt.Delta.read(tmp_path / "t").tensors()[p].to_dense(),
                                   dt.Delta.read(tmp_path / "s").tensors()[p].to_dense(), atol=0, rtol=0)


# --- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    (SparseDelta(torch.tensor([0, 3]), torch.tensor([0.5, -0.25]), (2, 3)), "magnitudes from 0.25 to 0.5"),
    (DenseDelta(torch.ones(2, 3)), "DenseDelta"),
    (SparseDelta(torch.tensor([1]), torch.tensor([float("inf")]), (2, 3)), "not ternary"),
])
def test_non_ternary_updates_are_refused_naming_the_module(bad, match):
    good = SparseDelta(torch.tensor([1]), torch.tensor([0.5]), (2, 3))
    with pytest.raises(UnsupportedError, match=match) as info:
        dt.Delta.from_tensors("t", {"ok": good, "layers.3.mlp": bad}, kind="ternary")
    assert "'layers.3.mlp'" in str(info.value) and "compeft" in str(info.value)


def _corrupt(delta: dt.Delta, path: str, key: str, fn) -> dt.Delta:
    state = {p: dict(st) for p, st in delta.state.items()}
    state[path][key] = fn(state[path][key].clone())
    return dt.Delta(delta.name, delta.config, state, delta.module_types, delta.base)


def _flip_first_set_bits(mask: Tensor) -> Tensor:
    """Clear 9 set bits: the sign-byte count no longer matches the mask (unless the count is tiny)."""
    bits = unpack_bits(mask).clone()
    bits[torch.nonzero(bits).reshape(-1)[:9]] = False
    return pack_bits(bits)


@pytest.mark.parametrize("key, fn, error, match", [
    ("mask", _flip_first_set_bits, CorruptFileError, "is inconsistent"),
    ("signs", lambda s: torch.cat([s, s[:1]]), ShapeMismatchError, "signs"),          # caught by the shape check
    ("shape", lambda s: s.flip(0), ShapeMismatchError, "shape"),
])
def test_damaged_files_are_refused_and_leave_the_model_untouched(key, fn, error, match, tmp_path):
    tiny = build_tiny("llama")
    updates = random_updates(tiny.model, suffixes=("up_proj",))
    delta, _ = ternary_delta(updates, module_types(tiny.model, updates))
    path = next(iter(updates))
    _corrupt(delta, path, key, fn).write(tmp_path / "bad")
    model = tiny.fresh()
    want = tiny.logits(model)
    with pytest.raises(error, match=match):
        dt.load(model, tmp_path / "bad")
    assert not any("deltatune" in n for n, _ in model.named_modules())
    torch.testing.assert_close(tiny.logits(model), want, atol=0, rtol=0)


def test_decode_refuses_padding_bits_and_wrong_mask_length():
    mask = pack_bits(torch.tensor([True, False, True]))             # 3 entries, 1 byte
    with pytest.raises(CorruptFileError, match="padding"):
        decode(mask | torch.tensor([1 << 5], dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8), (1, 3), "m")
    with pytest.raises(CorruptFileError, match="padding"):
        decode(mask, torch.tensor([1 << 4], dtype=torch.uint8), (1, 3), "m")   # sign bit past the 2 kept entries
    with pytest.raises(ShapeMismatchError, match="2-byte mask"):
        decode(torch.zeros(2, dtype=torch.uint8), torch.zeros(0, dtype=torch.uint8), (1, 3), "m")
    index, negative = decode(mask, torch.tensor([2], dtype=torch.uint8), (1, 3), "m")
    assert index.tolist() == [0, 2] and negative.tolist() == [False, True]
