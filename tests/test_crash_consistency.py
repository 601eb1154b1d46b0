"""Every save is crash-consistent: a kill (os._exit in a forked child) or an injected OSError between every pair of
file operations of a save leaves the directory holding the complete previous delta or the complete new one — or,
for a first save, nothing — and the next save removes every leftover. Native and PEFT, overwrite (same format and
the other format) and first save, with the one-step directory swap (renameat2) and with the two-rename fallback;
and the model checkpoints merges write."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.core.errors import CorruptFileError, DeltaNotFoundError
from deltatune.io import atomic, formats
from deltatune.io.checkpoints import CheckpointReader, CheckpointWriter
from deltatune.io.integrity import MANIFEST
from fault_injection import every_kill, fail_at, operations

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill tests fork")

@pytest.fixture(autouse=True)
def _no_disk_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync stays a counted operation, but nothing waits for the disk: a killed process loses no written data (only
    a power loss would, which these tests cannot show), and the hundreds of saves here stay fast."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


FILES = {"native": {"delta.json", "delta.safetensors"},
         "peft": {"adapter_config.json", "adapter_model.safetensors", MANIFEST}}


def _delta(seed: int, r: int) -> dt.Delta:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).eval()
    dt.attach(model, dt.LoRA(r=r, targets=("q_proj", "v_proj")), "x")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "deltatune" in n:
                p.copy_(torch.randn(p.shape, generator=gen))
    return dt.Delta.from_model(model, "x")


@pytest.fixture(scope="module")
def versions() -> dict[str, dt.Delta]:
    return {"old": _delta(1, 4), "new": _delta(2, 2), "newer": _delta(3, 3)}


def _write(delta: dt.Delta, fmt: str, path: Path) -> None:
    formats.format_named(fmt).write(delta, path)


def _config(d: dt.Delta) -> dict:
    c = d.config.to_dict()
    return {k: sorted(v) if k in ("targets", "modules_to_save") and isinstance(v, (list, tuple)) else v
            for k, v in c.items()}


def _same(a: dt.Delta, b: dt.Delta) -> bool:
    return (a.name == b.name and _config(a) == _config(b) and a.state.keys() == b.state.keys()
            and all(a.state[p].keys() == b.state[p].keys() and all(torch.equal(a.state[p][k], b.state[p][k])
                                                                  for k in a.state[p]) for p in a.state))


def _references(versions: dict[str, dt.Delta], root: Path) -> dict[tuple[str, str], dt.Delta]:
    """What reading each version back gives, per format (PEFT reading derives name and targets from the files),
    from directories with the same name as the target."""
    refs = {}
    for v, delta in versions.items():
        for fmt in FILES:
            d = root / f"ref-{v}-{fmt}" / "target"
            _write(delta, fmt, d)
            refs[v, fmt] = dt.Delta.read(d)
    return refs


def _no_exchange() -> None:
    atomic._renameat2 = False  # as on a filesystem or platform without renameat2(RENAME_EXCHANGE)


SAVES = [("native", "native"), ("peft", "peft"), ("native", "peft"), ("peft", "native"), (None, "native"), (None, "peft")]


@pytest.mark.parametrize("old_fmt,new_fmt,exchange", [(*case, True) for case in SAVES] +
                         [("native", "native", False), ("peft", "peft", False), ("peft", "native", False),
                          (None, "peft", False)],
                         ids=lambda v: {True: "swap", False: "two-renames", None: "first-save"}.get(v, v))
def test_kill_at_every_file_operation_of_a_save(versions, tmp_path, old_fmt, new_fmt, exchange):
    """`exchange`: the one-step swap (renameat2); without it, the two-rename fallback."""
    refs = _references(versions, tmp_path)
    seen: list[str] = []
    target = lambda k: tmp_path / f"k{k}" / "target"  # noqa: E731

    def prepare(k: int) -> None:
        if old_fmt is not None:
            _write(versions["old"], old_fmt, target(k))

    def run(k: int) -> None:
        if not exchange:
            _no_exchange()
        _write(versions["new"], new_fmt, target(k))

    def check(k: int, killed: bool) -> None:
        d = target(k)
        if exchange and old_fmt is not None:
            assert d.is_dir(), f"kill at operation {k}: the target is missing (a window between two renames)"
        try:
            got = dt.Delta.read(d)  # runs the recovery of an interrupted two-rename replacement
        except DeltaNotFoundError:
            assert old_fmt is None and not d.exists(), f"kill at operation {k}: nothing to read"
            state = "nothing"
        else:
            if _same(got, refs["new", new_fmt]):
                state, fmt = "new", new_fmt
            else:
                assert old_fmt is not None and _same(got, refs["old", old_fmt]), \
                    f"kill at operation {k}: the directory holds neither the old nor the new delta"
                state, fmt = "old", old_fmt
            assert {p.name for p in d.iterdir()} == FILES[fmt], f"kill at operation {k}: stray files in {state}"
        if not killed:
            assert state == "new" and os.listdir(d.parent) == ["target"]
        seen.append(state)
        # the next save finds whatever the kill left and leaves nothing but the new delta
        _write(versions["newer"], new_fmt, d)
        assert os.listdir(d.parent) == ["target"], f"kill at operation {k}: leftovers {os.listdir(d.parent)}"
        assert {p.name for p in d.iterdir()} == FILES[new_fmt]
        assert _same(dt.Delta.read(d), refs["newer", new_fmt])
        shutil.rmtree(d.parent)

    n = every_kill(prepare, run, check)
    assert n >= 8, f"only {n} file operations seen"
    before = "old" if old_fmt is not None else "nothing"
    assert seen[0] == before and seen[-1] == "new" and set(seen) == {before, "new"}
    assert seen == sorted(seen, key=[before, "new"].index), "the new delta appeared, then the old one again"


@pytest.mark.parametrize("exchange", [True, False], ids=["swap", "two-renames"])
@pytest.mark.parametrize("fmt", ["native", "peft"])
def test_failure_at_every_file_operation_leaves_the_old_delta(versions, tmp_path, fmt, exchange, monkeypatch):
    """In-process: an OSError at any operation either fails the save with the old directory byte-identical and
    nothing left beside it, or (after the commit, in the clean-up) the save succeeds with the new delta."""
    refs = _references(versions, tmp_path)
    if not exchange:
        monkeypatch.setattr(atomic, "_renameat2", False)
    d = tmp_path / "work" / "target"
    failed = succeeded = 0
    for k in range(1, 200):
        _write(versions["old"], fmt, d)
        before = {p.name: p.read_bytes() for p in d.iterdir()}
        error, n = fail_at(k, lambda: _write(versions["new"], fmt, d))
        if error is not None:
            assert isinstance(error, OSError) and "injected" in str(error), error
            assert {p.name: p.read_bytes() for p in d.iterdir()} == before, f"failure at operation {k}"
            assert os.listdir(d.parent) == ["target"], f"failure at operation {k}: {os.listdir(d.parent)}"
            failed += 1
        else:
            assert _same(dt.Delta.read(d), refs["new", fmt]), f"failure at operation {k}"
            succeeded += 1
        _write(versions["newer"], fmt, d)  # and the next save cleans up
        assert os.listdir(d.parent) == ["target"] and {p.name for p in d.iterdir()} == FILES[fmt]
        if n < k:  # no failure was injected: every operation has had its turn
            break
    assert failed >= 6 and succeeded >= 1


def test_failed_undo_leaves_both_directories_for_recovery(versions, tmp_path, monkeypatch):
    """Two-rename fallback: the second rename fails and so does renaming the previous directory back. The target is
    missing, but the previous directory and its complete replacement wait beside it: reading puts the previous one
    back, and the next save removes the rest."""
    monkeypatch.setattr(atomic, "_renameat2", False)
    d = tmp_path / "work" / "target"
    _write(versions["old"], "native", d)
    fail_at(10 ** 6, lambda: _write(versions["new"], "native", d))  # count the operations of a complete save
    renames = [i + 1 for i, op in enumerate(operations()) if op.startswith("os.rename")]
    assert len(renames) == 2
    _write(versions["old"], "native", d)
    error, _ = fail_at({renames[1], renames[1] + 1}, lambda: _write(versions["new"], "native", d))
    assert isinstance(error, OSError) and not d.exists()
    assert sorted(p.suffix for p in d.parent.iterdir()) == [".dtnew", ".dtold"]
    refs = _references(versions, tmp_path / "refs")
    assert _same(dt.Delta.read(d), refs["old", "native"])
    _write(versions["newer"], "native", d)
    assert os.listdir(d.parent) == ["target"]


def _checkpoint(path: Path, tensors: dict[str, torch.Tensor], shard_bytes: int) -> None:
    with CheckpointWriter(path, max_shard_bytes=shard_bytes) as w:
        for key, t in tensors.items():
            w.add(key, t)


@pytest.mark.parametrize("exchange", [True, False], ids=["swap", "two-renames"])
def test_kill_at_every_file_operation_of_a_checkpoint_write(tmp_path, exchange):
    old = {"a.weight": torch.zeros(4, 4), "b.weight": torch.zeros(2)}
    new = {"a.weight": torch.ones(4, 4), "b.weight": torch.ones(2), "c.weight": torch.ones(8)}
    target = lambda k: tmp_path / f"k{k}" / "model"  # noqa: E731
    seen = []

    def run(k: int) -> None:
        if not exchange:
            _no_exchange()
        _checkpoint(target(k), new, 40)  # several shards and an index

    def check(k: int, killed: bool) -> None:
        d = target(k)
        atomic.recover(d)
        reader = CheckpointReader(d)
        got = {key: reader.get(key) for key in reader.files}
        state = "new" if got.keys() == new.keys() and all(torch.equal(got[x], new[x]) for x in new) else "old"
        if state == "old":
            assert got.keys() == old.keys() and all(torch.equal(got[x], old[x]) for x in old), f"operation {k}"
        seen.append(state)
        _checkpoint(d, old, 1 << 20)
        assert os.listdir(d.parent) == ["model"], f"kill at operation {k}: leftovers {os.listdir(d.parent)}"
        shutil.rmtree(d.parent)

    n = every_kill(lambda k: _checkpoint(target(k), old, 1 << 20), run, check)
    assert n >= 8 and seen[0] == "old" and seen[-1] == "new"


def test_torn_peft_directory_is_detected(versions, tmp_path):
    """The tear the two-rename PEFT save could leave (new weights, old adapter_config.json) is refused on read."""
    old, new = tmp_path / "old" / "t", tmp_path / "new" / "t"
    _write(versions["old"], "peft", old)
    _write(versions["new"], "peft", new)
    shutil.copy(new / "adapter_model.safetensors", old / "adapter_model.safetensors")
    with pytest.raises(CorruptFileError, match="adapter_model.safetensors.*deltatune_manifest.json"):
        dt.Delta.read(old)
    _write(versions["old"], "peft", old)
    (old / "adapter_config.json").write_text((new / "adapter_config.json").read_text())
    with pytest.raises(CorruptFileError, match="adapter_config.json"):
        dt.Delta.read(old)


def test_kill_at_every_file_operation_of_a_training_checkpoint(tmp_path):
    """dt.train's resumable checkpoints (delta + optimizer + scheduler + RNG) are replaced as a whole too."""
    from deltatune.train.checkpoint import STATE_JSON, STATE_TENSORS, load_checkpoint, save_checkpoint

    from conftest import build_tiny

    tiny = build_tiny("llama")
    dt.attach(tiny.model, dt.LoRA(r=2, targets=("q_proj",)), "a")
    params = [p for p in tiny.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    tiny.logits(grad=True).sum().backward()
    opt.step()
    target = lambda k: tmp_path / f"k{k}" / "checkpoint-2"  # noqa: E731
    files = {"delta", STATE_TENSORS, STATE_JSON}
    seen: list[int] = []

    def prepare(k: int) -> None:
        save_checkpoint(target(k), tiny.model, "a", opt, sched, {"step": 1})

    def run(k: int) -> None:
        save_checkpoint(target(k), tiny.model, "a", opt, sched, {"step": 2})

    def check(k: int, killed: bool) -> None:
        d = target(k)
        assert {p.name for p in d.iterdir()} == files, f"kill at operation {k}: {sorted(p.name for p in d.iterdir())}"
        step = load_checkpoint(d, opt, sched)["step"]
        dt.Delta.read(d / "delta")  # the delta inside loads
        if not killed:
            assert step == 2
        seen.append(step)
        save_checkpoint(d, tiny.model, "a", opt, sched, {"step": 3})
        assert os.listdir(d.parent) == ["checkpoint-2"], f"kill at operation {k}: leftovers {os.listdir(d.parent)}"
        shutil.rmtree(d.parent)

    n = every_kill(prepare, run, check)
    assert n >= 6 and seen[0] == 1 and seen[-1] == 2 and seen == sorted(seen)


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("fmt", ["native", "peft"])
def test_hash_checked_beside_the_reader_refuses_a_changed_file(tmp_path, monkeypatch, overlap, fmt):
    """From a size threshold on, a file's SHA-256 (PEFT: the manifest's, checked by `formats.read`; native: the one
    delta.json records, checked by `read_tensors`) is computed in a second thread while the tensors are read: a
    same-size change of the weights (so only the hash can tell) is still refused, and an intact delta reads back
    equal."""
    from deltatune.io import safetensors_io

    monkeypatch.setattr(formats, "_OVERLAP_BYTES", 0 if overlap else 1 << 62)
    monkeypatch.setattr(safetensors_io, "HASH_BESIDE_BYTES", 0 if overlap else 1 << 62)
    delta = _delta(1, 4)
    path = tmp_path / "d"
    _write(delta, fmt, path)
    back = dt.Delta.read(path)
    compared = [torch.equal(back.state[p][k], delta.state[p][k]) for p in delta.state for k in delta.state[p]
                if k in back.state[p]]
    assert compared and all(compared)
    weights = next(path.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4)  # last tensor's last value, same size
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="SHA-256"):
        dt.Delta.read(path)
