"""`deltatune export --format vllm`: plain PEFT LoRA directories (peft as the oracle that loads them), conversion by
SVD with the error checked against an independent computation, refusals, the CLI. The real vLLM check is
`make test-vllm` (tests/vllm_check.py)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

import deltatune as dt
from deltatune.core.errors import UnsupportedError
from deltatune.serve.vllm_export import export_vllm, vllm_rank

from serve_http_fixtures import load_model, write_model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("vx") / "base")


@pytest.fixture()
def base(base_dir):
    return load_model(base_dir)[0]


IDS = torch.tensor([[2, 5, 9, 14, 22, 30, 41, 7]])


def _delta(base, path, cfg, std=0.2, seed=0):
    m = copy.deepcopy(base)
    torch.manual_seed(seed)
    dt.attach(m, cfg, name="d")
    with torch.no_grad():
        for _, p in m.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)
    return dt.save(m, path)


def _logits_dt(base, path):
    m = copy.deepcopy(base)
    dt.load(m, path)
    with torch.no_grad():
        return m(IDS).logits


def _logits_peft(base, path):
    from peft import PeftModel

    m = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    with torch.no_grad():
        return m(IDS).logits


def _base_logits(base):
    with torch.no_grad():
        return base(IDS).logits


def _exact_update(base, path):
    """ΔW per module, independently: merge the delta into a copy of the base and subtract the weights."""
    m = copy.deepcopy(base)
    dt.load(m, path, name="d")
    dt.merge(m)
    before, after = dict(base.named_modules()), dict(m.named_modules())
    return {p: (after[p].weight.detach() - before[p].weight.detach()).double()
            for p, mod in before.items() if isinstance(mod, torch.nn.Linear) and p != "lm_head"
            and not torch.equal(after[p].weight, before[p].weight)}


def test_lora_exported_exactly_with_mixed_ranks_and_scale(base, base_dir, tmp_path):
    src = _delta(base, tmp_path / "lora", dt.LoRA(r=4, alpha=16, targets=["q_proj", "v_proj", "down_proj"],
                                                    rank_pattern={"down_proj": 2}))
    out = export_vllm(base, base_dir, [src], tmp_path / "out")
    (rep,) = out.deltas
    assert rep.converted == [] and rep.error == 0.0 and rep.rank == 4
    cfg = json.loads((tmp_path / "out" / "lora" / "adapter_config.json").read_text())
    # vLLM reads one r and one lora_alpha per adapter: no patterns, scale folded into B
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4 and not cfg["rank_pattern"] and not cfg["alpha_pattern"]
    assert not cfg["use_dora"] and not cfg["lora_bias"] and cfg["bias"] == "none"
    want = _logits_dt(base, src)
    assert not torch.allclose(want, _base_logits(base), atol=1e-3)  # the delta changes outputs
    torch.testing.assert_close(_logits_peft(base, rep.path), want, atol=1e-5, rtol=1e-5)
    modules = json.loads((tmp_path / "out" / "lora-modules.json").read_text())
    assert modules == [{"name": "lora", "path": str(rep.path), "base_model_name": str(base_dir.resolve())}]
    cmd = (tmp_path / "out" / "vllm-command.txt").read_text().split()
    assert cmd[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--max-lora-rank") + 1] == "8" and cmd[-1] == f"lora={rep.path}"


def test_dora_converted_exact_at_full_rank_and_error_at_low_rank(base, base_dir, tmp_path):
    src = _delta(base, tmp_path / "dora", dt.LoRA(r=4, dora=True, targets="all-linear"), std=0.05)
    with pytest.raises(UnsupportedError, match="--rank"):
        export_vllm(base, base_dir, [src], tmp_path / "none")
    assert not (tmp_path / "none").exists()  # refused before anything was written
    full = export_vllm(base, base_dir, [src], tmp_path / "full", rank=64).deltas[0]  # 64 ≥ every min(out, in)
    assert len(full.converted) == 14 and full.error < 1e-5
    torch.testing.assert_close(_logits_peft(base, full.path), _logits_dt(base, src), atol=1e-4, rtol=1e-4)
    low = export_vllm(base, base_dir, [src], tmp_path / "low", rank=2).deltas[0]
    exact = _exact_update(base, src)
    assert set(exact) == set(low.errors)
    for p, dw in exact.items():
        s = torch.linalg.svdvals(dw)
        want = float(s[2:].norm() / s.norm())  # Eckart–Young: the tail of the singular values
        assert low.errors[p] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert low.error > 0.05  # a real loss, reported


def test_lora_with_bias_converted_with_the_bias_counted(base, tmp_path):
    from transformers import LlamaForCausalLM

    cfg = copy.deepcopy(base.config)
    cfg.attention_bias = True  # q/k/v/o with biases, as in Qwen2-style models
    torch.manual_seed(1)
    biased = LlamaForCausalLM(cfg).eval()
    biased.save_pretrained(tmp_path / "bbase")
    src = _delta(biased, tmp_path / "lb", dt.LoRA(r=4, bias="lora_only", targets=["q_proj", "v_proj"]))
    with pytest.raises(UnsupportedError, match="changes the bias.*--rank"):
        export_vllm(biased, tmp_path / "bbase", [src], tmp_path / "o1")
    rep = export_vllm(biased, tmp_path / "bbase", [src], tmp_path / "o2", rank=4).deltas[0]
    assert sorted(rep.bias_dropped) == sorted(rep.errors) == sorted(rep.converted) and len(rep.errors) == 4
    m = copy.deepcopy(biased)
    dt.load(m, src, name="d")
    dt.merge(m)
    before, after = dict(biased.named_modules()), dict(m.named_modules())
    for p in rep.errors:  # rank 4 keeps ΔW exactly: the error is the dropped bias alone
        dw = (after[p].weight - before[p].weight).detach().double()
        db = (after[p].bias - before[p].bias).detach().double()
        assert db.norm() > 0.1
        want = float(db.norm() / torch.sqrt(dw.norm() ** 2 + db.norm() ** 2))
        assert rep.errors[p] == pytest.approx(want, rel=1e-4)
    # what was written is the weight part exactly: the merged model with the base biases put back
    with torch.no_grad():
        for p in rep.errors:
            after[p].bias.copy_(before[p].bias)
        want = m(IDS).logits
    torch.testing.assert_close(_logits_peft(biased, rep.path), want, atol=1e-5, rtol=1e-5)


def test_refusals_name_the_kind_and_module_and_write_nothing(base, base_dir, tmp_path):
    good = _delta(base, tmp_path / "good", dt.LoRA(r=2, targets=["q_proj"]))
    prompt = _delta(base, tmp_path / "prompt", dt.PromptTuning(n_tokens=3))
    with pytest.raises(UnsupportedError, match="not a weight update.*cannot be converted"):
        export_vllm(base, base_dir, [good, prompt], tmp_path / "o", rank=8)
    emb = _delta(base, tmp_path / "emb", dt.LoRA(r=2, targets=["embed_tokens"]))
    with pytest.raises(UnsupportedError, match="embed_tokens.*linear layers"):
        export_vllm(base, base_dir, [good, emb], tmp_path / "o", rank=8)
    assert not (tmp_path / "o").exists()
    assert vllm_rank(4) == 8 and vllm_rank(16) == 16 and vllm_rank(300) == 320
    with pytest.raises(UnsupportedError, match="largest"):
        vllm_rank(513)


def test_cli_export(base, base_dir, tmp_path):
    from deltatune.cli.main import app

    a = _delta(base, tmp_path / "a", dt.LoRA(r=2, targets=["q_proj"]))
    b = _delta(base, tmp_path / "b", dt.LoRA(r=2, dora=True, targets=["v_proj"]), std=0.05)
    run = CliRunner().invoke(app, ["export", "--format", "vllm", str(a), str(b), "-o", str(tmp_path / "out"),
                                   "--model", str(base_dir), "--rank", "4"])
    assert run.exit_code == 0, run.output
    assert "a: exact (rank 2)" in run.output and "b: converted to rank 4" in run.output
    assert "--enable-lora --max-lora-rank 8 --max-loras 2 --lora-modules" in run.output
    names = [m["name"] for m in json.loads((tmp_path / "out" / "lora-modules.json").read_text())]
    assert names == ["a", "b"]
    bad = CliRunner().invoke(app, ["export", "--format", "tgi", str(a), "-o", str(tmp_path / "o2"), "--model",
                                   str(base_dir)])
    assert bad.exit_code == 2 and "error: --format 'tgi' is not supported" in bad.output
    refused = CliRunner().invoke(app, ["export", str(b), "-o", str(tmp_path / "o3"), "--model", str(base_dir)])
    assert refused.exit_code == 2 and "--rank" in refused.output and not (tmp_path / "o3").exists()


def test_pissa_offsets_written_as_plain_lora_of_twice_the_rank(base, base_dir, tmp_path):
    src = _delta(base, tmp_path / "pissa", dt.LoRA(r=3, init="pissa", targets=["q_proj", "o_proj"]), std=0.05)
    rep = export_vllm(base, base_dir, [src], tmp_path / "out").deltas[0]
    assert rep.converted == [] and rep.rank == 6  # s·(B A − B0 A0): rank 2r, exact, no --rank needed
    cfg = json.loads((rep.path / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 6  # vLLM refuses init_lora_weights="pissa"
    torch.testing.assert_close(_logits_peft(base, rep.path), _logits_dt(base, src), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", [
    dt.IA3(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]),
    dt.LoHa(r=2, targets=["q_proj", "v_proj"]),
    dt.LoKr(r=2, targets=["q_proj", "v_proj"]),
    dt.VeRA(r=8, targets=["q_proj", "v_proj"]),
    dt.RandLoRA(r=4, targets=["q_proj", "v_proj"]),
    dt.AdaLoRA(init_r=4, target_r=2, targets=["q_proj", "v_proj"]),
], ids=lambda c: type(c).__name__)
def test_every_weight_update_kind_exports_to_equal_logits_at_full_rank(base, base_dir, tmp_path, cfg):
    """The compatibility table's vLLM column: each linear weight-update kind becomes plain LoRA that peft (vLLM's file
    reader) loads with deltatune's logits, exactly at a rank that holds every ΔW."""
    src = _delta(base, tmp_path / "src", cfg, std=0.05)
    out = export_vllm(base, base_dir, [src], tmp_path / "out", rank=64).deltas[0]
    assert out.error < 1e-5
    assert not torch.allclose(_logits_dt(base, src), _base_logits(base), atol=1e-4)  # the delta does something
    torch.testing.assert_close(_logits_peft(base, out.path), _logits_dt(base, src), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cfg", [
    dt.LNTuning(), dt.PrefixTuning(n_tokens=2),
    dt.Houlsby(targets=["o_proj", "down_proj"], bottleneck=4),
], ids=lambda c: type(c).__name__)
def test_kinds_vllm_cannot_hold_are_refused_by_name(base, base_dir, tmp_path, cfg):
    src = _delta(base, tmp_path / "src", cfg)
    with pytest.raises(UnsupportedError):
        export_vllm(base, base_dir, [src], tmp_path / "out", rank=8)
    assert not (tmp_path / "out").exists()
