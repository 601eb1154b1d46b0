"""Multi-process training under torchrun / accelerate launch: DDP over NCCL when the run trains on GPUs, over gloo
on the CPU."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, device: torch.device | None = None) -> "Dist":
        """The process group torchrun describes in the environment (one process: none), started on first use with
        NCCL when `device` is a GPU (after making it this process's current GPU), gloo otherwise."""
        device = device or torch.device("cpu")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=device)
        if not tdist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            tdist.init_process_group(backend_for(device))
        elif tdist.get_backend() == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())  # NCCL collectives need GPU tensors
        return cls(tdist.get_rank(), tdist.get_world_size(), local_rank(), device)

    def mean(self, value: float) -> float:
        """The average of a scalar over all ranks."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return float(t) / self.world

    def barrier(self) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda" and tdist.get_backend() == "nccl":  # device_ids only mean something to NCCL
            tdist.barrier(device_ids=[self.device.index])
        else:
            tdist.barrier()


def backend_for(device: torch.device) -> str:
    """NCCL for GPUs, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"
