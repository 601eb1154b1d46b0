"""`quantize`: put bitsandbytes quantised linears into a model in place (docs/quantization.md). The weight views of
such modules live in `core/quant.py` and `core/layouts.py`."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import ConfigError, TargetError, UnsupportedError
from .quant import SCHEMES, bnb
from .targeting import head_paths, matches


def _replacement(lin: nn.Linear, scheme: str, compute: torch.dtype | None, double_quant: bool) -> nn.Module:
    lib = bnb()
    has_bias = lin.bias is not None
    weight = lin.weight.detach()
    if scheme in ("nf4", "fp4"):
        q = lib.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=compute or weight.dtype,
                              compress_statistics=double_quant, quant_type=scheme, device="meta")
        q.weight = lib.nn.Params4bit(weight.clone(), requires_grad=False, quant_type=scheme,
                                     compress_statistics=double_quant)
        # bitsandbytes would repack the weight in place on the first CPU inference forward (AVX512-BF16 kernel:
        # bfloat16 scales, only out_features % 32 == 0, and no gradient to the input once packed, which breaks
        # training after an evaluation): keep one stored format, the one training uses
        q.support_avx512bf16_for_cpu = False
    else:
        q = lib.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False,
                                threshold=0.0, device="meta")
        q.weight = lib.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    if has_bias:
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=lin.bias.requires_grad)
    return q.to(weight.device)


COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def quantize(model: nn.Module, scheme: str = "nf4", exclude: str | Sequence[str] = (), *,
             compute_dtype: torch.dtype | None = None, double_quant: bool = True) -> nn.Module:
    """Replace every `nn.Linear` of `model` in place by a bitsandbytes quantised layer: "nf4" / "fp4"
    (`Linear4bit`, `double_quant` = bitsandbytes' compress_statistics) or "int8" (`Linear8bitLt`, int8 weights).

    The output head (the model's output embeddings, `lm_head`, classifier heads) stays full precision, and so does
    every module `exclude` names (a regex matched against the whole path, or a sequence of name suffixes).
    `compute_dtype` (4-bit only; default: each layer's weight dtype) is float32, bfloat16 or float16. Returns the
    model. Raises before changing anything on bad arguments or without bitsandbytes."""
    if scheme not in SCHEMES:
        raise ConfigError(f"quantize scheme must be one of {SCHEMES}, got {scheme!r}")
    if compute_dtype is not None and (scheme == "int8" or compute_dtype not in COMPUTE_DTYPES):
        raise ConfigError(f"compute_dtype must be one of {COMPUTE_DTYPES} for a 4-bit scheme (int8 computes in "
                          f"float32), got {compute_dtype!r} with {scheme!r}")
    if not isinstance(exclude, (str, tuple, list)):
        raise ConfigError(f"quantize exclude must be a regex or a list of name suffixes, got {exclude!r}")
    if hasattr(model, "_deltatune_state") and getattr(model, "_deltatune_state").deltas:
        raise UnsupportedError("quantize the base before attaching deltas (deltas are attached to this model)")
    bnb()
    exclude = exclude if isinstance(exclude, str) else tuple(exclude)
    heads = head_paths(model)
    todo = []
    for path, module in model.named_modules():
        if type(module) is not nn.Linear or path in heads or any(path.startswith(h + ".") for h in heads):
            continue
        if exclude and matches(exclude, path):
            continue
        if module.weight.dtype not in COMPUTE_DTYPES:
            raise UnsupportedError(f"module {path!r} has {module.weight.dtype} weights; quantize float weights")
        todo.append(path)
    if not todo:
        raise TargetError(f"quantize found no nn.Linear to replace in {type(model).__name__} (heads and exclude are "
                          f"skipped)")
    new = {}
    for path in todo:  # build every replacement first: a failure leaves the model untouched
        new[path] = _replacement(model.get_submodule(path), scheme, compute_dtype, double_quant)
    for path, q in new.items():
        parent, _, name = path.rpartition(".")
        q.train(model.get_submodule(path).training)
        setattr(model.get_submodule(parent) if parent else model, name, q)
    return model
