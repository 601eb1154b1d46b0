"""Poly and MHR: an inventory of LoRA "skills" per module, mixed per task by learned routing.

Poly (Ponti et al. 2023, "Combining Parameter-efficient Modules for Task-level Generalisation") keeps n_skills
LoRA pairs per module and per task a routing logit per skill; example b with task t gets

    w = σ(Z_t) / Σ σ(Z_t)          (training: a relaxed-Bernoulli sample instead of σ, as in the paper)
    A_b = Σ_s w_s A_s,  B_b = Σ_s w_s B_s,  y_b += x_b A_b B_b / r

MHR (Caccia et al. 2023, "Multi-Head Adapter Routing for Cross-Task Generalization") splits the input dims of A
and the output dims of B into n_splits heads, each routed on its own (Z_t has n_splits × n_skills logits).
Task ids come per call: `model(input_ids, task_ids=t)` or `with dt.batch(task_ids=t): ...` (see batch.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from ..core.calls import batch_value
from ..core.config import DeltaConfig, register
from ..core.schema import PositiveInt
from ..core.errors import ConfigError, TargetError
from ..core.piece import Piece, master_dtype

EPS = 1e-12


@register("poly")
@dataclass(frozen=True)
class Poly(DeltaConfig):
    """Per module n_skills LoRA pairs of rank r, mixed per task (n_tasks routing rows); n_splits > 1 is MHR."""

    r: PositiveInt = 8
    n_skills: PositiveInt = 4
    n_tasks: PositiveInt = 1
    n_splits: PositiveInt = 1

    def piece_class(self, module: Any = None) -> type[Piece]:
        return PolyPiece


class PolyPiece(Piece):
    supported: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")
    routable: ClassVar[bool] = False  # it routes itself, by task id
    keywords: ClassVar[tuple[str, ...]] = ("task_ids",)

    def __init__(self, base: nn.Module, path: str, cfg: Poly) -> None:
        super().__init__(base, path, cfg)
        d_out, d_in = self.layout.shape(base)
        q, s, r = cfg.n_splits, cfg.n_skills, cfg.r
        if d_in % q or d_out % q:
            raise TargetError(f"Poly/MHR n_splits={q} must divide in={d_in} and out={d_out} of module {path!r}")
        dtype = master_dtype(self.layout.weight(base).dtype)
        device = base.weight.device
        a = torch.empty(q, s, d_in // q, r)
        for i in range(q):
            for j in range(s):  # each skill's A like a fresh Linear's weight (Kaiming uniform, fan-in)
                bound = 1.0 / math.sqrt(d_in // q)
                a[i, j] = torch.empty(d_in // q, r).uniform_(-bound, bound)
        self.poly_A = nn.Parameter(a.to(device=device, dtype=dtype))                 # [splits, skills, in/q, r]
        self.poly_B = nn.Parameter(torch.zeros(q, s, r, d_out // q, device=device, dtype=dtype))
        self.logits = nn.Parameter(torch.empty(cfg.n_tasks, q * s, device=device, dtype=dtype).uniform_(-1e-3, 1e-3))
        self.d_in, self.d_out = d_in, d_out

    def mixing(self, task_ids: Tensor) -> Tensor:
        """[batch, splits, skills] weights of each example's skills."""
        cfg = self.cfg
        if task_ids.numel() and (int(task_ids.max()) >= cfg.n_tasks or int(task_ids.min()) < 0):
            raise ConfigError(f"task ids must be in [0, {cfg.n_tasks}) for Poly delta at {self.path!r}, got "
                              f"{task_ids.tolist()}")
        z = self.logits[task_ids.to(self.logits.device)].view(-1, cfg.n_splits, cfg.n_skills)
        z = RelaxedBernoulli(temperature=1.0, logits=z).rsample() if self.training else torch.sigmoid(z)
        return z / (z.sum(-1, keepdim=True) + EPS)

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        task_ids = batch_value("task_ids")
        if task_ids is None:
            raise ConfigError(f"Poly delta at {self.path!r} needs task ids: call model(..., task_ids=LongTensor[batch]) "
                              f"or run inside `with dt.batch(task_ids=...)`")
        task_ids = torch.as_tensor(task_ids).reshape(-1)
        batch = x.shape[0]
        if task_ids.numel() and batch != task_ids.numel() and batch % task_ids.numel() == 0:
            task_ids = task_ids.repeat_interleave(batch // task_ids.numel())  # generate's beams / return sequences
        if task_ids.numel() != batch:
            raise ConfigError(f"Poly delta at {self.path!r}: {task_ids.numel()} task ids for a batch of {batch}")
        w = self.mixing(task_ids)                                            # [b, q, s]
        a = torch.einsum("bqs,qsdr->bqdr", w, self.poly_A).reshape(batch, self.d_in, self.cfg.r)
        b = torch.einsum("bqs,qsrd->bqrd", w, self.poly_B).transpose(1, 2).reshape(batch, self.cfg.r, self.d_out)
        x3 = x.reshape(batch, -1, x.shape[-1]).to(a.dtype)
        y = torch.bmm(torch.bmm(x3, a), b) / self.cfg.r
        return acc + y.view(acc.shape).to(acc.dtype)
