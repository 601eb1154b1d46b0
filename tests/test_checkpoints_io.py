"""io/checkpoints: our streaming safetensors reader/writer against the safetensors library, and bad files."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltatune.core.errors import ConfigError, CorruptFileError, DeltaNotFoundError
from deltatune.io.checkpoints import CheckpointReader, CheckpointWriter, INDEX, SINGLE


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(7, 5, generator=g), "a.bias": torch.randn(7, generator=g).to(torch.bfloat16),
            "b.weight": torch.randn(3, 4, generator=g).to(torch.float16), "ids": torch.arange(6, dtype=torch.int64),
            "empty": torch.zeros(0, 3), "flag": torch.tensor([True, False])}


@pytest.mark.parametrize("shard_bytes", [1 << 30, 64])
def test_writer_output_reads_back_with_safetensors_and_transformers_layout(tmp_path, shard_bytes):
    ts = _tensors()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    with CheckpointWriter(tmp_path / "out", max_shard_bytes=shard_bytes, copy_from=tmp_path / "src") as w:
        for k, t in ts.items():
            w.add(k, t)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "config.json" in files
    if shard_bytes == 64:
        index = json.loads((tmp_path / "out" / INDEX).read_text())
        assert set(index["weight_map"]) == set(ts) and len(set(index["weight_map"].values())) > 1
        loaded = {}
        for name in set(index["weight_map"].values()):
            loaded.update(load_file(tmp_path / "out" / name))  # the reference library reads our shards
    else:
        assert SINGLE in files
        loaded = load_file(tmp_path / "out" / SINGLE)
    reader = CheckpointReader(tmp_path / "out")
    for k, t in ts.items():
        assert torch.equal(loaded[k], t) and loaded[k].dtype == t.dtype
        assert torch.equal(reader.get(k), t) and reader.shape(k) == tuple(t.shape)


def test_reader_reads_library_written_files(tmp_path):
    ts = _tensors()
    save_file(ts, tmp_path / SINGLE, metadata={"format": "pt"})
    reader = CheckpointReader(tmp_path)
    assert sorted(reader.keys()) == sorted(ts)
    assert all(torch.equal(reader.get(k), t) for k, t in ts.items())


def test_failed_write_leaves_previous_directory(tmp_path):
    with CheckpointWriter(tmp_path / "out") as w:
        w.add("x", torch.ones(3))
    with pytest.raises(RuntimeError):
        with CheckpointWriter(tmp_path / "out") as w:
            w.add("x", torch.zeros(3))
            raise RuntimeError("interrupted")
    assert torch.equal(CheckpointReader(tmp_path / "out").get("x"), torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind


def test_bad_checkpoints(tmp_path):
    with pytest.raises(DeltaNotFoundError, match="does not exist"):
        CheckpointReader(tmp_path / "missing")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(DeltaNotFoundError, match="pickled weights"):
        CheckpointReader(tmp_path / "pickled")
    save_file({"w": torch.ones(100)}, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    for name, blob in {"truncated": data[:-40], "garbage": b"\xff" * 64, "tiny": b"\x01"}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / SINGLE).write_bytes(blob)
        with pytest.raises(CorruptFileError):
            CheckpointReader(tmp_path / name).get("w")
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / INDEX).write_text(json.dumps({"weight_map": {"w": "nope.safetensors"}}))
    with pytest.raises(CorruptFileError, match="missing"):
        CheckpointReader(tmp_path / "index")


def test_output_directory_with_other_files_or_an_input_is_refused(tmp_path):
    work = tmp_path / "work"
    (work / "base").mkdir(parents=True)
    (work / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="notes.txt"):
        CheckpointWriter(work)
    with pytest.raises(ConfigError, match=r"holds\) the input"):
        CheckpointWriter(tmp_path, protect=[work / "base"])
    with pytest.raises(ConfigError, match="is \\(or holds\\) the input"):
        CheckpointWriter(work / "base", copy_from=work / "base")
    assert (work / "notes.txt").read_text() == "keep me" and (work / "base").is_dir()
    assert sorted(p.name for p in work.iterdir()) == ["base", "notes.txt"]  # nothing written, no temp dirs
