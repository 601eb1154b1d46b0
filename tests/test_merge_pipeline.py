"""The ΔW-space merge pipeline (merging/combine.py) and full-checkpoint merging (merging/full_models.py).

Expected values come from the formulas on the raw saved tensors (s·B·A with s = alpha/r or alpha/√r, DoRA's
m ⊙ (W + sBA)/‖W + sBA‖_row − W, W_base + Σ w_i (W_i − W_base)), never from the code under test; logits are
compared against reference models whose weights were set from those formulas.
"""
from __future__ import annotations

import gc
import math
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import deltatune as dt
from deltatune.core.errors import ConfigError, ShapeMismatchError, UnsupportedError
from deltatune.io.files import apply
from deltatune.io.checkpoints import CheckpointReader
from deltatune.merging import get_method
from deltatune.merging.combine import merge_deltas
from deltatune.merging.full_models import apply_delta, merge_models, merge_models_to_delta
from deltatune.core.tensors import DenseDelta, LowRankDelta, SparseDelta

from conftest import Tiny, build_tiny

ATOL = 1e-5
LLAMA_T = ("q_proj", "v_proj", "down_proj")


# --- helpers that do not trust the code under test -----------------------------------------------------------
def lora_delta(tiny: Tiny, seed: int, **kw) -> dt.Delta:
    """A LoRA delta on a fresh copy of the base with every tensor randomised (B ≠ 0, magnitude ≠ ‖W‖, bias ≠ 0)."""
    model = tiny.fresh()
    kw.setdefault("targets", LLAMA_T)
    torch.manual_seed(seed)
    dt.attach(model, dt.LoRA(r=kw.pop("r", 4), alpha=kw.pop("alpha", 8.0), **kw), "d")
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "deltatune" in name:
                noise = torch.randn(p.shape, generator=g)
                p.mul_(1 + 0.3 * noise) if name.endswith("magnitude") else p.add_(0.3 * noise)
    return dt.Delta.from_model(model, "d")


def weight_view(module: nn.Module) -> Tensor:
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def formula_dw(delta: dt.Delta, path: str, base: nn.Module | None = None) -> Tensor:
    """ΔW from the saved LoRA tensors: s·B·A, with DoRA's row rescaling against the base weight."""
    cfg, st = delta.config, delta.state[path]
    s = cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)
    low = s * (st["lora_B"].double() @ st["lora_A"].double())
    if not cfg.dora:
        return low.float()
    w = weight_view(dict(base.named_modules())[path]).detach().double()
    v = w + low
    return (st["magnitude"].double()[:, None] * v / v.norm(dim=1, keepdim=True) - w).float()


def with_updates(tiny: Tiny, updates: dict[str, Tensor], biases: dict[str, Tensor] | None = None) -> nn.Module:
    """A plain copy of the base with W + ΔW ([out, in] view) and b + Δb written in."""
    ref = tiny.fresh()
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for path, dw in updates.items():
            m = modules[path]
            m.weight.add_(dw if isinstance(m, nn.Linear) else dw.t())
        for path, db in (biases or {}).items():
            modules[path].bias.add_(db)
    return ref


def loaded(tiny: Tiny, delta: dt.Delta) -> nn.Module:
    model = tiny.fresh()
    apply(model, delta, "m")
    return model


def perturbed(tiny: Tiny, seed: int, only_linear: bool = False) -> nn.Module:
    """A 'fine-tuned' copy of the base: every parameter (or only Linear/Conv1D/Embedding ones) moved a little."""
    model = tiny.fresh()
    g = torch.Generator().manual_seed(seed)
    keep = {n for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D", "Embedding")}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not only_linear or name.rpartition(".")[0] in keep:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


# --- ΔW space: exactness --------------------------------------------------------------------------------------
def test_two_loras_weighted_equal_the_formula_dense_and_lowrank() -> None:
    tiny = build_tiny("llama")
    d1, d2 = lora_delta(tiny, 1), lora_delta(tiny, 2, r=2, alpha=3.0)
    want = {p: 0.3 * formula_dw(d1, p) + 0.7 * formula_dw(d2, p) for p in d1.state}
    ta = get_method("task_arithmetic")
    dense = merge_deltas([d1, d2], ta, {"weight": [0.3, 0.7]}, progress=False)
    assert dense.config.kind == "dense"
    for p, w in want.items():
        torch.testing.assert_close(dense.update(p)[0].to_dense(), w, atol=1e-6, rtol=0)
    low = merge_deltas([d1, d2], "task_arithmetic", per_input=[{"weight": 0.3}, {"weight": 0.7}], output="lowrank",
                       rank=6, progress=False)
    assert low.config.kind == "lora"
    for p, w in want.items():
        dw = low.update(p)[0]
        assert isinstance(dw, LowRankDelta) and dw.rank <= 6
        torch.testing.assert_close(dw.to_dense(), w, atol=1e-5, rtol=0)
    torch.testing.assert_close(tiny.logits(loaded(tiny, low)), tiny.logits(with_updates(tiny, want)), atol=ATOL, rtol=0)


def test_linear_method_on_lowrank_inputs_never_densifies(monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = build_tiny("llama")
    d1, d2 = lora_delta(tiny, 1), lora_delta(tiny, 2)
    want = {p: 0.5 * formula_dw(d1, p) - 0.25 * formula_dw(d2, p) for p in d1.state}

    def no_dense(self):  # the exact low-rank path concatenates factors and refactors r x r
        raise AssertionError("a low-rank update was densified")

    monkeypatch.setattr(LowRankDelta, "to_dense", no_dense)
    out = merge_deltas([d1, d2], "linear", {"weight": [0.5, -0.25], "normalize": False}, output="lowrank", rank=8,
                       progress=False)
    monkeypatch.undo()
    for p, w in want.items():
        torch.testing.assert_close(out.update(p)[0].to_dense(), w, atol=1e-5, rtol=0)
    with pytest.raises(AssertionError, match="densified"):  # a non-linear method does need ΔW itself
        monkeypatch.setattr(LowRankDelta, "to_dense", no_dense)
        merge_deltas([d1, d2], "ties", {"density": 0.5}, output="lowrank", rank=8, progress=False)


@pytest.mark.parametrize("option", ["rslora", "dora", "dora-rslora-bias"])
def test_single_delta_weight_one_reproduces_its_logits(option: str, tmp_path: Path) -> None:
    kind = "gpt2" if option.endswith("bias") else "llama"  # gpt2: Conv1D layers with biases
    tiny = build_tiny(kind)
    kw = {"rslora": dict(rslora=True), "dora": dict(dora=True),
          "dora-rslora-bias": dict(dora=True, rslora=True, bias="lora_only", targets=("c_attn", "c_fc"))}[option]
    delta = lora_delta(tiny, 3, **kw)
    y = tiny.logits(loaded(tiny, delta))
    assert (y - tiny.logits()).abs().max() > 1e-3
    bases: list = [tiny.fresh()]
    tiny.fresh().save_pretrained(tmp_path / "base")  # the base as a model directory: DoRA from its weights
    bases.append(tmp_path / "base")
    for base in bases:
        merged = merge_deltas([delta], "task_arithmetic", {"weight": 1.0}, base=base, progress=False)
        torch.testing.assert_close(tiny.logits(loaded(tiny, merged)), y, atol=ATOL, rtol=0)
    if option == "rslora":  # the formula for rsLoRA: s = alpha / √r
        for p in delta.state:
            torch.testing.assert_close(merged.update(p)[0].to_dense(), formula_dw(delta, p), atol=1e-6, rtol=0)


def test_dora_needs_the_base_and_says_so() -> None:
    tiny = build_tiny("llama")
    plain, dora = lora_delta(tiny, 1), lora_delta(tiny, 2, dora=True)
    before = {p: {k: t.clone() for k, t in st.items()} for p, st in dora.state.items()}
    with pytest.raises(UnsupportedError, match=r"input 1 .*pass base="):
        merge_deltas([plain, dora], "task_arithmetic", progress=False)
    assert all(torch.equal(dora.state[p][k], t) for p, st in before.items() for k, t in st.items())


def test_dora_pair_merged_against_base_equals_formula() -> None:
    tiny = build_tiny("llama")
    d1, d2 = lora_delta(tiny, 1, dora=True), lora_delta(tiny, 2, dora=True, rslora=True)
    base = tiny.fresh()
    want = {p: 0.3 * formula_dw(d1, p, base) + 0.7 * formula_dw(d2, p, base) for p in d1.state}
    out = merge_deltas([d1, d2], "task_arithmetic", {"weight": [0.3, 0.7]}, base=base, progress=False)
    for p, w in want.items():
        torch.testing.assert_close(out.update(p)[0].to_dense(), w, atol=1e-5, rtol=0)
    torch.testing.assert_close(tiny.logits(loaded(tiny, out)), tiny.logits(with_updates(tiny, want)), atol=ATOL, rtol=0)


def test_modules_missing_from_an_input_count_as_zero_and_biases_merge() -> None:
    tiny = build_tiny("bert")
    d1 = lora_delta(tiny, 1, targets=("query",), bias="lora_only")
    d2 = lora_delta(tiny, 2, targets=("query", "value"))  # no bias deltas
    ties = get_method("ties")
    out = merge_deltas([d1, d2], ties, {"weight": [1.0, 2.0], "density": [0.5, 0.5]}, base=tiny.fresh(),
                       progress=False)
    for p in d2.state:
        taus = [formula_dw(d1, p) if p in d1.state else torch.zeros(formula_dw(d2, p).shape), formula_dw(d2, p)]
        torch.testing.assert_close(out.update(p)[0].to_dense(), ties(taus, weight=[1.0, 2.0], density=[0.5, 0.5]),
                                   atol=1e-6, rtol=0)
        bias = ties([d1.state[p]["bias"] if p in d1.state else torch.zeros(16), torch.zeros(16)],
                    weight=[1.0, 2.0], density=[0.5, 0.5])
        torch.testing.assert_close(out.update(p)[1], bias, atol=1e-6, rtol=0)  # zero bias where no input has one
    y = tiny.logits(loaded(tiny, out))  # loads: every module with a base bias holds a Δb
    updates = {p: out.update(p)[0].to_dense() for p in out.state}
    torch.testing.assert_close(y, tiny.logits(with_updates(tiny, updates, {p: out.update(p)[1] for p in out.state})),
                               atol=ATOL, rtol=0)


def test_sparse_output_drops_exact_zeros_and_is_exact() -> None:
    tiny = build_tiny("llama")
    d1, d2 = lora_delta(tiny, 1), lora_delta(tiny, 2)
    out = merge_deltas([d1, d2], "ties", {"density": 0.2}, output="sparse", progress=False)
    dense = merge_deltas([d1, d2], "ties", {"density": 0.2}, progress=False)
    assert out.config.kind == "sparse"
    for p in d1.state:
        sp, want = out.update(p)[0], dense.update(p)[0].to_dense()
        assert isinstance(sp, SparseDelta) and sp.nnz == int(torch.count_nonzero(want)) < want.numel() // 2
        torch.testing.assert_close(sp.to_dense(), want, atol=0, rtol=0)


def test_lowrank_energy_picks_the_smallest_rank() -> None:
    tiny = build_tiny("llama")
    d1, d2 = lora_delta(tiny, 1), lora_delta(tiny, 2)
    out = merge_deltas([d1, d2], "ties", {"density": 0.5}, output="lowrank", energy=0.9, progress=False)
    dense = merge_deltas([d1, d2], "ties", {"density": 0.5}, progress=False)
    for p in d1.state:
        w = dense.update(p)[0].to_dense().double()
        s2 = torch.linalg.svdvals(w).square()
        share = torch.cumsum(s2, 0) / s2.sum()
        k = int((share < 0.9).sum()) + 1
        dw = out.update(p)[0]
        assert dw.rank == k
        u, s, vh = torch.linalg.svd(w)
        torch.testing.assert_close(dw.to_dense().double(), (u[:, :k] * s[:k]) @ vh[:k], atol=1e-5, rtol=0)


def test_filters_and_bad_input() -> None:
    tiny = build_tiny("llama")
    d1, d2 = lora_delta(tiny, 1), lora_delta(tiny, 2)
    out = merge_deltas([d1, d2], "task_arithmetic", include=r".*self_attn.*", exclude=r".*layers\.1\..*", progress=False)
    assert sorted(out.state) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    with pytest.raises(ConfigError, match="keep none"):
        merge_deltas([d1, d2], "task_arithmetic", include="nothing", progress=False)
    with pytest.raises(ConfigError, match="density"):
        merge_deltas([d1, d2], "ties", {"density": 2.0}, progress=False)
    with pytest.raises(ConfigError, match=r"per_input\[1\] lacks 'weight'"):
        merge_deltas([d1, d2], "ties", per_input=[{"weight": 1.0}, {}], progress=False)
    with pytest.raises(ConfigError, match="rank"):
        merge_deltas([d1, d2], "ties", output="lowrank", progress=False)
    other = lora_delta(build_tiny("gpt2"), 1, targets=("c_attn",))
    other.state = {"model.layers.0.self_attn.q_proj": other.state["transformer.h.0.attn.c_attn"]}
    other.module_types = {"model.layers.0.self_attn.q_proj": "Linear"}
    with pytest.raises(ShapeMismatchError, match="different shapes"):
        merge_deltas([d1, other], "task_arithmetic", progress=False)


class CountingDelta(dt.Delta):
    """A fake input whose updates are fresh tensors; records, at every request, the modules whose tensors are alive."""

    live: dict[int, str] = {}
    violations: list[str] = []

    def update(self, path, base=None, with_bias=True):
        others = {p for p in CountingDelta.live.values() if p != path}
        if others:
            CountingDelta.violations.append(f"{path} requested while {sorted(others)} alive")
        g = torch.Generator().manual_seed(hash((self.name, path)) % 2**31)
        t = torch.randn(self.state[path]["shape"].tolist(), generator=g)
        CountingDelta.live[id(t)] = path
        weakref.finalize(t, CountingDelta.live.pop, id(t), None)
        return DenseDelta(t), None


def test_one_module_at_a_time() -> None:
    shapes = {f"layers.{i}.proj": torch.tensor([24, 16]) for i in range(6)}
    inputs = [CountingDelta(f"in{j}", dt.Dense(targets=tuple(shapes)), {p: {"shape": s} for p, s in shapes.items()})
              for j in range(3)]
    CountingDelta.live.clear()
    CountingDelta.violations.clear()
    gc.collect()
    for output, kw in (("dense", {}), ("lowrank", {"rank": 2}), ("sparse", {})):
        out = merge_deltas(inputs, "ties", {"density": 0.3}, output=output, progress=False, **kw)
        assert len(out.state) == 6
    assert CountingDelta.violations == []
    assert not CountingDelta.live


# --- peft's add_weighted_adapter as an oracle, and one of its wrong cases -------------------------------------------
peft = pytest.importorskip("peft")


def _peft_pair(tiny: Tiny, **kw):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny.fresh(), LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_T), **kw), "t1")
    model.add_adapter("t2", LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_T), **kw))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _ours_from_peft(model, tmp_path: Path, weights: list[float], tiny: Tiny) -> Tensor:
    model.save_pretrained(tmp_path / "peft", selected_adapters=["t1", "t2"])
    dirs = [tmp_path / "peft" / "t1", tmp_path / "peft" / "t2"]
    merged = merge_deltas(dirs, "task_arithmetic", {"weight": weights}, output="lowrank", rank=8, progress=False)
    return tiny.logits(loaded(tiny, merged))


def _formula_logits(model, tiny: Tiny, weights: list[float]) -> Tensor:
    updates = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "t1" in module.lora_A:
            updates[name] = sum(w * module.scaling[ad] * (module.lora_B[ad].weight @ module.lora_A[ad].weight)
                                for ad, w in zip(("t1", "t2"), weights)).detach()
    return tiny.logits(with_updates(tiny, updates))


def test_matches_peft_add_weighted_adapter_where_peft_is_right(tmp_path: Path) -> None:
    tiny = build_tiny("llama")
    model = _peft_pair(tiny)
    model.add_weighted_adapter(["t1", "t2"], [0.3, 0.7], "ab", combination_type="cat")
    model.set_adapter("ab")
    want = _formula_logits(model, tiny, [0.3, 0.7])
    torch.testing.assert_close(tiny.logits(model), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(_ours_from_peft(model, tmp_path, [0.3, 0.7], tiny), want, atol=ATOL, rtol=0)


def test_peft_add_weighted_adapter_rescales_rslora_merges_and_we_do_not(tmp_path: Path) -> None:
    """peft copies use_rslora into the merged adapter while setting alpha = r, so the merged update is scaled by
    an extra √r (here √8 for the concatenated rank 8); ours equals 0.3·ΔW_a + 0.7·ΔW_b."""
    tiny = build_tiny("llama")
    model = _peft_pair(tiny, use_rslora=True)
    model.add_weighted_adapter(["t1", "t2"], [0.3, 0.7], "ab", combination_type="cat")
    model.set_adapter("ab")
    want = _formula_logits(model, tiny, [0.3, 0.7])
    base = tiny.logits()
    assert (tiny.logits(model) - want).abs().max() > 100 * ATOL  # peft is wrong here
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    ratio = q.get_delta_weight("ab").norm() / (0.3 * q.get_delta_weight("t1") + 0.7 * q.get_delta_weight("t2")).norm()
    assert float(ratio) == pytest.approx(math.sqrt(8), rel=1e-4)
    ours = _ours_from_peft(model, tmp_path, [0.3, 0.7], tiny)
    torch.testing.assert_close(ours, want, atol=ATOL, rtol=0)
    assert (ours - base).abs().max() > 1e-3


# --- full checkpoints ------------------------------------------------------------------------------------------
@pytest.fixture
def llama_dirs(tmp_path: Path) -> tuple[Tiny, Path, list[Path], list[nn.Module]]:
    tiny = build_tiny("llama")
    tiny.fresh().save_pretrained(tmp_path / "base")
    fts = [perturbed(tiny, s) for s in (1, 2)]
    for i, m in enumerate(fts):
        m.save_pretrained(tmp_path / f"ft{i}")
    return tiny, tmp_path / "base", [tmp_path / "ft0", tmp_path / "ft1"], fts


def _reload(tiny: Tiny, path: Path) -> nn.Module:
    return type(tiny.model).from_pretrained(path).eval()


def test_merge_models_equals_formula_sharded(llama_dirs, tmp_path: Path) -> None:
    tiny, base, dirs, fts = llama_dirs
    out = merge_models(base, dirs, "task_arithmetic", {"weight": [0.3, 0.7]}, tmp_path / "out", max_shard_bytes=4096,
                       progress=False)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert (out / "config.json").is_file()
    merged = _reload(tiny, out).state_dict()
    sd0, sd1, sd2 = tiny.fresh().state_dict(), fts[0].state_dict(), fts[1].state_dict()
    for k, w in sd0.items():
        torch.testing.assert_close(merged[k], w + 0.3 * (sd1[k] - w) + 0.7 * (sd2[k] - w), atol=1e-6, rtol=0)


def test_merge_models_filters_copy_the_base_and_keep_bf16(tmp_path: Path) -> None:
    tiny = build_tiny("llama")
    tiny.fresh().to(torch.bfloat16).save_pretrained(tmp_path / "base")
    fts = [perturbed(tiny, s).to(torch.bfloat16) for s in (1, 2)]
    for i, m in enumerate(fts):
        m.save_pretrained(tmp_path / f"ft{i}")
    out = merge_models(tmp_path / "base", [tmp_path / "ft0", tmp_path / "ft1"], "ties", {"density": 0.5},
                       tmp_path / "out", exclude=r".*mlp.*|lm_head", progress=False)
    got, base = CheckpointReader(out), CheckpointReader(tmp_path / "base")
    readers = [CheckpointReader(tmp_path / f"ft{i}") for i in (0, 1)]
    ties = get_method("ties")
    for key in base.keys():
        assert got.get(key).dtype == torch.bfloat16
        if ".mlp." in key or key.startswith("lm_head"):
            assert torch.equal(got.get(key), base.get(key))
            continue
        w = base.get(key).float()
        taus = [r.get(key).float() - w for r in readers]
        want = (w + ties(taus, density=0.5)).to(torch.bfloat16)
        assert torch.equal(got.get(key), want), key


def _write(dirpath: Path, tensors: dict[str, Tensor]) -> Path:
    dirpath.mkdir(parents=True)
    save_file(tensors, str(dirpath / "model.safetensors"))
    return dirpath


def test_merge_models_copies_integer_tensors_and_rejects_mismatches(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(4, 3, generator=g), "pos": torch.arange(5)}
    b = _write(tmp_path / "base", base)
    i1 = _write(tmp_path / "i1", {"a.weight": base["a.weight"] + 1, "pos": torch.arange(5) * 7})
    with pytest.warns(UserWarning, match="module layouts"):
        out = merge_models(b, [i1], "task_arithmetic", {"weight": 0.5}, tmp_path / "out", progress=False)
    got = CheckpointReader(out)
    torch.testing.assert_close(got.get("a.weight"), base["a.weight"] + 0.5, atol=1e-6, rtol=0)
    assert torch.equal(got.get("pos"), base["pos"])
    bad = _write(tmp_path / "bad", {"a.weight": torch.zeros(4, 4), "pos": torch.arange(5)})
    lacking = _write(tmp_path / "lacking", {"pos": torch.arange(5)})
    extra = _write(tmp_path / "extra", {"a.weight": torch.zeros(4, 3), "pos": torch.arange(5), "b.weight": torch.ones(2)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ShapeMismatchError, match=r"'a.weight' has shape \[4, 4\] in input 1"):
            merge_models(b, [i1, bad], "task_arithmetic", None, tmp_path / "o2", progress=False)
        with pytest.raises(ShapeMismatchError, match="lacks the tensor 'a.weight'"):
            merge_models(b, [lacking], "task_arithmetic", None, tmp_path / "o2", progress=False)
        with pytest.raises(ShapeMismatchError, match="tensor\\(s\\) the base lacks"):
            merge_models(b, [extra], "task_arithmetic", None, tmp_path / "o2", progress=False)
        assert not (tmp_path / "o2").exists()
        out = merge_models(b, [i1, bad], "task_arithmetic", None, tmp_path / "o3", exclude="a", progress=False)
        assert torch.equal(CheckpointReader(out).get("a.weight"), base["a.weight"])


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive at any moment among tensors made by torch ops (or `track`ed) in the block."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors alive on it]
        self.now = self.peak = 0

    def track(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0:
            return
        entry = self.live.get(ptr)
        if entry is None:
            entry = self.live[ptr] = [storage.nbytes(), 0]
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        weakref.finalize(t, self._drop, ptr)

    def _drop(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[ptr]
            self.now -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self.track(t)
        return out


class TrackedReader(CheckpointReader):
    def __init__(self, path, mode: LiveBytes) -> None:
        super().__init__(path)
        self.mode = mode

    def get(self, key: str) -> Tensor:
        t = super().get(key)
        self.mode.track(t)
        return t


def test_merge_models_holds_one_key_per_input(tmp_path: Path) -> None:
    """Live tensors during a streamed merge stay within a few keys per input plus one shard, far below a model."""
    g = torch.Generator().manual_seed(0)
    keys = [f"layers.{i}.proj.weight" for i in range(60)]
    base = {k: torch.randn(32, 32, generator=g) for k in keys}  # 4 KiB per key, 240 KiB per model
    _write(tmp_path / "base", base)
    for j in range(2):
        _write(tmp_path / f"in{j}", {k: w + 0.1 * torch.randn(32, 32, generator=g) for k, w in base.items()})
    model_bytes, key_bytes, shard = 60 * 4096, 4096, 8192
    mode = LiveBytes()
    with warnings.catch_warnings(), mode:
        warnings.simplefilter("ignore")
        merge_models(TrackedReader(tmp_path / "base", mode), [TrackedReader(tmp_path / f"in{j}", mode) for j in range(2)],
                     "ties", {"density": 0.5}, tmp_path / "out", max_shard_bytes=shard, progress=False)
    assert len(mode.live) == 0 or mode.now <= shard
    bound = shard + 6 * (2 + 2) * key_bytes  # the inputs' keys, the base key, τs, TIES's working tensors, output
    assert key_bytes < mode.peak <= bound < model_bytes / 2, (mode.peak, bound)


def test_apply_delta_writes_w_plus_dw(tmp_path: Path) -> None:
    for kind, kw in (("llama", dict(dora=True)), ("gpt2", dict(targets=("c_attn", "c_fc"), bias="lora_only"))):
        tiny = build_tiny(kind)
        tiny.fresh().save_pretrained(tmp_path / kind / "base")
        delta = lora_delta(tiny, 1, **kw)
        out = apply_delta(tmp_path / kind / "base", delta, tmp_path / kind / "out", max_shard_bytes=3000, progress=False)
        torch.testing.assert_close(tiny.logits(_reload(tiny, out)), tiny.logits(loaded(tiny, delta)), atol=ATOL, rtol=0)
    tied = lora_delta(build_tiny("gpt2"), 1, targets=("wte",))
    with pytest.raises(UnsupportedError, match="tied"):
        apply_delta(tmp_path / "gpt2" / "base", tied, tmp_path / "tied", progress=False)


def test_delta_inputs_merge_the_same_as_a_checkpoint_or_as_a_delta(tmp_path: Path) -> None:
    """dare_ties (random) on Conv1D: merge_models over deltas == merge_deltas then apply_delta, bit for bit masks."""
    tiny = build_tiny("gpt2")
    tiny.fresh().save_pretrained(tmp_path / "base")
    kw = dict(targets=("c_attn", "c_proj"), bias="lora_only")
    d1, d2 = lora_delta(tiny, 1, **kw), lora_delta(tiny, 2, targets=("c_attn",))
    params = {"density": 0.5, "seed": 3, "weight": [1.0, 0.5]}
    out = merge_models(tmp_path / "base", [d1, d2], "dare_ties", params, tmp_path / "m", progress=False)
    merged = merge_deltas([d1, d2], "dare_ties", params, base=tmp_path / "base", progress=False)
    y = tiny.logits(loaded(tiny, merged))
    assert (y - tiny.logits()).abs().max() > 1e-3
    torch.testing.assert_close(tiny.logits(_reload(tiny, out)), y, atol=ATOL, rtol=0)


def test_models_to_delta_equals_merged_model(tmp_path: Path) -> None:
    tiny = build_tiny("gpt2")  # Conv1D, biases, wte tied to lm_head
    tiny.fresh().save_pretrained(tmp_path / "base")
    for i, s in enumerate((1, 2)):
        perturbed(tiny, s, only_linear=True).save_pretrained(tmp_path / f"ft{i}")
    dirs = [tmp_path / "ft0", tmp_path / "ft1"]
    out = merge_models(tmp_path / "base", dirs, "ties", {"density": 0.4}, tmp_path / "m", progress=False)
    delta = merge_models_to_delta(tmp_path / "base", dirs, "ties", {"density": 0.4}, progress=False)
    assert delta.config.kind == "dense" and {"lm_head", "transformer.wte"} <= set(delta.state)
    torch.testing.assert_close(tiny.logits(loaded(tiny, delta)), tiny.logits(_reload(tiny, out)), atol=ATOL, rtol=0)
    low = merge_models_to_delta(tmp_path / "base", dirs, "ties", {"density": 0.4}, output="lowrank", rank=2,
                                exclude="lm_head|transformer.w.e", progress=False)
    assert low.config.kind == "lora" and all(low.update(p)[0].rank <= 2 for p in low.state)


def test_dora_update_from_bfloat16_files_is_computed_in_float32() -> None:
    """Half-precision adapter files: ΔW = m ⊙ (W + sBA)/‖·‖ − W must not cancel in bfloat16."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 48, generator=g, dtype=torch.float64)
    a, b = torch.randn(4, 48, generator=g, dtype=torch.float64), torch.randn(32, 4, generator=g, dtype=torch.float64)
    mag = torch.linalg.vector_norm(w, dim=1) * (1 + 0.05 * torch.rand(32, generator=g, dtype=torch.float64))
    cfg = dt.LoRA(r=4, alpha=1.0, dora=True, targets=("x",))
    state = {"lora_A": a.bfloat16(), "lora_B": b.bfloat16(), "magnitude": mag.bfloat16()}
    delta = dt.Delta("d", cfg, {"x": state}, {"x": "Linear"})
    got, _ = delta.update("x", lambda path: (w.float(), None))
    # reference in float64 from the same (bf16-rounded) stored numbers
    a64, b64, m64 = (state[k].double() for k in ("lora_A", "lora_B", "magnitude"))
    merged = w + cfg.scale * (b64 @ a64)
    want = (m64 / torch.linalg.vector_norm(merged, dim=1))[:, None] * merged - w
    rel = float(torch.linalg.vector_norm(got.to_dense().double() - want) / torch.linalg.vector_norm(want))
    assert got.to_dense().dtype == torch.float32 and rel < 1e-5, rel


@pytest.mark.parametrize("storage", ["dense", "sparse"])
def test_merged_file_with_bias_updates_on_some_modules_loads(storage: str, tmp_path: Path) -> None:
    """A result holding Δb only where an input changed the bias loads: the other modules' Δb are zero."""
    tiny = build_tiny("gpt2")
    paths = [p for p, m in tiny.model.named_modules() if type(m).__name__ == "Conv1D"]
    g = torch.Generator().manual_seed(5)
    updates = {p: torch.randn(weight_view(m).shape, generator=g) * 0.01
               for p, m in tiny.model.named_modules() if p in paths}
    bias_path = paths[0]
    db = torch.randn(dict(tiny.model.named_modules())[bias_path].bias.shape, generator=g) * 0.01
    tensors = {p: DenseDelta(u) if storage == "dense" else SparseDelta.from_dense(u) for p, u in updates.items()}
    delta = dt.Delta.from_tensors("m", tensors, {bias_path: db}, module_types={p: "Conv1D" for p in paths})
    delta.write(tmp_path / "m")
    got = loaded(tiny, dt.Delta.read(tmp_path / "m"))
    want = with_updates(tiny, updates, {bias_path: db})
    with torch.no_grad():
        torch.testing.assert_close(got(**tiny.inputs).logits, want(**tiny.inputs).logits, atol=1e-5, rtol=1e-5)
