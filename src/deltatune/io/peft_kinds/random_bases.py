"""PEFT VERA <-> VeRA and PEFT RANDLORA <-> RandLoRA: trained vectors on frozen random projections that peft shares
between all modules (one tensor of the largest size, sliced per module) and ours per module.

Reading: the shared projections come from the file (`base_model.vera_A` / `_B`, `base_model.randlora_A` / `_B`,
save_projection=True) or, for VeRA saved without them, are regenerated as peft draws them (a CPU generator seeded
with projection_prng_key: A = U(±√(6/in_max)) [r, in_max], then B = U(±√(6/r)) [out_max, r]). Each module's slice
becomes its own saved A and B (the config's `saved_projections`); the slices need the module sizes, which the file
does not record, so the delta is completed when it meets the model (`SizedDelta`).

VeRA: `<path>.vera_lambda_d` [r] and `vera_lambda_b` [out] are ours; A = vera_A[:, :in], B = vera_B[:out].
RandLoRA (smaller side m, larger M, n = ⌈m / r⌉ bases): randlora_lambda [r, n] is our lambdasᵀ, randlora_gamma
[n, m] our gammas, A = randlora_A[:, 0, :m], and our basis B_i[:, k] is column k·n + i of randlora_B[:M, :n]
flattened to [M, n·r]; s = randlora_alpha / r in both. A RandLoRA file without its bases is refused (peft draws
them in bfloat16 or float16 depending on the machine, so they cannot be regenerated exactly).

Writing: every module's projections (saved, or regenerated from our seed) must be slices of one shared tensor as
peft slices it (e.g. the same input size for VeRA's A), else the delta is refused naming the module; the shared
tensors are written with save_projection=True. peft keeps RandLoRA's bases in bfloat16/float16, so only bases that
type holds exactly (e.g. ones read from a peft file) survive its loading; others are refused."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ...core.errors import CorruptFileError, UnsupportedError
from ...methods.vera.randlora import RandLoRA, n_bases, randlora_bases
from ...methods.vera.vera import VeRA, vera_projections
from ..delta import Delta
from ..peft import PeftFile, PeftKind, SizedDelta, fan_in_fan_out, layer_type, module_key, register_kind, shared_tensor

_COMMON = frozenset({"r", "projection_prng_key", "save_projection", "fan_in_fan_out", "bias", "init_weights"})


def _check_bias(file: PeftFile) -> None:
    if file.cfg.get("bias", "none") not in (None, "none"):
        raise UnsupportedError(f"{file.where} uses bias={file.cfg.get('bias')!r}, which deltatune does not train here")


def _kaiming(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def _types(file: PeftFile, paths: Any) -> dict[str, str]:
    return {p: layer_type(file.flag("fan_in_fan_out")) for p in paths}


# --- VeRA -------------------------------------------------------------------------------------------------------
class VeRAFileDelta(SizedDelta):
    shared: tuple[Tensor, Tensor] | None = None
    key: int = 0

    def complete(self, sizes: dict[str, tuple[int, int]]) -> Delta:
        r = self.config.r
        if self.shared is not None:
            a_sh, b_sh = self.shared
        else:  # peft's draw: one generator, A then B, of the largest sizes
            gen = torch.Generator(device="cpu").manual_seed(self.key)
            own = [s for p, s in sizes.items() if not self.config.saves_whole(p)]
            a_sh = _kaiming((r, max(s[1] for s in own)), gen)
            b_sh = _kaiming((max(s[0] for s in own), r), gen)

        def place(path: str, st: dict, d_out: int, d_in: int) -> dict:
            if a_sh.shape[1] < d_in or b_sh.shape[0] < d_out:
                raise CorruptFileError(f"PEFT adapter {self.name!r}: its shared projections [{tuple(a_sh.shape)}, "
                                       f"{tuple(b_sh.shape)}] are smaller than module {path!r} ([{d_out}, {d_in}])")
            return {**st, "shape": torch.tensor([d_out, d_in]), "A": a_sh[:, :d_in].clone(), "B": b_sh[:d_out].clone()}

        return self.placed_each(sizes, place, lambda path, st: self.config.saves_whole(path))


def read_vera(file: PeftFile) -> Delta:
    _check_bias(file)
    parts = file.take({".vera_lambda_d": "lambda_d", ".vera_lambda_b": "lambda_b"})
    file.floating(parts, "VeRA vectors")
    r = file.number("r", int)
    a, b = file.tensors.pop("base_model.vera_A", None), file.tensors.pop("base_model.vera_B", None)
    if (a is None) != (b is None):
        raise CorruptFileError(f"{file.where} holds only one of vera_A and vera_B")
    if a is not None and (a.dim() != 2 or a.shape[0] != r or b.dim() != 2 or b.shape[1] != r):
        raise CorruptFileError(f"{file.where}: vera_A {tuple(a.shape)} / vera_B {tuple(b.shape)} are not [r, in] / "
                               f"[out, r] for r={r}")
    for mpath, named in parts.items():
        if set(named) != {"lambda_d", "lambda_b"} or named["lambda_d"].shape != (r,) or named["lambda_b"].dim() != 1:
            raise CorruptFileError(f"{file.where}: module {mpath!r} lacks vera_lambda_d [r] or vera_lambda_b [out]")
    config = file.config(VeRA, targets=tuple(parts) or ("none",), r=r,
                         d_initial=float(file.number("d_initial", float, default=0.1)), saved_projections=True)
    delta = VeRAFileDelta(file.name(), config, {p: dict(n) for p, n in parts.items()}, _types(file, parts),
                          file.base())
    delta.shared = None if a is None else (a.float(), b.float())
    delta.key = file.number("projection_prng_key", int, default=0) if a is None else 0
    return delta


def write_vera(delta: Delta, paths: list[str], where: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    cfg: VeRA = delta.config  # type: ignore[assignment]
    flat, a_parts, b_parts = {}, {}, {}
    for mpath in paths:
        st = delta.state[mpath]
        d_out, d_in = (int(v) for v in st["shape"])
        a, b = (st["A"], st["B"]) if "A" in st else vera_projections(cfg.seed, cfg.r, d_out, d_in)
        a_parts[mpath], b_parts[mpath] = ((slice(None), slice(0, d_in)), a), ((slice(0, d_out), slice(None)), b)
        flat[module_key(mpath, "vera_lambda_d")] = st["lambda_d"]
        flat[module_key(mpath, "vera_lambda_b")] = st["lambda_b"]
    sizes = [tuple(int(v) for v in delta.state[p]["shape"]) for p in paths]
    flat["base_model.vera_A"] = shared_tensor(a_parts, (cfg.r, max(s[1] for s in sizes)), where, "VeRA projections A")
    flat["base_model.vera_B"] = shared_tensor(b_parts, (max(s[0] for s in sizes), cfg.r), where, "VeRA projections B")
    conv1d = fan_in_fan_out(delta, paths)
    return flat, {"target_modules": paths, "r": cfg.r, "d_initial": cfg.d_initial, "save_projection": True,
                  "projection_prng_key": 0, "vera_dropout": 0.0, "fan_in_fan_out": conv1d, "bias": "none",
                  "init_weights": True}


# --- RandLoRA ---------------------------------------------------------------------------------------------------
class RandLoRAFileDelta(SizedDelta):
    shared: tuple[Tensor, Tensor] = (torch.empty(0), torch.empty(0))

    def complete(self, sizes: dict[str, tuple[int, int]]) -> Delta:
        r = self.config.r
        a_sh, b_sh = self.shared

        def place(path: str, st: dict, d_out: int, d_in: int) -> dict:
            m, big = min(d_out, d_in), max(d_out, d_in)
            n = n_bases(r, m)
            if a_sh.shape[2] < m or b_sh.shape[0] < big or b_sh.shape[1] < n:
                raise CorruptFileError(f"PEFT adapter {self.name!r}: its shared bases are smaller than module {path!r} "
                                       f"([{d_out}, {d_in}]) needs")
            if st["lambdas"].shape != (n, r) or st["gammas"].shape != (n, m):
                raise CorruptFileError(f"PEFT adapter {self.name!r}: module {path!r} has randlora_lambda "
                                       f"{tuple(st['lambdas'].shape[::-1])} and randlora_gamma {tuple(st['gammas'].shape)}, "
                                       f"expected ({r}, {n}) and ({n}, {m}) for its [{d_out}, {d_in}] weight")
            b = b_sh[:big, :n].reshape(big, n * r).reshape(big, r, n).permute(0, 2, 1).contiguous()
            return {**st, "shape": torch.tensor([d_out, d_in]), "A": a_sh[:, 0, :m].clone(), "B": b}

        return self.placed_each(sizes, place, lambda path, st: self.config.saves_whole(path))


def read_randlora(file: PeftFile) -> Delta:
    _check_bias(file)
    a, b = file.tensors.pop("base_model.randlora_A", None), file.tensors.pop("base_model.randlora_B", None)
    parts = file.take({".randlora_lambda": "lambdas", ".randlora_gamma": "gammas", ".randlora_A": "own_A",
                       ".randlora_B": "own_B"})
    if a is None or b is None:
        raise UnsupportedError(f"{file.where} was saved without its random bases (save_projection=False); peft draws "
                               f"them in bfloat16 or float16 depending on the machine, so deltatune cannot regenerate "
                               f"them exactly — save it with save_projection=True")
    r = file.number("r", int)
    if a.dim() != 3 or a.shape[0] != r or b.dim() != 3 or b.shape[2] != r:
        raise CorruptFileError(f"{file.where}: randlora_A {tuple(a.shape)} / randlora_B {tuple(b.shape)} are not "
                               f"[r, 1, m] / [M, n, r] for r={r}")
    state = {}
    for mpath, named in parts.items():
        named.pop("own_A", None), named.pop("own_B", None)  # each module's references to the shared bases
        if set(named) != {"lambdas", "gammas"}:
            raise CorruptFileError(f"{file.where}: module {mpath!r} lacks randlora_lambda or randlora_gamma")
        state[mpath] = {"lambdas": named["lambdas"].t().contiguous(), "gammas": named["gammas"]}
    file.floating(state, "RandLoRA vectors")
    config = file.config(RandLoRA, targets=tuple(state) or ("none",), r=r,
                         alpha=float(file.number("randlora_alpha", float)), saved_projections=True)
    delta = RandLoRAFileDelta(file.name(), config, state, _types(file, state), file.base())
    delta.shared = (a.float(), b.float())
    return delta


def write_randlora(delta: Delta, paths: list[str], where: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    cfg: RandLoRA = delta.config  # type: ignore[assignment]
    flat, a_parts, b_parts, dims = {}, {}, {}, []
    for mpath in paths:
        st = delta.state[mpath]
        d_out, d_in = (int(v) for v in st["shape"])
        m, big = min(d_out, d_in), max(d_out, d_in)
        n = n_bases(cfg.r, m)
        a, b = (st["A"], st["B"]) if "A" in st else randlora_bases(cfg.seed, cfg.r, m, big)
        a_parts[mpath] = ((slice(None), slice(0, 1), slice(0, m)), a[:, None, :])
        b_parts[mpath] = ((slice(0, big), slice(0, n), slice(None)),
                          b.permute(0, 2, 1).reshape(big, cfg.r * n).reshape(big, n, cfg.r))
        dims.append((m, big, n))
        flat[module_key(mpath, "randlora_lambda")] = st["lambdas"].t().contiguous()
        flat[module_key(mpath, "randlora_gamma")] = st["gammas"]
    a_sh = shared_tensor(a_parts, (cfg.r, 1, max(d[0] for d in dims)), where, "RandLoRA bases A")
    b_sh = shared_tensor(b_parts, (max(d[1] for d in dims), max(d[2] for d in dims), cfg.r), where, "RandLoRA bases B")
    for t, what in ((a_sh, "A"), (b_sh, "B")):
        if not (torch.equal(t.to(torch.bfloat16).float(), t.float()) or torch.equal(t.to(torch.float16).float(), t.float())):
            raise UnsupportedError(f"{where}: peft keeps RandLoRA's bases in bfloat16 or float16, which would round "
                                   f"these float32 bases {what}; only bases those types hold exactly (e.g. ones read "
                                   f"from a peft file) have a PEFT form")
    flat["base_model.randlora_A"], flat["base_model.randlora_B"] = a_sh, b_sh
    conv1d = fan_in_fan_out(delta, paths)
    return flat, {"target_modules": paths, "r": cfg.r, "randlora_alpha": cfg.alpha, "save_projection": True,
                  "projection_prng_key": 0, "randlora_dropout": 0.0, "fan_in_fan_out": conv1d, "bias": "none",
                  "init_weights": True, "sparse": False, "very_sparse": False}


register_kind(PeftKind("VERA", (VeRA,), read_vera, write_vera, fields=_COMMON | {"d_initial", "vera_dropout"},
                       description="VeRA, shared projections saved or regenerated from projection_prng_key"))
register_kind(PeftKind("RANDLORA", (RandLoRA,), read_randlora, write_randlora,
                       fields=_COMMON | {"randlora_alpha", "randlora_dropout"},
                       refuse={"sparse": "sparse ternary bases", "very_sparse": "very sparse ternary bases"},
                       description="RandLoRA with its saved shared bases"))
