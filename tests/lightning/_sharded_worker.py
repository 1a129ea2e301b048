"""One process of the two-process tests of :mod:`adarank.lightning.sharded` (run by the test).

Usage: ``python _sharded_worker.py OUT_DIR`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` set. Writes ``OUT_DIR/rank<R>.pt`` with what the test compares.

A tiny model (an embedding, two adapted linear layers, a trainable head) is built identically in
every process. Before sharding, each process computes the reference on the *global* batch in one
piece (the single-process gradient); then the frozen base is sharded over the two processes, each
runs its half of the batch, and the replicated gradients are averaged.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from adarank.lightning.sharded import (
    average_gradients,
    gathered,
    replicated_parameters,
    shard_frozen_base,
    sharded_numel,
)
from adarank.modules import adapter_layers, add_adapters


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)  # frozen, outside any adapter: belongs to the root unit
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)  # modules_to_save: trainable, replicated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(self.embed(x))))))


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        n: None if p.grad is None else p.grad.detach().clone()
        for n, p in replicated_parameters(model).items()
    }


def main(out_dir: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
    torch.manual_seed(0)
    model = Tiny()
    add_adapters(model, ["fc1", "fc2"], init_rank=3, modules_to_save=["head"], seed=0)
    with torch.no_grad():  # λ starts at 0: make the gradients of P and Q non-zero too
        for layer in adapter_layers(model).values():
            layer.lora_lambda.uniform_(0.5, 1.0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    reference = copy.deepcopy(model)
    loss_fn(reference, x, y).backward()  # the single-process gradient of the global batch
    out: dict = {"ref_grads": grads(reference)}

    report = shard_frozen_base(model, mesh)
    out["report"] = vars(report)
    out["report_again"] = vars(shard_frozen_base(model, mesh))  # already sharded: unchanged
    out["sharded_numel"] = sharded_numel(model)
    out["frozen"] = sorted(n for n, p in reference.named_parameters() if not p.requires_grad)
    out["trainable"] = sorted(n for n, p in reference.named_parameters() if p.requires_grad)
    half = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    loss_fn(model, x[half], y[half]).backward()
    out["local_grads"] = grads(model)
    average_gradients(list(replicated_parameters(model).values()))
    out["avg_grads"] = grads(model)

    # a prune and a growth after sharding replace adapter parameters by plain tensors
    for mod in (model, reference):
        layer = adapter_layers(mod)["fc1"]
        layer.prune([1])
        gen = torch.Generator().manual_seed(2)
        layer.grow(torch.randn(16, 2, generator=gen), torch.randn(2, 8, generator=gen))
        mod.zero_grad(set_to_none=True)
    out["ranks"] = {n: layer.rank for n, layer in adapter_layers(model).items()}
    loss_fn(model, x[half], y[half]).backward()
    average_gradients(list(replicated_parameters(model).values()))
    out["resized_grads"] = grads(model)
    loss_fn(reference, x, y).backward()
    out["resized_ref_grads"] = grads(reference)
    with torch.no_grad():
        out["outputs"] = (model(x), reference(x))
    with gathered(model):
        out["gathered_weight"] = adapter_layers(model)["fc2"].base_layer.weight.detach().clone()
        out["gathered_type"] = type(adapter_layers(model)["fc2"].base_layer.weight).__name__
    out["ref_weight"] = adapter_layers(reference)["fc2"].base_layer.weight.detach().clone()
    out["after_type"] = type(adapter_layers(model)["fc2"].base_layer.weight).__name__
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
