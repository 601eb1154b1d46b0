"""PEFT ADALORA <-> AdaLoRA.

`<path>.lora_A` [r, in], `lora_E` [r, 1], `lora_B` [out, r] are our Q, Λ, P. peft computes
B (A ⊙ E) · lora_alpha / (init_r + 1e-5) and we P diag(Λ) Q · alpha / init_r, so Λ = E · init_r / (init_r + 1e-5)
(exactly the same update). Pruned ranks: peft's rank_pattern maps `<path>.lora_E` to the mask of kept triplets and
its files hold the kept ones only; ours maps the path to the number kept. peft's lora_alpha of 0 means init_r."""
from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from ...core.errors import CorruptFileError, UnsupportedError
from ...methods.adalora.adalora import AdaLoRA
from ..delta import Delta
from ..peft import PeftFile, PeftKind, fan_in_fan_out, layer_type, module_key, register_kind

_EPS = 1e-5  # peft's ranknum + 1e-5
_KNOWN = frozenset({"r", "lora_alpha", "lora_dropout", "target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1",
                    "beta2", "orth_reg_weight", "total_step", "rank_pattern", "fan_in_fan_out", "bias",
                    "init_lora_weights", "use_rslora", "use_dora", "lora_bias", "alpha_pattern", "megatron_config",
                    "megatron_core", "loftq_config", "eva_config", "corda_config", "layer_replication",
                    "runtime_config", "qalora_group_size", "use_qalora", "target_parameters", "trainable_token_indices",
                    "ensure_weight_tying", "arrow_config", "alora_invocation_tokens", "velora_config",
                    "lora_ga_config", "use_bdlora", "bdlora_config", "kasa_config", "monteclora_config"})


def _ranks(file: PeftFile) -> dict[str, int]:
    pattern = file.cfg.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or not all(isinstance(v, list) and all(isinstance(b, bool) for b in v)
                                                for v in pattern.values()):
        raise CorruptFileError(f"{file.where}: rank_pattern must map module names to lists of true/false, got "
                               f"{str(pattern)[:80]}")
    return {(k[: -len(".lora_E")] if k.endswith(".lora_E") else k): sum(v) for k, v in pattern.items()}


def read(file: PeftFile) -> Delta:
    if file.cfg.get("bias", "none") not in (None, "none"):
        raise UnsupportedError(f"{file.where} uses bias={file.cfg.get('bias')!r}, which deltatune's AdaLoRA does not train")
    parts = file.take({".lora_A": "Q", ".lora_E": "E", ".lora_B": "P"})
    file.floating(parts, "AdaLoRA triplets")
    init_r, target_r = file.number("init_r", int), file.number("target_r", int)
    alpha = file.number("lora_alpha", float) or init_r
    kept = _ranks(file)
    state, ranks = {}, {}
    for mpath, named in parts.items():
        if set(named) != {"Q", "E", "P"}:
            missing = sorted(theirs for ours, theirs in (("Q", "lora_A"), ("E", "lora_E"), ("P", "lora_B")) if ours not in named)
            raise CorruptFileError(f"{file.where} lacks {missing} for module {mpath!r}")
        q, e, p = named["Q"], named["E"], named["P"]
        r = int(e.shape[0])
        if q.shape[0] != r or p.shape[1] != r or e.numel() != r:
            raise CorruptFileError(f"{file.where}: module {mpath!r} has lora_A {tuple(q.shape)}, lora_E {tuple(e.shape)}, "
                                   f"lora_B {tuple(p.shape)}, whose ranks differ")
        if r != kept.get(mpath, init_r):
            raise CorruptFileError(f"{file.where}: module {mpath!r} has rank {r} in the tensors but "
                                   f"{kept.get(mpath, init_r)} by init_r / rank_pattern")
        if r != init_r:
            ranks[re.escape(mpath)] = r
        state[mpath] = {"P": p, "Lambda": e.reshape(-1).float() * (init_r / (init_r + _EPS)), "Q": q}
    config = file.config(AdaLoRA, targets=tuple(parts) or ("none",), init_r=init_r, target_r=min(target_r, init_r),
                         alpha=float(alpha), rank_pattern=ranks)
    types = {p: layer_type(file.flag("fan_in_fan_out")) for p in parts}
    return Delta(file.name(), config, state, types, file.base())


def write(delta: Delta, paths: list[str], where: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    cfg: AdaLoRA = delta.config  # type: ignore[assignment]
    flat, pattern = {}, {}
    for mpath in paths:
        st = delta.state[mpath]
        r = int(st["Lambda"].shape[0])
        flat[module_key(mpath, "lora_A")] = st["Q"]
        flat[module_key(mpath, "lora_E")] = (st["Lambda"] * ((cfg.init_r + _EPS) / cfg.init_r)).reshape(-1, 1)
        flat[module_key(mpath, "lora_B")] = st["P"]
        if r != cfg.init_r:
            pattern[f"{mpath}.lora_E"] = [True] * r + [False] * (cfg.init_r - r)
    conv1d = fan_in_fan_out(delta, paths)
    return flat, {"target_modules": paths, "r": cfg.init_r, "init_r": cfg.init_r, "target_r": cfg.target_r,
                  "lora_alpha": cfg.alpha, "tinit": cfg.tinit, "tfinal": cfg.tfinal, "deltaT": cfg.deltaT,
                  "beta1": cfg.beta1, "beta2": cfg.beta2, "orth_reg_weight": cfg.orth_reg_weight,
                  "total_step": cfg.total_step or 1 + cfg.tinit + cfg.tfinal, "rank_pattern": pattern or None,
                  "fan_in_fan_out": conv1d, "bias": "none", "lora_dropout": 0.0, "init_lora_weights": True}


register_kind(PeftKind("ADALORA", (AdaLoRA,), read, write, fields=_KNOWN,
                       description="AdaLoRA, pruned ranks included"))
