"""Deltas as PEFT LoRA directories that vLLM serves (`deltatune export --format vllm`), a `lora-modules.json` and
the launch command.

vLLM (0.32) serves plain LoRA adapters only: A and B factors on the linear layers of the transformer blocks; its
PEFT reader refuses `use_dora`, `lora_bias` and weight-derived inits (PiSSA, OLoRA, ...), and other kinds have no
PEFT LoRA form at all. Each delta is checked module by module, from declared capabilities and its stored update —
never from its kind's name:

* a weight update that is low-rank as stored, independent of the base, with no bias change: written exactly;
* any other weight update (DoRA, LoHa, LoKr, (IA)³, sparse or dense updates, a LoRA with bias changes, ...): its
  exact ΔW (given the base) truncated by SVD to `rank`; a bias change is dropped and counted in the error. The
  relative Frobenius error is reported per module and per delta;
* not a weight update (prompt or prefix tuning, bottleneck adapters), or a module vLLM gives no LoRA (embeddings,
  the output head, norms): refused, naming the kind and the module.

Every module is written at the delta's largest rank (zero-padded) with the scale folded into B and `lora_alpha = r`:
no rank or alpha patterns, the simplest file every vLLM version reads alike. A low-rank update stored with its
starting factors subtracted (PiSSA/OLoRA/MiLoRA) is written as the one plain LoRA of rank 2r it is.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.errors import ConfigError, UnsupportedError
from ..core.tensors import LowRankDelta
from ..io import atomic
from ..io.delta import Delta
from ..io.files import check_fits
from ..io.formats import check_output, format_named
from .convert import pad_rank, truncate

#: ranks vLLM's `--max-lora-rank` accepts (vllm.config.lora.MaxLoRARanks in 0.32)
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MODULES_FILE = "lora-modules.json"
COMMAND_FILE = "vllm-command.txt"


@dataclass
class Exported:
    """One delta as written: where, at which rank, and what the conversion cost (0 where written exactly)."""

    name: str
    source: Path
    path: Path
    rank: int
    converted: list[str] = field(default_factory=list)   # modules whose update was truncated (or lost a bias)
    errors: dict[str, float] = field(default_factory=dict)  # module -> relative error of its update
    bias_dropped: list[str] = field(default_factory=list)

    @property
    def error(self) -> float:
        """The worst relative Frobenius error over the delta's modules (0.0: written exactly)."""
        return max(self.errors.values(), default=0.0)

    def describe(self) -> str:
        if not self.converted:
            return f"{self.name}: exact (rank {self.rank}) -> {self.path}"
        bias = f"; bias dropped on {len(self.bias_dropped)} module(s)" if self.bias_dropped else ""
        return (f"{self.name}: converted to rank {self.rank} ({len(self.converted)}/{len(self.errors)} modules{bias}), "
                f"relative error {self.error:.3g} (worst module) -> {self.path}")


@dataclass
class Export:
    deltas: list[Exported]
    directory: Path
    model: str
    command: list[str]

    @property
    def max_rank(self) -> int:
        return max(d.rank for d in self.deltas)

    def command_line(self) -> str:
        return shlex.join(self.command)


def vllm_rank(rank: int) -> int:
    """The smallest value of vLLM's `--max-lora-rank` that holds `rank`."""
    for r in VLLM_RANKS:
        if r >= rank:
            return r
    raise UnsupportedError(f"rank {rank} exceeds vLLM's largest --max-lora-rank {VLLM_RANKS[-1]}; export with a "
                           f"smaller --rank")


def _lora_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers vLLM can give a LoRA: every nn.Linear except the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def convert(model: nn.Module, source: str | Path, rank: int | None) -> tuple[dict[str, tuple[Tensor, Tensor]], Exported]:
    """The delta in `source` as plain LoRA factors per module (A [r, in], B [out, r] with the scale folded in, one
    rank throughout) and its report. Raises UnsupportedError for what vLLM cannot serve and cannot be converted, and
    for a delta that needs converting when `rank` is None."""
    source = Path(source)
    delta = Delta.read(source)
    check_fits(model, delta)
    delta = delta.for_model(model)
    kind, where = delta.config.kind, repr(str(source))
    linear = _lora_modules(model)
    lows: dict[str, LowRankDelta] = {}
    report = Exported(source.name, source, source, 0)
    for mpath in delta.state:
        cls = delta.config.for_module(mpath).piece_class()
        if not cls.mergeable:
            raise UnsupportedError(f"delta {where} ({kind}) at {mpath!r} is not a weight update (position "
                                   f"{cls.position!r}): it has no ΔW, so it cannot be converted to LoRA for vLLM")
        if mpath not in linear:
            what = delta.module_types.get(mpath) or type(dict(model.named_modules()).get(mpath)).__name__
            raise UnsupportedError(f"delta {where} ({kind}) adapts {mpath!r} ({what}); vLLM gives LoRA only to the "
                                   f"linear layers of the transformer blocks (not embeddings, norms or the output head)")
        exact = not (cls.needs_base or cls.needs_shape)
        dw, db = delta.update(mpath, model)
        if exact and isinstance(dw, LowRankDelta) and db is None:
            lows[mpath] = dw
            report.errors[mpath] = 0.0
            continue
        if rank is None:
            reason = "changes the bias" if db is not None else "is not plain low-rank factors independent of the base"
            raise UnsupportedError(f"delta {where} ({kind}) at {mpath!r} {reason}, which vLLM does not load; pass "
                                   f"--rank r to convert it to plain LoRA of rank r (the error is reported)")
        lows[mpath], report.errors[mpath] = truncate(dw, rank, db)
        report.converted.append(mpath)
        if db is not None:
            report.bias_dropped.append(mpath)
    if not lows:
        raise UnsupportedError(f"delta {where} ({kind}) adapts no module; there is nothing to export")
    report.rank = max(int(low.A.shape[0]) for low in lows.values())
    factors = {}
    for mpath, low in lows.items():
        dtype = low.A.dtype if low.A.dtype.is_floating_point else torch.float32
        a, b = pad_rank(low.A.to(dtype), (low.B * low.scale).to(dtype), report.rank)
        factors[mpath] = (a.contiguous(), b.contiguous())
    return factors, report


def write_lora(factors: dict[str, tuple[Tensor, Tensor]], path: Path, name: str, model: nn.Module) -> Path:
    """Plain LoRA factors as a PEFT adapter directory (through the PEFT format's writer)."""
    tensors = {p: LowRankDelta(a, b) for p, (a, b) in factors.items()}
    delta = Delta.from_tensors(name, tensors, module_types={p: "Linear" for p in tensors},
                               base={"model_class": type(model).__name__,
                                     "model_name": getattr(model.config, "_name_or_path", None),
                                     "weight_shapes": {}})
    return format_named("peft").write(delta, path)


def launch_command(model_dir: str, loras: dict[str, Path], max_rank: int, python: str = "python") -> list[str]:
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--enable-lora",
           "--max-lora-rank", str(vllm_rank(max_rank)), "--max-loras", str(len(loras)), "--lora-modules"]
    return cmd + [f"{name}={path}" for name, path in loras.items()]


def export_vllm(model: nn.Module, model_dir: str | Path, sources: list[str | Path], out: str | Path, *,
                rank: int | None = None, echo=None) -> Export:
    """Write each delta of `sources` as `<out>/<its directory name>/` (PEFT LoRA), then `<out>/lora-modules.json`
    and `<out>/vllm-command.txt`. Every delta is converted before anything is written: a refused one changes
    nothing."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"--rank must be a whole number ≥ 1, got {rank!r}")
    if not sources:
        raise ConfigError("name at least one delta directory to export")
    names = [Path(s).resolve().name for s in sources]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"deltas are named by their directory, and {dup} appears twice; rename one")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"-o {str(out)!r} is a file; pass a directory")
    targets = {n: out / n for n in names}
    for t in targets.values():
        check_output(t, sources)
    converted = [convert(model, s, rank) for s in sources]
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for (factors, report), name in zip(converted, names):
        report.name, report.path = name, write_lora(factors, targets[name], name, model).resolve()
        reports.append(report)
        if echo is not None:
            echo(report.describe())
    loras = {r.name: r.path for r in reports}
    command = launch_command(str(Path(model_dir).resolve()), loras, max(r.rank for r in reports))
    modules = [{"name": r.name, "path": str(r.path), "base_model_name": str(Path(model_dir).resolve())}
               for r in reports]
    atomic.write_files({out / MODULES_FILE: (json.dumps(modules, indent=2) + "\n").encode(),
                        out / COMMAND_FILE: (shlex.join(command) + "\n").encode()})
    return Export(reports, out.resolve(), str(model_dir), command)
