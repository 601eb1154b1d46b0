"""Reading safetensors safely: clear errors for truncated or corrupt files and for non-finite values."""
from __future__ import annotations

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


def check_finite(tensors: dict[str, Tensor], where: str) -> None:
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(f"tensor {key!r} in {where} holds {bad} NaN/inf value(s); "
                                 f"the delta diverged or the file is damaged — it was not loaded")
