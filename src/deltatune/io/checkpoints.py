"""Full model checkpoints (HF directories of safetensors shards), read and written one tensor at a time.

`CheckpointReader` opens `model.safetensors` or `model.safetensors.index.json` + shards and reads single
tensors on demand (memory-mapped by safetensors), so merging or extracting never holds a whole model.
`CheckpointWriter` writes tensors into size-capped shards in a temporary directory next to the target and
moves the finished directory into place at the end: an interrupted write leaves the previous one intact.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..errors import CorruptFileError, DeltaNotFoundError, ShapeMismatchError, UnsupportedError
from ..layouts import layout_by_name

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
            try:
                index = json.loads((self.path / INDEX).read_text())
                weight_map = index["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CorruptFileError(f"{str(self.path / INDEX)!r} is not a valid shard index ({e})") from None
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
        self._handles: dict[Path, Any] = {}

    @staticmethod
    def _keys_of(file: Path) -> list[str]:
        try:
            with safe_open(str(file), framework="pt") as f:
                return list(f.keys())
        except Exception as e:  # safetensors has its own error types for every malformation
            raise CorruptFileError(f"{str(file)!r} is not a readable safetensors file ({type(e).__name__}: {e})") from None

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as e:
                raise CorruptFileError(f"{str(file)!r} is not a readable safetensors file ({type(e).__name__}: {e})") from None
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self.files)

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str) -> Tensor:
        if key not in self.files:
            raise KeyError(f"{str(self.path)!r} has no tensor {key!r}")
        return self._handle(self.files[key]).get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(self.files[key]).get_slice(key).get_shape())

    def items(self) -> Iterator[tuple[str, Tensor]]:
        for key in self.files:
            yield key, self.get(key)

    @property
    def config(self) -> dict[str, Any]:
        file = self.path / "config.json"
        return json.loads(file.read_text()) if file.is_file() else {}

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
                 metadata: dict[str, str] | None = None) -> None:
        if max_shard_bytes < 1:
            raise ValueError("max_shard_bytes must be positive")
        self.path = Path(path)
        self.max_shard_bytes = max_shard_bytes
        self.copy_from = Path(copy_from) if copy_from is not None else None
        self.metadata = {"format": "pt", **(metadata or {})}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent))
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0
        self.seen: set[str] = set()

    def add(self, key: str, tensor: Tensor) -> None:
        if key in self.seen:
            raise UnsupportedError(f"tensor {key!r} written twice")
        self.seen.add(key)
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[key] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, str(self.tmp / f"shard-{len(self.shards):05d}.tmp"), metadata=self.metadata)
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> Path:
        self._flush()
        n = len(self.shards)
        if n <= 1:
            if n == 1:
                os.replace(self.tmp / "shard-00000.tmp", self.tmp / SINGLE)
            else:
                save_file({}, str(self.tmp / SINGLE), metadata=self.metadata)
        else:
            weight_map = {}
            for i, keys in enumerate(self.shards):
                name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                os.replace(self.tmp / f"shard-{i:05d}.tmp", self.tmp / name)
                weight_map.update({k: name for k in keys})
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if self.copy_from is not None:
            for name in SIDE_FILES:
                if (self.copy_from / name).is_file():
                    shutil.copy2(self.copy_from / name, self.tmp / name)
        for file in self.tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        return _publish(self.tmp, self.path)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _publish(tmp: Path, target: Path) -> Path:
    """Move a finished temporary directory to `target`, replacing what was there only once it is complete."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.rmdir(old)
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def as_float(t: Tensor) -> Tensor:
    """Task-vector arithmetic runs in float32 whatever the checkpoint's dtype."""
    return t.float() if t.is_floating_point() and t.dtype != torch.float64 else t
