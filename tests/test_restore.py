"""io.files.restore: a saved delta's tensors into the attached delta of that name, in place — all checks first."""
from __future__ import annotations

import pytest
import torch
from conftest import build_llama

import deltatune as dt
from deltatune.io import files
from deltatune.io.files import restore


def _delta_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".deltatune." in k}


def _saved(tmp_path):
    m = build_llama()
    dt.attach(m, dt.LoRA(r=4, targets=("q_proj", "v_proj")), name="l")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))
    dt.save(m, tmp_path / "r4", "l")
    return m


def _target():
    m = build_llama()
    dt.attach(m, dt.LoRA(r=4, targets=("q_proj", "v_proj")), name="l")
    return m


def test_restore_puts_the_tensors_in_place(tmp_path):
    src, m = _saved(tmp_path), _target()
    params = {id(p) for p in m.parameters()}
    restore(m, tmp_path / "r4", "l")
    assert {id(p) for p in m.parameters()} == params  # the same Parameter objects (an optimizer goes on)
    want, got = _delta_tensors(src), _delta_tensors(m)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_bad_module_late_in_the_file_changes_nothing(tmp_path):
    """The last module (in file order) has rank 8 where the attached delta has 4: refused with ShapeMismatchError
    before any module is copied."""
    _saved(tmp_path)
    src = dt.Delta.read(tmp_path / "r4")
    last = sorted(src.state)[-1]
    bad = src.state[last]
    bad["lora_A"] = torch.ones(8, bad["lora_A"].shape[1])
    bad["lora_B"] = torch.ones(bad["lora_B"].shape[0], 8)
    dt.Delta(src.name, src.config.replace(rank_pattern={last: 8}), src.state, src.module_types,
             src.base).write(tmp_path / "mixed")
    m = _target()
    before = _delta_tensors(m)
    with pytest.raises(dt.errors.ShapeMismatchError, match="shape"):
        restore(m, tmp_path / "mixed", "l")
    after = _delta_tensors(m)
    assert sum(not torch.equal(before[k], after[k]) for k in before) == 0


def test_restore_makes_the_file_concrete_for_the_model(tmp_path, monkeypatch):
    """A format whose tensors only mean something relative to the model (Delta.for_model) is made concrete before
    the copy, as dt.load does: here a file holding 2·B whose for_model halves it."""
    src = _saved(tmp_path)
    native = dt.Delta.read(tmp_path / "r4")

    class Relative(dt.Delta):
        def for_model(self, model):
            return dt.Delta(self.name, self.config, {p: {k: (t / 2 if k == "lora_B" else t) for k, t in st.items()}
                                                     for p, st in self.state.items()},
                            self.module_types, self.base)

    state = {p: {k: (t * 2 if k == "lora_B" else t) for k, t in st.items()} for p, st in native.state.items()}
    doubled = Relative(native.name, native.config, state, native.module_types, native.base)
    monkeypatch.setattr(files.Delta, "read", staticmethod(lambda path: doubled))
    m = _target()
    restore(m, tmp_path / "r4", "l")
    want, got = _delta_tensors(src), _delta_tensors(m)
    assert all(torch.equal(want[k], got[k]) for k in want)
