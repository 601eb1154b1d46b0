"""Run under torchrun (2 processes, gloo): a model with a delta attached, wrapped with FSDP2 `fully_shard`,
gives the loss and gradients of the unwrapped model, trains, and saves a delta equal to the unwrapped run's."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
import deltatune as dt  # noqa: E402
from train_fixtures import tiny_llama  # noqa: E402


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = tiny_llama()
    dt.attach(model, dt.LoRA(r=4, dropout=0.0), "a")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    ref = copy.deepcopy(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 30, (4, 10))  # same batch on both ranks: FSDP's averaged grads equal the single run's
    for _ in range(3):
        loss, ref_loss = model(ids, labels=ids).loss, ref(ids, labels=ids).loss
        loss.backward()
        ref_loss.backward()
        assert abs(float(loss) - float(ref_loss)) < 1e-5, (float(loss), float(ref_loss))
        grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        for n, p in model.named_parameters():
            if p.grad is not None:
                assert torch.allclose(p.grad.full_tensor(), grads[n], atol=1e-5), n
        opt.step(), ref_opt.step(), opt.zero_grad(), ref_opt.zero_grad()
    delta = dt.Delta.from_model(model, "a")  # gathers the shards
    if rank == 0:
        ref_delta = dt.Delta.from_model(ref, "a")
        for path, state in ref_delta.state.items():
            for k, t in state.items():
                assert torch.allclose(delta.state[path][k], t, atol=1e-5), (path, k)
        delta.write(out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
