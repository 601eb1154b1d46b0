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
from ..core.parsing import expect, read_json, short
from .delta import Delta
from .formats import Format, check_output, register_format, write_directory
from .safetensors_io import check_finite, read_tensors

FORMAT = "deltatune.delta"
FORMAT_VERSION = 1
CONFIG_FILE = "delta.json"
TENSOR_FILE = "delta.safetensors"


def write_native(delta: Delta, path: Path) -> Path:
    """Write delta.safetensors and delta.json; the JSON records the tensor file's hash. The directory is replaced as
    a whole (`formats.write_directory`): after a crash at any point it holds the previous delta or this one."""
    check_output(path)  # an unsafe output is refused before any work
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
    write_directory("native", path, {TENSOR_FILE: data, CONFIG_FILE: text.encode("utf-8")})
    return path


def read_native(path: Path, header_only: bool = False) -> Delta:
    """A native delta directory as a Delta. Every field of delta.json is checked (a typed error names the file, the
    field and what was expected); the tensor file is sized against the manifest before it is read, then
    memory-mapped, hashed and checked (`safetensors_io.read_tensors`). With header_only, the tensors are meta
    tensors from the file's header (every check but the data's hash and finiteness, which need the data)."""
    file = path / CONFIG_FILE
    where = repr(str(file))
    meta = read_json(file, error=CorruptFileError)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptFileError(f"{where} is not a deltatune delta file (format="
                               f"{short(meta.get('format') if isinstance(meta, dict) else None)}; expected {FORMAT!r})")
    if "format_version" not in meta:
        raise CorruptFileError(f"{where} lacks the key 'format_version'")
    version = meta["format_version"]
    expect(type(version) is int, where, "format_version", "an integer", version)
    if version > FORMAT_VERSION:
        raise UnsupportedError(f"{str(path)!r} has format version {version}; this deltatune reads up to "
                               f"{FORMAT_VERSION} — upgrade deltatune")
    expect(version >= 1, where, "format_version", f"a format version from 1 to {FORMAT_VERSION}", version)
    for key in ("config", "modules", "tensors"):
        if key not in meta:
            raise CorruptFileError(f"{where} lacks the key {key!r}")
    name = meta.get("name")
    expect(name is None or isinstance(name, str), where, "name", "a string (the delta's name)", name)
    modules = meta["modules"]
    expect(isinstance(modules, dict), where, "modules", "an object mapping module paths to {type, params}", modules)
    for p, info in modules.items():
        expect(bool(p), where, "modules", "keyed by non-empty module paths", p)
        expect(isinstance(info, dict), where, f"modules[{short(p)}]", "an object {type, params}", info)
        expect(isinstance(info.get("type", "?"), str), where, f"modules[{short(p)}].type", "a module type name",
               info.get("type"))
        params = info.get("params", [])
        expect(isinstance(params, list) and all(isinstance(q, str) for q in params), where,
               f"modules[{short(p)}].params", "a list of parameter names", params)
    base = meta.get("base", {})
    expect(isinstance(base, dict), where, "base", "an object (model_class, model_name, weight_shapes)", base)
    for key in ("model_class", "model_name"):
        expect(base.get(key) is None or isinstance(base[key], str), where, f"base.{key}", "a string or null",
               base.get(key))
    shapes = base.get("weight_shapes", {})
    expect(isinstance(shapes, dict), where, "base.weight_shapes", "an object mapping module paths to weight shapes",
           shapes)
    for p, shape in shapes.items():
        if p not in modules:
            raise CorruptFileError(f"{where}: base.weight_shapes names {short(p)}, which is not listed in modules")
        expect(isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape), where,
               f"base.weight_shapes[{short(p)}]", "a list of sizes", shape)
    record = meta["tensors"]
    expect(isinstance(record, dict), where, "tensors", "an object {file, bytes, sha256}", record)
    size, digest = record.get("bytes"), record.get("sha256")
    tensor_file = record.get("file", TENSOR_FILE)
    expect(isinstance(tensor_file, str) and Path(tensor_file).name == tensor_file and tensor_file.endswith(".safetensors")
           and not tensor_file.startswith(".") and "\0" not in tensor_file, where, "tensors.file",
           "the name of a .safetensors file beside it", tensor_file)
    expect(type(size) is int and size >= 0, where, "tensors.bytes", "the tensor file's size in bytes", size)
    expect(isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest), where,
           "tensors.sha256", "the tensor file's SHA-256 as 64 hex digits", digest)
    try:
        config = DeltaConfig.from_dict(meta["config"])
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    kind = meta.get("kind", config.kind)
    expect(kind == config.kind, where, "kind", f"the kind of its config ({config.kind!r})", kind)

    weights = path / tensor_file
    flat, _ = read_tensors(weights, size=size, sha256=digest, manifest=CONFIG_FILE, header_only=header_only)
    check_finite(flat, str(weights))
    state: dict[str, dict[str, Tensor]] = {p: {} for p in modules}
    for key, t in flat.items():
        mod, _, param = key.rpartition(".")
        if mod not in state:
            raise CorruptFileError(f"tensor {short(key)} in {str(weights)!r} belongs to no module listed in {CONFIG_FILE}")
        state[mod][param] = t
    for p, info in modules.items():
        missing = sorted(set(info.get("params", [])) - set(state[p]))
        if missing:
            raise CorruptFileError(f"{str(weights)!r} lacks {short(missing, 200)} for module {short(p)}")
    types = {p: info.get("type", "?") for p, info in modules.items()}
    return Delta(name or path.name, config, state, types, base)


register_format(Format("native", CONFIG_FILE, read_native, write_native, "deltatune's own: delta.json + delta.safetensors",
                       files=(CONFIG_FILE, TENSOR_FILE),
                       read_meta=lambda path: read_native(path, header_only=True)))
