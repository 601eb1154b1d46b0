"""Checkpoints without pickles: delta (native format), optimizer and scheduler state, RNG state, progress.

Tensors go to safetensors, everything else to JSON; the directory is written under a temporary name and
renamed into place, so a crash never leaves a half checkpoint that `resume` would pick up.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.errors import CorruptFileError
from ..io.atomic import new_staging, publish_dir
from ..io.files import save as save_delta
from .device import cuda_rng_state, model_device, set_cuda_rng_state

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"


def _split_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optimizer.{idx}.{key}"] = val.contiguous()
            else:
                scalars[f"{idx}.{key}"] = val
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = t
    for key, val in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = val
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(path: Path, model: nn.Module, name: str, opt: torch.optim.Optimizer, sched: Any,
                    progress: dict[str, Any], scaler: dict[str, Any] | None = None) -> Path:
    """Write a resumable checkpoint directory, replaced as a whole (io/atomic.py): a kill at any point leaves the
    previous checkpoint or the new one, never a mix, and the next save removes what an interrupted one left.
    `scaler` is the fp16 gradient scaler's state (JSON values); the run's GPU RNG state is saved when it trains on one."""
    stage = new_staging(path)
    try:
        save_delta(model, stage / "delta", name=name)
        tensors, opt_meta = _split_optimizer(opt)
        tensors["rng.torch"] = torch.get_rng_state()
        tensors.update(cuda_rng_state(model_device(model)))
        save_file(tensors, str(stage / STATE_TENSORS))  # tensors on a GPU are copied to the host here
        meta = {"optimizer": opt_meta, "scheduler": sched.state_dict(), "progress": progress,
                "python_rng": jsonable(random.getstate()), "grad_scaler": scaler}
        (stage / STATE_JSON).write_text(json.dumps(meta))
        for file in (stage / STATE_TENSORS, stage / STATE_JSON):
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    publish_dir(stage, path)
    return path


def load_checkpoint(path: Path, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG state; returns the saved progress dict, with the fp16 gradient scaler's
    state (or None) under "grad_scaler". The delta is loaded by the caller.

    The tensors are read onto the CPU whatever device wrote them; `Optimizer.load_state_dict` moves each state
    tensor to its parameter's device (and dtype), so a checkpoint written on a GPU resumes on the CPU and back."""
    try:
        meta = json.loads((path / STATE_JSON).read_text())
        tensors = load_file(str(path / STATE_TENSORS), device="cpu")
    except Exception as e:
        raise CorruptFileError(f"checkpoint {str(path)!r} is unreadable ({e}); delete it to start over") from None
    opt.load_state_dict(_join_optimizer(tensors, meta["optimizer"]))
    sched.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    params = [p for g in opt.param_groups for p in g["params"]]
    if params:
        set_cuda_rng_state(tensors, params[0].device)
    random.setstate(untuple(meta["python_rng"]))
    return {**meta["progress"], "grad_scaler": meta.get("grad_scaler")}


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def jsonable(x):
    return [jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def untuple(x):
    return tuple(untuple(v) for v in x) if isinstance(x, list) else x
