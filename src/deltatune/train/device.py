"""Where a training run computes and in which precision: `device` (auto, cpu, cuda, cuda:N) and `precision`
(fp32, bf16, fp16) of a TrainConfig, resolved once per run.

Mixed precision is autocast: parameters (the frozen base and the delta) keep their dtype, the optimizer updates
fp32 values, and matrix products run in bf16 or fp16 inside `Precision.autocast()`. fp16 adds a gradient scaler
(`torch.amp.GradScaler`: the loss is scaled before backward, gradients unscaled before the step, steps with
inf/NaN gradients skipped); bf16 has fp32's exponent range and needs none.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Any

import torch

from ..core.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_device(spec: Any) -> None:
    """Refuse a device spelling other than auto, cpu, cuda or cuda:N (before anything is loaded)."""
    if not isinstance(spec, str) or not DEVICE_PATTERN.fullmatch(spec):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")


def check_precision(spec: Any) -> None:
    if spec not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {spec!r}")


#: environment variable that says what `device: auto` means on this machine (e.g. cpu), as a device spelling
AUTO_ENV = "DELTATUNE_DEVICE"


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """The torch device of a run: `auto` is this process's GPU (cuda:LOCAL_RANK) when CUDA is available with a GPU
    for each process on this machine (torchrun's LOCAL_WORLD_SIZE), else the CPU — unless the environment variable
    DELTATUNE_DEVICE names a device for it; `cuda` is cuda:LOCAL_RANK (one GPU per process under torchrun);
    `cuda:N` is GPU N."""
    check_device(spec)
    if spec == "auto" and os.environ.get(AUTO_ENV, "auto") != "auto":
        spec = os.environ[AUTO_ENV]
        if not isinstance(spec, str) or not DEVICE_PATTERN.fullmatch(spec):
            raise ConfigError(f"{AUTO_ENV} must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if spec == "auto":
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        spec = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= per_machine else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r}: CUDA is not available here (torch {torch.__version__}, "
                          f"{'built without CUDA' if torch.version.cuda is None else 'no GPU visible'}); "
                          f"use device cpu or auto")
    index = int(spec.split(":")[1]) if ":" in spec else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device {spec!r}{' (LOCAL_RANK ' + str(local_rank) + ')' if ':' not in spec else ''}: "
                          f"only {count} GPU(s) visible (cuda:0 .. cuda:{count - 1})")
    return torch.device("cuda", index)


class Precision:
    """Autocast and gradient scaling for one precision on one device."""

    def __init__(self, name: str, device: torch.device) -> None:
        check_precision(name)
        self.name, self.device = name, device
        self.dtype = _DTYPES[name]
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; "
                              f"use fp16 or fp32")
        if self.dtype is not None and not torch.amp.autocast_mode.is_autocast_available(device.type):
            raise ConfigError(f"precision {name}: torch {torch.__version__} has no autocast on {device.type}; "
                              f"use fp32")
        if self.dtype is torch.float16 and device.type == "cpu":
            _check_cpu_fp16()
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's context: autocast to bf16/fp16, nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """The optimizer step (unscaled and skipped on inf/NaN gradients under fp16); False when it was skipped."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= before  # the scale shrinks exactly when the step was skipped

    def state(self) -> dict[str, Any] | None:
        """The scaler's state for a checkpoint (JSON: floats and ints), None without a scaler."""
        return None if self.scaler is None else {k: (float(v) if torch.is_tensor(v) else v)
                                                 for k, v in self.scaler.state_dict().items()}

    def load_state(self, state: dict[str, Any] | None) -> None:
        """Restore a checkpoint's scaler state; a checkpoint of another precision has none (or one this run ignores)."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(dict(state))


_CPU_FP16: bool | None = None


def _check_cpu_fp16() -> None:
    """fp16 autocast on the CPU exists only in recent torch builds: try a tiny product once and refuse clearly."""
    global _CPU_FP16
    if _CPU_FP16 is None:
        try:
            with torch.autocast("cpu", dtype=torch.float16):
                _CPU_FP16 = torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float16
        except (RuntimeError, TypeError):
            _CPU_FP16 = False
    if not _CPU_FP16:
        raise ConfigError(f"precision fp16: torch {torch.__version__} has no fp16 autocast on the CPU; use bf16 or "
                          f"fp32 on the CPU, or train on a GPU (device cuda)")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch on `device`: for a GPU through pinned (page-locked) host memory, copied asynchronously."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (the CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def cuda_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The RNG state of the run's GPU (dropout on it draws from this), for a checkpoint; empty on the CPU. Only
    this process's GPU: reading the others' would create a CUDA context on each of them."""
    if device.type != "cuda":
        return {}
    return {"rng.cuda": torch.cuda.get_rng_state(device)}


def set_cuda_rng_state(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore a checkpoint's GPU RNG state on the run's GPU; nothing on the CPU or from a CPU checkpoint."""
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"].cpu(), device)
