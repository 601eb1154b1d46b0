"""Reading safetensors safely: clear errors for truncated or corrupt files and for non-finite values."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from torch import Tensor

from ..core.errors import CorruptFileError, DeltaNotFoundError, NonFiniteError


def read_tensors(path: Path) -> tuple[dict[str, Tensor], bytes]:
    """All tensors of a safetensors file (and its raw bytes); never unpickles anything."""
    if not path.is_file():
        raise DeltaNotFoundError(f"tensor file {str(path)!r} does not exist")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types for every malformation
        raise CorruptFileError(f"{str(path)!r} is not a readable safetensors file ({type(e).__name__}: {e}); "
                               f"the file is truncated or corrupt — save the delta again") from None
    return tensors, data


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_header(path: Path) -> tuple[dict[str, Tensor], int]:
    """The tensors of a safetensors file as meta tensors (names, shapes, dtypes) from its header alone, and the
    file's size; the data is not read. Malformed headers raise like `read_tensors`."""
    if not path.is_file():
        raise DeltaNotFoundError(f"tensor file {str(path)!r} does not exist")
    size = path.stat().st_size
    bad = f"{str(path)!r} is not a readable safetensors file"
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        out: dict[str, Tensor] = {}
        end = 0
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = _DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, stop = (int(o) for o in info["data_offsets"])
            numel = 1
            for d in shape:
                numel *= d
            if stop - begin != numel * torch.empty((), dtype=dtype).element_size() or begin < 0:
                raise ValueError(f"tensor {key!r} has offsets {begin}..{stop} for shape {shape}")
            end = max(end, stop)
            out[key] = torch.empty(shape, dtype=dtype, device="meta")
        if 8 + n + end != size:
            raise ValueError(f"the header describes {8 + n + end} bytes, the file has {size}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{bad} ({type(e).__name__}: {e}); the file is truncated or corrupt — save the delta "
                               f"again") from None
    return out, size


def check_finite(tensors: dict[str, Tensor], where: str) -> None:
    for key, t in tensors.items():
        if t.is_meta:  # read from the header only: the values are checked when the data is read
            continue
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(f"tensor {key!r} in {where} holds {bad} NaN/inf value(s); "
                                 f"the delta diverged or the file is damaged — it was not loaded")
