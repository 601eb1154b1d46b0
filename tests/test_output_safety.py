"""Outputs are safe and a directory holds one delta.

* An output that is the filesystem root, the home directory, a regular file, a symlink loop, a dangling symlink, a
  path under a file, the current directory, a mount point or a directory holding unrelated files is refused with an
  `OutputPathError` naming the path and why — before any file operation (checked with the audit hook of
  fault_injection: the first write would fail the test) — by dt.save, Delta.write / PEFT writing, the merge recipe
  (every output format), `deltatune compress` / `extract` and the checkpoint writer.
* Writing a format into a directory that holds another replaces it as a whole; reading never finds the old one.
* PEFT directories carry an integrity manifest; a torn or edited one is refused, one written by PEFT reads as before.
* A merge reports the size of what it wrote.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import app
from deltatune.core.errors import CorruptFileError, DeltaTuneError, OutputPathError
from deltatune.errors import OutputPathError as PublicOutputPathError
from deltatune.io import atomic, formats
from deltatune.io.checkpoints import CheckpointWriter
from deltatune.io.integrity import MANIFEST, verify
from deltatune.io.peft import write_peft
from deltatune.merging.recipe import load_recipe, run_recipe

from conftest import Tiny, build_tiny
from fault_injection import fail_at
from test_merge_pipeline import lora_delta

NATIVE = ["delta.json", "delta.safetensors"]
PEFT = ["adapter_config.json", "adapter_model.safetensors", MANIFEST]


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    return build_tiny("llama")


@pytest.fixture(scope="module")
def deltas(tiny: Tiny) -> dict[str, dt.Delta]:
    return {"a": lora_delta(tiny, 1), "b": lora_delta(tiny, 2, r=2)}


def _model(tiny: Tiny):
    model = tiny.fresh()
    dt.attach(model, dt.LoRA(r=2, targets=("q_proj",)), "x")
    return model


def _unsafe(kind: str, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """An unsafe output path of `kind` and a fragment of the reason the error gives."""
    if kind == "root":
        return Path("/"), "filesystem root"
    if kind == "home":
        home = tmp / "home"
        home.mkdir()
        monkeypatch.setenv("HOME", str(home))
        return home, "home directory"
    if kind == "file":
        (tmp / "notes.txt").write_text("keep me")
        return tmp / "notes.txt", "is a regular file"
    if kind == "under-file":
        (tmp / "notes.txt").write_text("keep me")
        return tmp / "notes.txt" / "out", "under a regular file"
    if kind == "loop":
        os.symlink(tmp / "loop-b", tmp / "loop-a")
        os.symlink(tmp / "loop-a", tmp / "loop-b")
        return tmp / "loop-a", "symlink loop"
    if kind == "dangling":
        os.symlink(tmp / "missing", tmp / "link")
        return tmp / "link", "symbolic link to the missing path"
    if kind == "unrelated":
        (tmp / "out").mkdir()
        (tmp / "out" / "notes.txt").write_text("keep me")
        (tmp / "out" / "delta.json").write_text("{}")
        return tmp / "out", "'notes.txt'"
    if kind == "subdirectory":
        (tmp / "out" / "runs").mkdir(parents=True)
        return tmp / "out", "'runs'"
    if kind == "cwd":
        (tmp / "here").mkdir()
        monkeypatch.chdir(tmp / "here")
        return Path("."), "current directory"
    if kind == "mount":
        (tmp / "mnt").mkdir()
        real_ismount = os.path.ismount
        monkeypatch.setattr(os.path, "ismount", lambda p: str(p) == str(tmp / "mnt") or real_ismount(p))
        return tmp / "mnt", "mount point"
    raise AssertionError(kind)


KINDS = ["root", "home", "file", "under-file", "loop", "dangling", "unrelated", "subdirectory", "cwd", "mount"]


def _refused_before_any_write(fn, path: Path, why: str) -> None:
    error, n = fail_at(1, fn)  # the first file operation would raise an injected OSError instead
    assert isinstance(error, OutputPathError), f"{type(error).__name__}: {error}"
    assert isinstance(error, PublicOutputPathError) and isinstance(error, DeltaTuneError)
    assert n == 0, "something was written before the refusal"
    assert repr(str(path)) in str(error) and why in str(error), str(error)


@pytest.mark.parametrize("kind", KINDS)
def test_unsafe_outputs_are_refused_before_any_work(tiny, deltas, tmp_path, monkeypatch, kind):
    path, why = _unsafe(kind, tmp_path, monkeypatch)
    before = sorted(os.listdir(tmp_path))
    model = _model(tiny)
    for fmt in ("native", "peft"):
        _refused_before_any_write(lambda: dt.save(model, path, "x", format=fmt), path, why)
    _refused_before_any_write(lambda: deltas["a"].write(path), path, why)
    _refused_before_any_write(lambda: write_peft(deltas["a"], path), path, why)
    _refused_before_any_write(lambda: CheckpointWriter(path), path, why)
    assert sorted(os.listdir(tmp_path)) == before
    if kind in ("file", "under-file", "unrelated"):
        assert (tmp_path / ("notes.txt" if kind != "unrelated" else "out/notes.txt")).read_text() == "keep me"


@pytest.mark.parametrize("fmt", ["delta", "peft", "model"])
@pytest.mark.parametrize("kind", ["root", "file", "loop", "unrelated", "home"])
def test_merge_outputs_are_refused_before_any_work(tiny, deltas, tmp_path, monkeypatch, kind, fmt):
    (tmp_path / "in").mkdir()
    deltas["a"].write(tmp_path / "in" / "a")
    deltas["b"].write(tmp_path / "in" / "b")
    if fmt == "model":
        tiny.fresh().save_pretrained(tmp_path / "in" / "base")
    path, why = _unsafe(kind, tmp_path, monkeypatch)
    output = {"path": str(path), "format": fmt}
    if fmt != "model":
        output.update(storage="lowrank", rank=2)
    data = {"method": "ties", "inputs": [{"path": str(tmp_path / "in" / n), "density": 0.5} for n in "ab"],
            "output": output}
    if fmt == "model":
        data["base"] = str(tmp_path / "in" / "base")
    _refused_before_any_write(lambda: load_recipe(data), path, why)  # the recipe check names output.path
    with pytest.raises(OutputPathError, match=r"^output\.path: "):
        load_recipe(data)
    recipe = load_recipe({**data, "output": {**output, "path": str(tmp_path / "safe")}})
    recipe.output.path = path  # run_recipe checks again (a Recipe made in code)
    _refused_before_any_write(lambda: run_recipe(recipe, progress=False), path, why)
    # through the CLI: one error line, exit 2
    (tmp_path / "in" / "r.yaml").write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "in" / "r.yaml"), "--quiet"])
    assert result.exit_code == 2 and "error:" in result.output and why in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("kind", ["root", "file", "loop", "unrelated"])
def test_compress_and_extract_outputs_are_refused(tiny, deltas, tmp_path, monkeypatch, kind):
    deltas["a"].write(tmp_path / "a")
    tiny.fresh().save_pretrained(tmp_path / "base")
    path, why = _unsafe(kind, tmp_path, monkeypatch)
    runner = CliRunner()
    for args in (["compress", str(tmp_path / "a"), str(path)],
                 ["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "base"), "-o", str(path)]):
        error, n = fail_at(1, lambda: runner.invoke(app, args, catch_exceptions=False))
        assert n == 0, "something was written before the refusal"
    for args in (["compress", str(tmp_path / "a"), str(path)],
                 ["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "base"), "-o", str(path)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and why in result.output and "Traceback" not in result.output, result.output


def test_symlink_to_a_delta_directory_is_written_through(tiny, deltas, tmp_path):
    deltas["a"].write(tmp_path / "runs" / "1")
    os.symlink(tmp_path / "runs" / "1", tmp_path / "latest")
    deltas["b"].write(tmp_path / "latest")
    assert (tmp_path / "latest").is_symlink() and sorted(os.listdir(tmp_path / "runs")) == ["1"]
    assert torch.equal(dt.Delta.read(tmp_path / "runs" / "1").state["model.layers.0.self_attn.q_proj"]["lora_A"],
                       deltas["b"].state["model.layers.0.self_attn.q_proj"]["lora_A"])


# --- a directory holds one delta ----------------------------------------------------------------------------------
def test_another_format_replaces_the_delta(tiny, tmp_path):
    model = tiny.fresh()
    dt.attach(model, dt.LoRA(r=2, targets=("q_proj", "v_proj")), "x")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    d = tmp_path / "d"
    other = tiny.fresh()
    dt.attach(other, dt.IA3(), "x")
    dt.save(other, d, "x")  # a native IA3 delta
    dt.save(model, d, "x", format="peft")
    assert sorted(os.listdir(d)) == PEFT and formats.format_of(d).name == "peft"
    got = dt.Delta.read(d)
    assert got.config.kind == "lora"
    fresh = tiny.fresh()
    dt.load(fresh, d, "x")
    torch.testing.assert_close(tiny.logits(fresh), tiny.logits(model))
    dt.save(other, d, "x")  # and back
    assert sorted(os.listdir(d)) == NATIVE and dt.Delta.read(d).config.kind == "ia3"
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_merge_with_peft_output_replaces_a_native_delta(tiny, deltas, tmp_path):
    deltas["a"].write(tmp_path / "a")
    deltas["b"].write(tmp_path / "b")
    deltas["a"].write(tmp_path / "out")  # an older native result
    data = {"method": "ties", "inputs": [{"path": str(tmp_path / n), "density": 0.5} for n in "ab"],
            "output": {"path": str(tmp_path / "out"), "format": "peft", "rank": 2}}
    summary = run_recipe(load_recipe(data), progress=False)
    assert sorted(os.listdir(tmp_path / "out")) == PEFT
    assert formats.format_of(tmp_path / "out").name == "peft" and dt.Delta.read(tmp_path / "out").config.r == 2
    # the size is what was written, not what the directory held before or anything beside it
    assert summary["bytes"] == sum((tmp_path / "out" / f).stat().st_size for f in PEFT)


def test_merge_size_counts_only_what_was_written(tiny, deltas, tmp_path):
    deltas["a"].write(tmp_path / "a")
    deltas["b"].write(tmp_path / "b")
    tiny.fresh().save_pretrained(tmp_path / "base")
    big = tmp_path / "out"
    write_peft(lora_delta(tiny, 5, r=8), big)  # a larger delta there before
    data = {"method": "ties", "inputs": [{"path": str(tmp_path / n), "density": 0.5} for n in "ab"],
            "output": {"path": str(big), "format": "delta", "storage": "lowrank", "rank": 1}}
    summary = run_recipe(load_recipe(data), progress=False)
    assert sorted(os.listdir(big)) == NATIVE
    assert summary["bytes"] == sum((big / f).stat().st_size for f in NATIVE)
    data = {"method": "ties", "base": str(tmp_path / "base"),
            "inputs": [{"path": str(tmp_path / n), "density": 0.5} for n in "ab"],
            "output": {"path": str(tmp_path / "model"), "format": "model", "max_shard_bytes": 20000}}
    summary = run_recipe(load_recipe(data), progress=False)
    files = os.listdir(tmp_path / "model")
    assert len([f for f in files if f.startswith("model-")]) > 1
    assert summary["bytes"] == sum((tmp_path / "model" / f).stat().st_size for f in files)


def test_a_directory_with_two_deltas_is_refused_on_read_and_replaced_on_write(tiny, deltas, tmp_path):
    """What an older deltatune left after a PEFT save into a native directory: both markers. Reading refuses to
    guess; saving replaces everything, including the temporaries an interrupted older save left inside."""
    d = tmp_path / "d"
    deltas["a"].write(d)
    write_peft(deltas["b"], tmp_path / "p")
    for f in os.listdir(tmp_path / "p"):
        (d / f).write_bytes((tmp_path / "p" / f).read_bytes())
    (d / ".delta.json.x1y2z3ab.tmp").write_text("partial")
    (d / ".delta.safetensors.q9w8e7r6.bak").write_text("old")
    with pytest.raises(CorruptFileError, match="delta.json \\(native\\), adapter_config.json \\(peft\\)"):
        dt.Delta.read(d)
    deltas["b"].write(d)
    assert sorted(os.listdir(d)) == NATIVE and dt.Delta.read(d).config.r == 2


# --- integrity manifest -------------------------------------------------------------------------------------------
def test_peft_written_by_peft_reads_and_a_stale_manifest_is_refused(tiny, deltas, tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny.fresh(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "p")
    assert MANIFEST not in os.listdir(tmp_path / "p")
    dt.Delta.read(tmp_path / "p")  # no manifest: read as it is
    write_peft(deltas["a"], tmp_path / "p")  # README.md of PEFT's save is a companion file: replaced
    assert sorted(os.listdir(tmp_path / "p")) == PEFT
    model.save_pretrained(tmp_path / "p")  # PEFT saves over deltatune's files, leaving the manifest stale
    with pytest.raises(CorruptFileError, match=f"delete {MANIFEST}"):
        dt.Delta.read(tmp_path / "p")
    (tmp_path / "p" / MANIFEST).unlink()
    dt.Delta.read(tmp_path / "p")


@pytest.mark.parametrize("content,pattern", [
    (b"{not json", "not valid JSON"),
    (b"[]", "not a deltatune manifest"),
    (json.dumps({"format": "deltatune.manifest", "version": 0, "files": {}}).encode(), "version"),
    (json.dumps({"format": "deltatune.manifest", "version": 1, "files": {}}).encode(), "non-empty"),
    (json.dumps({"format": "deltatune.manifest", "version": 1, "files": {"../x": {"bytes": 1, "sha256": "0"}}}).encode(),
     "not a file name"),
    (json.dumps({"format": "deltatune.manifest", "version": 1, "files": {"a": {"bytes": "1", "sha256": "0"}}}).encode(),
     "must be"),
    (json.dumps({"format": "deltatune.manifest", "version": 1, "files": {"a": {"bytes": 1, "sha256": "0"}}}).encode(),
     "missing"),
    (b" " * (2 << 20), "more than a manifest"),
])
def test_malformed_manifests_are_typed_errors(tmp_path, content, pattern):
    (tmp_path / MANIFEST).write_bytes(content)
    with pytest.raises(CorruptFileError, match=pattern):
        verify(tmp_path)


# --- recovery of the two-rename fallback -------------------------------------------------------------------------
def test_interrupted_two_rename_replacement_is_undone_on_read(deltas, tmp_path):
    d = tmp_path / "d"
    deltas["a"].write(d)
    deltas["b"].write(tmp_path / "new")
    os.rename(d, tmp_path / ".d.abc123.dtold")  # the window between the renames: the old one aside, the new one ready
    os.rename(tmp_path / "new", tmp_path / ".d.abc123.dtnew")
    assert dt.Delta.read(d).config.r == 4  # the old delta is put back
    assert sorted(os.listdir(tmp_path)) == [".d.abc123.dtnew", "d"]
    deltas["b"].write(d)
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_an_old_leftover_is_never_resurrected(deltas, tmp_path):
    """A `.dtold` left after the second rename (the new delta was in place) must not come back when the delta
    directory is later deleted on purpose."""
    d = tmp_path / "d"
    deltas["a"].write(tmp_path / ".d.abc123.dtold")
    with pytest.raises(DeltaTuneError, match="does not exist"):
        dt.Delta.read(d)
    atomic.recover(d)
    assert not d.exists()
    deltas["b"].write(d)
    assert sorted(os.listdir(tmp_path)) == ["d"]
