"""dt.summary: parameters per delta and the base model's parameter count."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.errors import DeltaNameError
from .weights import slots
from .state import state_of


@dataclass(frozen=True)
class SummaryRow:
    name: str
    kind: str
    modules: int
    params: int
    trainable: int
    active: bool
    merged: bool


@dataclass(frozen=True)
class Summary:
    rows: tuple[SummaryRow, ...]
    base_params: int

    def __str__(self) -> str:
        name_w = max([16, *(len(r.name) + 2 for r in self.rows)])
        kind_w = max([8, *(len(r.kind) + 2 for r in self.rows)])
        head = f"{'delta':<{name_w}}{'kind':<{kind_w}}{'modules':>8}{'params':>12}{'trainable':>12}{'% of base':>10}  state"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            state = ("active" if r.active else "inactive") + (", merged" if r.merged else "")
            pct = 100.0 * r.params / max(self.base_params, 1)
            lines.append(f"{r.name:<{name_w}}{r.kind:<{kind_w}}{r.modules:>8}{r.params:>12,}{r.trainable:>12,}"
                         f"{pct:>9.3f}%  {state}")
        lines.append(f"base model parameters: {self.base_params:,}")
        return "\n".join(lines)

    def __getitem__(self, name: str) -> SummaryRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise DeltaNameError(f"no delta {name!r} in summary; have {[r.name for r in self.rows]}")


def summary(model: nn.Module) -> Summary:
    """Parameters per delta (total and trainable) and the base model's parameter count."""
    st = state_of(model)
    piece_ids: set[int] = set()
    rows = []
    for name, rec in (st.deltas.items() if st else []):
        params = trainable = 0
        for _, slot in slots(model, name):
            for p in slot[name].parameters():
                piece_ids.add(id(p))
                params += p.numel()
                trainable += p.numel() if p.requires_grad else 0
        rows.append(SummaryRow(name, rec.config.kind, len(rec.paths), params, trainable, name in st.active, name in st.merged))
    base = sum(p.numel() for p in model.parameters() if id(p) not in piece_ids)
    return Summary(tuple(rows), base)
