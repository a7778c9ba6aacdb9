"""The smallest deto training script: a few lines change from plain torch.

Run on one machine as a simulated cluster of 2 nodes x 2 ranks:

    torchrun --nproc-per-node 4 examples/minimal.py

On real machines, start it with torchrun on each node; ``deto.Topology.from_env()`` then reads
nodes x ranks-per-node from torchrun's environment.
"""

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import deto

torch.manual_seed(0)  # the same initial model on every rank
world = int(os.environ["WORLD_SIZE"])
nodes = 2 if world % 2 == 0 else 1
topo = deto.Topology(nodes=nodes, ranks_per_node=world // nodes, device="cpu")

model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 10))
model, opt = deto.prepare(
    model,
    topo,
    replicator=deto.DeMo(topk=16, chunk=32),
    optimizer=torch.optim.SGD,
    lr=1e-2,
    sign=True,
)

rank = dist.get_rank()
target = torch.randn(32, 10, generator=torch.Generator().manual_seed(1))
for step in range(50):
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(step * world + rank))
    loss = F.mse_loss(model(x), x @ target)
    loss.backward()
    opt.step()
    opt.zero_grad()
    if rank == 0 and step % 10 == 9:
        stats = opt.stats()
        print(
            f"step {step + 1}: loss {loss.item():.4f}, "
            f"{stats.node_bytes_sent} bytes sent by node 0"
        )
dist.destroy_process_group()
