"""Multi-process training under torchrun / accelerate launch: DDP over gloo (the loop trains on the CPU)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not tdist.is_initialized():
            tdist.init_process_group("gloo")  # the training loop runs on the CPU; gloo works everywhere
        return cls(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def mean(self, value: float) -> float:
        """The average of a scalar over all ranks."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        tdist.all_reduce(t)
        return float(t) / self.world

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()
