"""Full model checkpoints (HF directories of safetensors shards), read and written one tensor at a time.

`CheckpointReader` opens `model.safetensors` or `model.safetensors.index.json` + shards and reads single
tensors on demand with plain file reads (no memory map), so merging or extracting never holds a whole model.
`CheckpointWriter` streams tensors into size-capped shards in a staging directory next to the target and
replaces the target with the finished directory in one step at the end (`atomic.new_staging` / `publish_dir`):
after a crash at any point the target is the previous checkpoint or the new one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.errors import CorruptFileError, DeltaNotFoundError, ShapeMismatchError, UnsupportedError
from ..core.layouts import layout_by_name
from . import atomic
from ..core.parsing import read_json, short
from .safetensors_io import DTYPES, read_header

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
#: files copied from a source model directory into a written checkpoint (config and tokenizer)
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
              "chat_template.jinja", "added_tokens.json")


class CheckpointReader:
    """The weights of an HF model directory, one tensor at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise DeltaNotFoundError(f"model directory {str(self.path)!r} does not exist")
        if (self.path / INDEX).is_file():
            index = read_json(self.path / INDEX, "shard index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(f, str) and f and Path(f).name == f and f not in (".", "..") for f in weight_map.values()):
                raise CorruptFileError(f"{str(self.path / INDEX)!r} is not a valid shard index: weight_map must map "
                                       f"tensor names to shard file names in the same directory, got "
                                       f"{short(weight_map if weight_map is not None else index)}")
            self.files = {k: self.path / f for k, f in weight_map.items()}
        elif (self.path / SINGLE).is_file():
            self.files = {k: self.path / SINGLE for k in self._keys_of(self.path / SINGLE)}
        else:
            found = sorted(p.name for p in self.path.iterdir())[:8]
            hint = " (only pickled weights: convert them to safetensors first)" if any(
                n.endswith((".bin", ".pt", ".pth")) for n in found) else ""
            raise DeltaNotFoundError(f"{str(self.path)!r} holds neither {SINGLE} nor {INDEX}{hint}; found {found}")
        missing = sorted({str(f) for f in self.files.values() if not f.is_file()})
        if missing:
            raise CorruptFileError(f"shard file(s) listed in {str(self.path / INDEX)!r} are missing: {missing[:3]}")
        self._headers: dict[Path, tuple[dict[str, Any], int]] = {}

    @staticmethod
    def _keys_of(file: Path) -> list[str]:
        return list(read_header(file)[0])

    def _entry(self, key: str) -> tuple[Path, dict[str, Any], int]:
        if key not in self.files:
            raise KeyError(f"{str(self.path)!r} has no tensor {key!r}")
        file = self.files[key]
        if file not in self._headers:
            self._headers[file] = read_header(file)
        header, start = self._headers[file]
        if key not in header:
            raise CorruptFileError(f"{str(file)!r} does not hold {key!r}, which the shard index assigns to it")
        return file, header[key], start

    def keys(self) -> list[str]:
        return list(self.files)

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str) -> Tensor:
        """One tensor, read with plain file reads (not memory-mapped), so only it occupies memory."""
        file, info, start = self._entry(key)
        begin, end = info["data_offsets"]
        buf = bytearray(end - begin)
        with open(file, "rb") as f:
            f.seek(start + begin)
            if f.readinto(buf) != len(buf):
                raise CorruptFileError(f"{str(file)!r} is truncated: tensor {key!r} ends past the end of the file")
        if not buf:
            return torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
        return torch.frombuffer(buf, dtype=DTYPES[info["dtype"]]).reshape(info["shape"])

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entry(key)[1]["shape"])

    def items(self) -> Iterator[tuple[str, Tensor]]:
        for key in self.files:
            yield key, self.get(key)

    @property
    def config(self) -> dict[str, Any]:
        file = self.path / "config.json"
        config = read_json(file, "model config") if file.is_file() else {}
        if not isinstance(config, dict):
            raise CorruptFileError(f"model config {str(file)!r} must be a JSON object, got {type(config).__name__}")
        return config

    def key_for(self, module_path: str, param: str = "weight") -> str | None:
        """The checkpoint key of a module's parameter; checkpoints saved without the model's head prefix
        (e.g. `h.0.attn` for `transformer.h.0.attn`) are matched by dropping leading components."""
        parts = module_path.split(".")
        for start in range(len(parts)):
            key = ".".join([*parts[start:], param])
            if key in self.files:
                return key
        return None

    def module_weights(self, module_types: dict[str, str]) -> Callable[[str], tuple[Tensor, Tensor | None]]:
        """path -> (W in the [out, in] view, bias or None): the `base=` argument of `Delta.update`."""

        def lookup(path: str) -> tuple[Tensor, Tensor | None]:
            key = self.key_for(path)
            if key is None:
                raise ShapeMismatchError(f"the base checkpoint {str(self.path)!r} has no weight for module {path!r}")
            layout = layout_by_name(module_types.get(path, "Linear"))
            bias_key = self.key_for(path, "bias")
            bias = self.get(bias_key) if bias_key is not None and layout.module_type != "Embedding" else None
            return layout.from_native(self.get(key)), bias

        return lookup


class CheckpointWriter:
    """Write tensors into size-capped safetensors shards; `close()` publishes the directory atomically.

        with CheckpointWriter(out, copy_from=base_dir) as w:
            for key, t in ...: w.add(key, t)
    """

    def __init__(self, path: str | Path, *, max_shard_bytes: int = 2 << 30, copy_from: str | Path | None = None,
                 metadata: dict[str, str] | None = None, protect: Sequence[str | Path] = ()) -> None:
        if max_shard_bytes < 1:
            raise ValueError("max_shard_bytes must be positive")
        self.path = Path(path)
        self.real = check_output_dir(self.path, [*protect, *([copy_from] if copy_from is not None else [])])
        self.max_shard_bytes = max_shard_bytes
        self.copy_from = Path(copy_from) if copy_from is not None else None
        self.metadata = {"format": "pt", **(metadata or {})}
        self.tmp = atomic.new_staging(self.real)
        self.shards: list[_Shard] = []
        self.total = 0
        self.seen: set[str] = set()

    def add(self, key: str, tensor: Tensor) -> None:
        """Append one tensor to the current shard file (it is written now; nothing is kept in memory)."""
        if key in self.seen:
            raise UnsupportedError(f"tensor {key!r} written twice")
        self.seen.add(key)
        t = tensor.detach().to("cpu").contiguous()
        size = t.numel() * t.element_size()
        if not self.shards or (self.shards[-1].bytes and self.shards[-1].bytes + size > self.max_shard_bytes):
            self.shards.append(_Shard(self.tmp / f"shard-{len(self.shards):05d}.data"))
        self.shards[-1].append(key, t)
        self.total += size

    def close(self) -> Path:
        try:
            return self._close()
        except BaseException:
            self.abort()
            raise

    def _close(self) -> Path:
        if not self.shards:
            self.shards.append(_Shard(self.tmp / "shard-00000.data"))
        n = len(self.shards)
        names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for shard, name in zip(self.shards, names):
            shard.finish(self.tmp / name, self.metadata)
        if n > 1:
            weight_map = {k: name for shard, name in zip(self.shards, names) for k in shard.header}
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if self.copy_from is not None:
            for name in SIDE_FILES:
                if (self.copy_from / name).is_file():
                    shutil.copy2(self.copy_from / name, self.tmp / name)
        for file in self.tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        atomic.publish_dir(self.tmp, self.real)
        return self.path

    def abort(self) -> None:
        for shard in self.shards:
            shard.f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class _Shard:
    """One safetensors shard written incrementally: tensor bytes go to a data file as they arrive; `finish`
    writes the header and then copies the data after it in chunks."""

    def __init__(self, data_file: Path) -> None:
        self.data_file = data_file
        self.header: dict[str, Any] = {}
        self.bytes = 0
        self.f = open(data_file, "wb")

    def append(self, key: str, t: Tensor) -> None:
        if t.dtype not in _DTYPE_NAMES:
            raise UnsupportedError(f"tensor {key!r} has dtype {t.dtype}, which safetensors cannot store")
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        size = t.numel() * t.element_size()
        self.header[key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                            "data_offsets": [self.bytes, self.bytes + size]}
        self.f.write(raw)
        self.bytes += size

    def finish(self, target: Path, metadata: dict[str, str]) -> None:
        self.f.close()
        text = json.dumps({"__metadata__": metadata, **self.header}, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        with open(target, "wb") as out, open(self.data_file, "rb") as data:
            out.write(len(text).to_bytes(8, "little"))
            out.write(text)
            shutil.copyfileobj(data, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())
        self.data_file.unlink()


_OURS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


def owns(name: str) -> bool:
    """Whether a file named `name` may be part of a checkpoint directory (weights, index, config, tokenizer)."""
    return bool(_OURS.fullmatch(name)) or name in (INDEX, *SIDE_FILES)


def check_output_dir(target: Path, inputs: Sequence[str | Path]) -> Path:
    """Refuse an output directory that would replace anything but an earlier checkpoint (its weights, index,
    config and tokenizer files), that is one of the inputs, or that is otherwise unsafe (`atomic.check_output`: the
    root, the home directory, a file, a symlink loop, a mount point, the current directory): writing it must never
    delete other files. Returns the real path."""
    return atomic.check_output(target, owns, inputs, holds="a checkpoint")


def as_float(t: Tensor) -> Tensor:
    """Task-vector arithmetic runs in float32 whatever the checkpoint's dtype."""
    return t.float() if t.is_floating_point() and t.dtype != torch.float64 else t
