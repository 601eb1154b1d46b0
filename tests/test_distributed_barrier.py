"""Dist.barrier names the GPU (device_ids) only to an NCCL group: a gloo group used while training on a GPU gets a
plain barrier (device_ids would make torch place the barrier on that GPU for a backend that does not take it)."""
from __future__ import annotations

import torch
import torch.distributed as tdist

from deltatune.train.distributed import Dist


def test_gloo_barrier_gets_no_device_ids(monkeypatch):
    calls = []
    real = tdist.barrier

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        monkeypatch.setattr(tdist, "barrier", spy)
        Dist(0, 2, 0, torch.device("cuda", 0)).barrier()  # enabled (world 2), a CUDA device, the group is gloo
        Dist(0, 2, 0, torch.device("cpu")).barrier()
    finally:
        tdist.destroy_process_group()
    assert calls == [{}, {}]
