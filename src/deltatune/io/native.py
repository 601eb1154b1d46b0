"""The native format: a directory with delta.safetensors (keys `<module path>.<param>`) and delta.json (format name
and version, name, kind and config, base identity, module list, the tensor file's size and SHA-256)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors.torch import save as st_save
from torch import Tensor

from ..core.config import DeltaConfig
from ..core.errors import ConfigError, CorruptFileError, UnsupportedError
from .atomic import write_files
from .delta import Delta
from .formats import Format, register_format
from .safetensors_io import check_finite, read_header, read_tensors

FORMAT = "deltatune.delta"
FORMAT_VERSION = 1
CONFIG_FILE = "delta.json"
TENSOR_FILE = "delta.safetensors"


def write_native(delta: Delta, path: Path) -> Path:
    """Write delta.safetensors and delta.json atomically as a pair; the JSON records the tensor file's hash."""
    flat = {f"{p}.{k}": t for p, st in delta.state.items() for k, t in st.items()}
    data = st_save(flat, metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": delta.name,
        "kind": delta.config.kind,
        "config": delta.config.to_dict(),
        "base": delta.base,
        "modules": {p: {"type": delta.module_types.get(p, "?"), "params": sorted(st)} for p, st in delta.state.items()},
        "tensors": {"file": TENSOR_FILE, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
    }
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"  # before touching any file
    # both files or neither: a failed save leaves the previous delta in the directory loadable
    write_files({path / TENSOR_FILE: data, path / CONFIG_FILE: text.encode("utf-8")})
    return path


def read_native(path: Path, header_only: bool = False) -> Delta:
    """The delta in `path`; with header_only, its tensors are meta tensors read from the safetensors header (every
    check but the data's hash and finiteness, which need the data)."""
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{str(path / CONFIG_FILE)!r} is not valid JSON ({e}); the file is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptFileError(f"{str(path / CONFIG_FILE)!r} is not a deltatune delta file (format={meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CorruptFileError(f"{str(path / CONFIG_FILE)!r} has format_version {version!r}; expected an integer")
    if version > FORMAT_VERSION:
        raise UnsupportedError(f"{str(path)!r} has format version {meta['format_version']}; this deltatune reads up to "
                               f"{FORMAT_VERSION} — upgrade deltatune")
    try:
        config = DeltaConfig.from_dict(meta["config"])
        modules = meta["modules"]
    except KeyError as e:
        raise CorruptFileError(f"{str(path / CONFIG_FILE)!r} lacks the key {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{str(path / CONFIG_FILE)!r}: {e}") from None
    if header_only:
        flat, size = read_header(path / TENSOR_FILE)
        data = None
    else:
        flat, data = read_tensors(path / TENSOR_FILE)
        size = len(data)
    expect = meta.get("tensors", {})
    if expect.get("bytes") is not None and (expect["bytes"] != size or (
            data is not None and expect.get("sha256") != hashlib.sha256(data).hexdigest())):
        raise CorruptFileError(f"{str(path / TENSOR_FILE)!r} does not match the size/hash recorded in {CONFIG_FILE}; "
                               f"the file was truncated, modified or belongs to another save")
    check_finite(flat, str(path / TENSOR_FILE))
    state: dict[str, dict[str, Tensor]] = {p: {} for p in modules}
    for key, t in flat.items():
        mod, _, param = key.rpartition(".")
        if mod not in state:
            raise CorruptFileError(f"tensor {key!r} in {str(path / TENSOR_FILE)!r} belongs to no module listed in {CONFIG_FILE}")
        state[mod][param] = t
    for p, info in modules.items():
        missing = sorted(set(info.get("params", [])) - set(state[p]))
        if missing:
            raise CorruptFileError(f"{str(path / TENSOR_FILE)!r} lacks {missing} for module {p!r}")
    types = {p: info.get("type", "?") for p, info in modules.items()}
    return Delta(meta.get("name") or path.name, config, state, types, meta.get("base", {}))


register_format(Format("native", CONFIG_FILE, read_native, write_native, "deltatune's own: delta.json + delta.safetensors",
                       read_meta=lambda path: read_native(path, header_only=True)))
