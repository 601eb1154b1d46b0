"""Compression (ComPEFT, SVD rank reduction, to_lora) and extraction (two checkpoints -> LoRA), all numeric.

Expected values come from direct implementations here — ComPEFT's formula on the raw tensors, singular values of
the known ΔW (Eckart–Young: the best rank-k error is the norm of the tail singular values), the tuned model's own
logits — never from the code under test.
"""
from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import app
from deltatune.core.errors import ConfigError, DeltaNotFoundError, ShapeMismatchError, UnsupportedError
from deltatune.merging.compress import compress, to_lora
from deltatune.merging.extract import extract
from deltatune.core.tensors import DenseDelta, LowRankDelta, SparseDelta

from conftest import Tiny, build_tiny, compeft_oracle

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]


# --- oracles and helpers that do not use the code under test ---------------------------------------------


def tail_error(dw: Tensor, k: int) -> float:
    """Eckart–Young: ‖ΔW − best rank-k‖_F / ‖ΔW‖_F = sqrt(Σ_{i>k} s_i²) / sqrt(Σ s_i²)."""
    s = torch.linalg.svdvals(dw.double())
    return float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())


def energy_rank(dw: Tensor, energy: float) -> int:
    s2 = torch.linalg.svdvals(dw.double()).square()
    share = (torch.cumsum(s2, 0) / s2.sum()).tolist()
    return next(i + 1 for i, v in enumerate(share) if v >= energy)


def weight_view(module: nn.Module) -> Tensor:
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def add_update(model: nn.Module, updates: dict[str, Tensor]) -> nn.Module:
    """W += ΔW ([out, in] view) on each module, in the module's own storage layout."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path, dw in updates.items():
            m = modules[path]
            m.weight += (dw if isinstance(m, nn.Linear) else dw.t()).to(m.weight.dtype)
    return model


def lora_model(kind: str, seed: int = 7, **cfg) -> tuple[Tiny, dict[str, Tensor]]:
    """A tiny model with a LoRA delta 'a' whose B factors are random (non-zero update); returns ΔW per module."""
    tiny = build_tiny(kind)
    cfg = {"r": 4, "alpha": 8.0, **cfg}
    dt.attach(tiny.model, dt.LoRA(**cfg), "a")
    g = torch.Generator().manual_seed(seed)
    updates = {}
    for path, module in tiny.model.named_modules():
        slot = module._modules.get("deltatune")
        if slot is not None and "a" in slot:
            piece = slot["a"]
            with torch.no_grad():
                piece.lora_B.copy_(torch.randn(piece.lora_B.shape, generator=g) * 0.3)
                if not piece.lora_A.any():  # embeddings start with A = 0
                    piece.lora_A.copy_(torch.randn(piece.lora_A.shape, generator=g) * 0.3)
                if hasattr(piece, "magnitude"):
                    piece.magnitude.mul_(1 + 0.1 * torch.rand(piece.magnitude.shape, generator=g))
            updates[path] = piece.cfg.scale * piece.lora_B.detach().double() @ piece.lora_A.detach().double()
    return tiny, updates


def dense_delta(shapes: dict[str, tuple[int, int]], seed: int = 0) -> dt.Delta:
    g = torch.Generator().manual_seed(seed)
    return dt.Delta.from_tensors("d", {p: DenseDelta(torch.randn(s, generator=g)) for p, s in shapes.items()},
                                 module_types={p: "Linear" for p in shapes})


# --- ComPEFT ---------------------------------------------------------------------------------------------
def test_compeft_on_delta_w_matches_formula_and_counts_bytes():
    shapes = {"a": (12, 10), "b": (7, 9)}
    delta = dense_delta(shapes)
    density, alpha = 0.3, 0.5
    out, report = compress(delta, "compeft", density=density, alpha=alpha)
    assert out.config.kind == "ternary"
    rows = {m.path: m for m in report.modules}
    err2 = norm2 = 0.0
    for path, (o, i) in shapes.items():
        x = delta.state[path]["delta"]
        expect = compeft_oracle(x, density, alpha)
        got = out.tensors()[path]
        assert isinstance(got, SparseDelta)
        torch.testing.assert_close(got.to_dense().double(), expect, atol=1e-6, rtol=0)
        k = round(density * o * i)
        assert rows[path].nnz == k
        assert rows[path].original_bytes == o * i * 4                # float32 dense ΔW
        assert rows[path].bytes == math.ceil(o * i / 8) + math.ceil(k / 8) + 4 + 2 * 8  # mask, sign bits, scale, shape
        assert rows[path].ternary_bytes is None                       # the ternary encoding is what is stored
        rel = float(torch.linalg.vector_norm(x.double() - expect) / torch.linalg.vector_norm(x.double()))
        assert rows[path].rel_error == pytest.approx(rel, rel=1e-6)
        err2 += float(torch.linalg.vector_norm(x.double() - expect)) ** 2
        norm2 += float(torch.linalg.vector_norm(x.double())) ** 2
    assert report.rel_error == pytest.approx(math.sqrt(err2 / norm2), rel=1e-6)
    assert report.ratio == pytest.approx(sum(o * i * 4 for o, i in shapes.values()) / report.bytes)


def test_compeft_on_factors_matches_formula_and_stays_lora():
    tiny, _ = lora_model("llama")
    delta = dt.Delta.from_model(tiny.model, "a")
    density, alpha = 0.25, 2.0
    out, report = compress(delta, "compeft", density=density, alpha=alpha, on="factors")
    assert out.config.kind == "lora"
    for path, st in delta.state.items():
        a, b = st["lora_A"], st["lora_B"]
        expect = 2.0 * compeft_oracle(b, density, alpha) @ compeft_oracle(a, density, alpha)  # s = alpha/r = 2
        got = out.tensors()[path]
        assert isinstance(got, LowRankDelta) and got.rank == 4
        torch.testing.assert_close(got.to_dense().double(), expect, atol=1e-6, rtol=0)
        assert (got.A != 0).sum() <= round(density * a.numel())
    assert all(m.bytes == m.original_bytes for m in report.modules)   # same factor shapes in the file
    assert report.ternary_bytes is not None and report.ternary_bytes < report.bytes / 5


def test_compeft_on_factors_needs_low_rank_updates():
    with pytest.raises(ConfigError, match="on='delta_w'"):
        compress(dense_delta({"a": (4, 4)}), "compeft", on="factors")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_compressed_delta_loads_and_runs(kind, tmp_path):
    """Logits of the loaded ComPEFT delta equal the base with the formula's ΔŴ added to its weights."""
    tiny, updates = lora_model(kind)
    dt.save(tiny.model, tmp_path / "lora", name="a")
    out, _ = compress(dt.Delta.read(tmp_path / "lora"), "compeft", density=0.3, alpha=1.5)
    out.write(tmp_path / "small")
    loaded = tiny.fresh()
    dt.load(loaded, tmp_path / "small")
    direct = add_update(tiny.fresh(), {p: compeft_oracle(dw, 0.3, 1.5) for p, dw in updates.items()})
    torch.testing.assert_close(tiny.logits(loaded), tiny.logits(direct), atol=1e-5, rtol=0)
    assert not torch.allclose(tiny.logits(loaded), tiny.logits(tiny.fresh()), atol=1e-3)  # the update is not nil


def test_compressing_an_embedding_to_sparse_is_refused():
    tiny, _ = lora_model("llama", targets=("embed_tokens",))
    with pytest.raises(UnsupportedError, match="adapt only Linear, Conv1D modules — store it low-rank"):
        compress(dt.Delta.from_model(tiny.model, "a"), "compeft")


@pytest.mark.parametrize("bad, match", [
    (dict(density=0.0), "density"), (dict(density=1.5), "density"), (dict(alpha=0.0), "alpha"),
    (dict(alpha=float("nan")), "alpha"), (dict(on="rows"), "on must be"), (dict(rank=2), "method='svd'"),
    (dict(method="zip"), "unknown compression method"), (dict(method="svd"), "give a rank"),
    (dict(method="svd", rank=0), "positive integer"), (dict(method="svd", rank=2, energy=0.9), "not both"),
    (dict(method="svd", energy=1.5), "energy"),
])
def test_compress_rejects_bad_options(bad, match):
    delta = dense_delta({"a": (4, 4)})
    before = {k: v.clone() for k, v in delta.state["a"].items()}
    with pytest.raises(ConfigError, match=match):
        compress(delta, **bad)
    assert all(torch.equal(before[k], delta.state["a"][k]) for k in before)


# --- SVD rank reduction and to_lora --------------------------------------------------------------------------
def test_svd_rank_reduction_error_is_the_singular_value_tail():
    tiny, updates = lora_model("llama", r=6, alpha=6.0)
    out, report = compress(dt.Delta.from_model(tiny.model, "a"), "svd", rank=2)
    assert out.config.kind == "lora" and out.config.r == 2
    rows = {m.path: m for m in report.modules}
    for path, dw in updates.items():
        got = out.tensors()[path]
        assert got.rank == 2 and rows[path].rank == 2
        expect = tail_error(dw, 2)
        measured = float(torch.linalg.vector_norm(dw - got.to_dense().double()) / torch.linalg.vector_norm(dw))
        assert measured == pytest.approx(expect, rel=1e-4)
        assert rows[path].rel_error == pytest.approx(expect, rel=1e-4)
        assert rows[path].bytes == 2 * sum(dw.shape) * 4 < rows[path].original_bytes


@pytest.mark.parametrize("energy, rank", [(0.75, 1), (0.9, 2), (0.95, 3), (0.99, 4), (1.0, 4)])
def test_energy_threshold_picks_the_rank(energy, rank):
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(10, 4, generator=g)).Q
    v = torch.linalg.qr(torch.randn(8, 4, generator=g)).Q
    s = torch.tensor([4.0, 2.0, 1.0, 0.5])  # shares of Σs²: 0.753, 0.941, 0.988, 1
    dw = u @ torch.diag(s) @ v.t()
    delta = dt.Delta.from_tensors("d", {"m": DenseDelta(dw)}, module_types={"m": "Linear"})
    out, report = compress(delta, "svd", energy=energy)
    assert report.modules[0].rank == rank == out.tensors()["m"].rank
    tail = math.sqrt(float(s[rank:].square().sum()) / float(s.square().sum()))
    assert report.modules[0].rel_error == pytest.approx(tail, abs=1e-5)


def test_to_lora_is_lossless_for_dense_and_sparse():
    g = torch.Generator().manual_seed(1)
    low = torch.randn(12, 3, generator=g) @ torch.randn(3, 10, generator=g)
    sparse = SparseDelta.from_dense(torch.randn(9, 7, generator=g) * (torch.rand(9, 7, generator=g) < 0.3))
    for update, rank in ((DenseDelta(low), 3), (sparse, 7)):
        delta = dt.Delta.from_tensors("d", {"m": update}, module_types={"m": "Linear"})
        out, report = to_lora(delta)
        assert out.config.kind == "lora" and report.modules[0].rank == rank
        torch.testing.assert_close(out.tensors()["m"].to_dense(), update.to_dense(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("option", [dict(dora=True), dict(init="pissa")])
def test_to_lora_turns_dora_and_weight_inits_into_plain_lora(option, tmp_path):
    tiny, _ = lora_model("llama", r=2, alpha=4.0, **option)
    with torch.no_grad():  # move A away from its init so a weight-derived init's offset matters
        for module in tiny.model.modules():
            slot = module._modules.get("deltatune")
            if slot is not None and "a" in slot:
                slot["a"].lora_A.add_(0.05)
    delta = dt.Delta.from_model(tiny.model, "a")
    if option.get("dora"):
        with pytest.raises(UnsupportedError, match="base"):
            to_lora(delta)
    tiny.fresh().save_pretrained(tmp_path / "base")
    for base in (tiny.model, tmp_path / "base"):       # a model, or a model directory read tensor by tensor
        out, report = to_lora(delta, base=base)
        assert out.config.kind == "lora" and not out.config.dora
        assert all(set(st) == {"lora_A", "lora_B"} for st in out.state.values())
        assert report.rel_error < 1e-5
        loaded = tiny.fresh()
        out.write(tmp_path / "plain")
        dt.load(loaded, tmp_path / "plain")
        torch.testing.assert_close(tiny.logits(loaded), tiny.logits(tiny.model), atol=1e-5, rtol=0)


# --- extraction --------------------------------------------------------------------------------------------
def _tuned_pair(kind: str, root: Path, rank: int = 2, seed: int = 5) -> tuple[Tiny, nn.Module, dict[str, Tensor]]:
    """base saved to root/base; tuned = base + a known rank-`rank` ΔW on every linear non-head module, a changed
    position/token embedding and (GPT-2) changed biases, saved to root/tuned."""
    tiny = build_tiny(kind)
    tiny.model.save_pretrained(root / "base")
    tuned = copy.deepcopy(tiny.model)
    g = torch.Generator().manual_seed(seed)
    updates = {}
    heads = {"lm_head"}
    with torch.no_grad():
        for path, m in tuned.named_modules():
            if isinstance(m, (nn.Linear, Conv1D)) and path not in heads:
                o, i = weight_view(m).shape
                scale = torch.tensor([1.0, 0.6, 0.3, 0.1][:rank])
                updates[path] = (torch.randn(o, rank, generator=g) * scale) @ torch.randn(rank, i, generator=g) * 0.1
                if m.bias is not None:
                    m.bias += 0.01 * torch.randn(m.bias.shape, generator=g)
        add_update(tuned, updates)
        emb = tuned.get_input_embeddings()
        emb.weight += 0.02 * torch.randn(emb.weight.shape, generator=g)
    tuned.save_pretrained(root / "tuned")
    return tiny, tuned, {p: u.double() for p, u in updates.items()}


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_pair")
    return (root, *_tuned_pair("llama", root))


def test_extract_llama_recovers_the_tuned_model(llama_pair, tmp_path):
    root, tiny, tuned, updates = llama_pair
    delta, report = extract(root / "base", root / "tuned", rank=2, dense=("embed_tokens",))
    assert delta.config.kind == "lora" and delta.config.modules_to_save == ("model.embed_tokens",)
    rows = {m.path: m for m in report.modules}
    assert rows["model.embed_tokens"].kind == "dense"
    assert {p for p, m in rows.items() if m.kind == "lora"} == set(updates)
    assert all(rows[p].rank == 2 and rows[p].rel_error < 1e-5 for p in updates)
    delta.write(tmp_path / "x")
    loaded = tiny.fresh()
    dt.load(loaded, tmp_path / "x")
    torch.testing.assert_close(tiny.logits(loaded), tiny.logits(tuned), atol=1e-4, rtol=0)
    assert not torch.allclose(tiny.logits(tuned), tiny.logits(tiny.fresh()), atol=1e-2)


def test_extract_lower_rank_reports_the_svd_tail(llama_pair):
    root, _, _, updates = llama_pair
    delta, report = extract(root / "base", root / "tuned", rank=1)
    rows = {m.path: m for m in report.modules}
    for path, dw in updates.items():
        assert rows[path].rank == 1 == delta.tensors()[path].rank
        assert rows[path].rel_error == pytest.approx(tail_error(dw, 1), rel=1e-4)
    # the embedding changed but was neither targeted nor kept dense: the report says so
    assert any(n.startswith("model.embed_tokens.weight: changed") for n in report.notes)


def test_extract_energy_threshold_picks_each_modules_rank(llama_pair):
    root, _, _, updates = llama_pair
    shares = sorted(float(torch.linalg.svdvals(dw)[0] ** 2 / dw.square().sum()) for dw in updates.values())
    energy = (shares[len(shares) // 2 - 1] + shares[len(shares) // 2]) / 2   # between two modules' rank-1 shares
    expect = {p: energy_rank(dw, energy) for p, dw in updates.items()}
    assert set(expect.values()) == {1, 2}  # the threshold separates the modules, so the test can fail
    _, report = extract(root / "base", root / "tuned", energy=energy)
    assert {m.path: m.rank for m in report.modules} == expect


def test_extract_gpt2_conv1d(tmp_path):
    tiny, tuned, updates = _tuned_pair("gpt2", tmp_path)
    delta, report = extract(tmp_path / "base", tmp_path / "tuned", rank=2, dense=("wte",))
    assert {delta.module_types[p] for p in updates} == {"Conv1D"}
    assert delta.module_types["transformer.wte"] == "Embedding"
    assert any("tied to ['lm_head']" in n for n in report.notes)   # GPT-2's head shares wte's weight
    for path, dw in updates.items():
        got, db = delta.update(path)                              # (the dense wte would need base=)
        torch.testing.assert_close(got.to_dense().double(), dw, atol=1e-5, rtol=0)
        assert db is not None                                     # changed biases travel as Δb
    delta.write(tmp_path / "x")
    loaded = tiny.fresh()
    dt.load(loaded, tmp_path / "x")
    # the tuned wte also feeds the tied head there; compare through a tuned model whose head keeps base weights
    reference = copy.deepcopy(tuned)
    reference.lm_head.weight = nn.Parameter(tiny.fresh().lm_head.weight.detach().clone())
    torch.testing.assert_close(tiny.logits(loaded), tiny.logits(reference), atol=1e-4, rtol=0)


def test_extract_skips_identical_modules_and_the_file_reads_back(tmp_path):
    """Modules identical in base and tuned are left out of the delta, and of its recorded base shapes, so the
    written delta reads and loads (it was refused as naming modules it does not list)."""
    tiny, tuned, updates = _tuned_pair("llama", tmp_path)
    untouched = sorted(updates)[:3]
    base = tiny.fresh()
    with torch.no_grad():
        for p in untouched:
            tuned.get_submodule(p).weight.copy_(base.get_submodule(p).weight)
    tuned.save_pretrained(tmp_path / "tuned")
    delta, report = extract(tmp_path / "base", tmp_path / "tuned", rank=2, dense=("embed_tokens",))
    assert all(f"{p}: identical in base and tuned; not in the delta" in report.notes for p in untouched)
    assert not set(untouched) & set(delta.state) and set(delta.base["weight_shapes"]) <= set(delta.state)
    delta.write(tmp_path / "x")
    loaded = tiny.fresh()
    dt.load(loaded, tmp_path / "x")
    torch.testing.assert_close(tiny.logits(loaded), tiny.logits(tuned), atol=1e-4, rtol=0)


def _wide_llama(path: Path) -> None:
    """A tiny llama with another MLP width: the same tensor names as the fixtures' llama, other shapes."""
    from transformers import LlamaForCausalLM

    cfg = copy.deepcopy(build_tiny("llama").model.config)
    cfg.intermediate_size = 24
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)


def test_extract_rejects_bad_input(llama_pair, tmp_path):
    root, *_ = llama_pair
    _wide_llama(tmp_path / "wide")
    with pytest.raises(ShapeMismatchError, match=r"mlp\.gate_proj\.weight: base \[32, 16\] vs tuned \[24, 16\]"):
        extract(root / "base", tmp_path / "wide", rank=2)
    with pytest.raises(DeltaNotFoundError, match="nope"):
        extract(tmp_path / "nope", root / "tuned", rank=2)
    with pytest.raises(ConfigError, match="positive integer"):
        extract(root / "base", root / "tuned", rank=0)
    with pytest.raises(ConfigError, match="not both"):
        extract(root / "base", root / "tuned", rank=2, energy=0.5)
    with pytest.raises(ConfigError, match="give a rank"):
        extract(root / "base", root / "tuned")
    with pytest.raises(ConfigError, match="match no"):
        extract(root / "base", root / "tuned", rank=2, dense=("embeddings_typo",))
    with pytest.raises(ConfigError, match="nothing to factor"):
        extract(root / "base", root / "base", rank=2)


# --- CLI ----------------------------------------------------------------------------------------------------
runner = CliRunner()


def _output(res) -> str:
    return res.output  # click >= 8.2: stdout and stderr interleaved


def test_cli_compress_svd_and_compeft(tmp_path):
    tiny, _ = lora_model("llama")
    dt.save(tiny.model, tmp_path / "in", name="a")
    res = runner.invoke(app, ["compress", str(tmp_path / "in"), str(tmp_path / "svd"), "--method", "svd", "--rank", "1"])
    assert res.exit_code == 0, _output(res)
    assert "size ratio" in res.output and "relative error" in res.output
    expected, _ = compress(dt.Delta.read(tmp_path / "in"), "svd", rank=1)
    a, b = tiny.fresh(), tiny.fresh()
    dt.load(a, tmp_path / "svd")
    expected.write(tmp_path / "lib")
    dt.load(b, tmp_path / "lib")
    torch.testing.assert_close(tiny.logits(a), tiny.logits(b), atol=1e-6, rtol=0)
    res = runner.invoke(app, ["compress", str(tmp_path / "in"), str(tmp_path / "cp"), "--density", "0.5", "--json"])
    assert res.exit_code == 0, _output(res)
    info = json.loads(res.stdout)
    assert info["ratio"] == pytest.approx(info["original_bytes"] / info["bytes"]) and 0 < info["rel_error"] < 1
    dt.load(tiny.fresh(), tmp_path / "cp")


@pytest.mark.parametrize("args, match", [
    (["--method", "svd"], "give a rank"),
    (["--method", "svd", "--rank", "0"], "positive integer"),
    (["--method", "svd", "--rank", "1", "--energy", "0.5"], "not both"),
    (["--on", "factors"], "on='delta_w'"),
])
def test_cli_compress_bad_input_exits_2(args, match, tmp_path):
    dense_delta({"a": (4, 4)}).write(tmp_path / "in")
    res = runner.invoke(app, ["compress", str(tmp_path / "in"), str(tmp_path / "out"), *args])
    assert res.exit_code == 2 and match in _output(res), _output(res)
    assert not (tmp_path / "out").exists()
    res = runner.invoke(app, ["compress", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert res.exit_code == 2 and "does not exist" in _output(res)


def test_cli_extract(llama_pair, tmp_path):
    root, tiny, tuned, _ = llama_pair
    res = runner.invoke(app, ["extract", "--base", str(root / "base"), "--tuned", str(root / "tuned"), "--rank", "2",
                              "--dense", "embed_tokens", "-o", str(tmp_path / "x")])
    assert res.exit_code == 0, _output(res)
    assert "model.layers.1.mlp.down_proj" in res.output and "relative error" in res.output
    loaded = tiny.fresh()
    dt.load(loaded, tmp_path / "x")
    torch.testing.assert_close(tiny.logits(loaded), tiny.logits(tuned), atol=1e-4, rtol=0)


def test_cli_extract_bad_input_exits_2(llama_pair, tmp_path):
    root, *_ = llama_pair
    _wide_llama(tmp_path / "wide")
    base, tuned = str(root / "base"), str(root / "tuned")
    cases = [
        (["--base", str(tmp_path / "nope"), "--tuned", tuned, "--rank", "2"], "nope"),
        (["--base", base, "--tuned", tuned, "--rank", "0"], "positive integer"),
        (["--base", base, "--tuned", tuned, "--rank", "2", "--energy", "0.9"], "not both"),
        (["--base", base, "--tuned", str(tmp_path / "wide"), "--rank", "2"], "shape"),
    ]
    for args, match in cases:
        res = runner.invoke(app, ["extract", *args, "-o", str(tmp_path / "out")])
        assert res.exit_code == 2 and match in _output(res), (args, _output(res))
        assert not (tmp_path / "out").exists()


def test_a_result_not_smaller_than_its_input_warns_and_is_not_written_without_force(tmp_path):
    """ComPEFT on a LoRA delta's factors keeps them dense: the same bytes as the input, with an error (issue 17 item
    8). The library warns and notes it; the command refuses to write it unless --force."""
    from deltatune.core.errors import NotSmallerWarning

    tiny, _ = lora_model("llama")
    dt.save(tiny.model, tmp_path / "in", name="a")
    with pytest.warns(NotSmallerWarning, match=r"not smaller than its input: .* \(size ratio 1\.00x\) at relative error"):
        _, report = compress(dt.Delta.read(tmp_path / "in"), "compeft", density=0.1, on="factors")
    assert not report.smaller and report.ratio == 1.0 and "not smaller" in report.notes[-1] and report.rel_error > 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a smaller result warns nothing
        _, report = compress(dt.Delta.read(tmp_path / "in"), "svd", rank=1)
    assert report.smaller
    args = ["compress", str(tmp_path / "in"), str(tmp_path / "out"), "--on", "factors", "--density", "0.1"]
    res = runner.invoke(app, args)
    last = _output(res).strip().splitlines()[-1]
    assert res.exit_code == 2 and last.startswith("error: the compressed delta is not smaller than its input"), _output(res)
    assert last.endswith("(--force writes it anyway)") and not (tmp_path / "out").exists()
    assert "Traceback" not in _output(res) and "NotSmallerWarning" not in _output(res)
    res = runner.invoke(app, args + ["--force"])
    assert res.exit_code == 0 and (tmp_path / "out").is_dir(), _output(res)
    assert "warning: the compressed delta is not smaller than its input (size ratio 1.00x)" in _output(res)
    dt.load(tiny.fresh(), tmp_path / "out")
