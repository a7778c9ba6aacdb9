"""Models, data and helpers shared by the distributed cases (run inside the rank pool)."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn

import deto


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(self.norm(x)))


class TinyNet(nn.Module):
    """Odd sizes on purpose: 7 output rows and a 1-element bias shard uneven under FSDP2."""

    def __init__(self, d_in: int = 12, width: int = 20, d_out: int = 7, depth: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.out = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h)


def make_model(seed: int = 0, **kw: int) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kw)


def batch(step: int, rank: int, n: int = 8, d_in: int = 12, d_out: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randn(n, d_out, generator=g)
    return x, y


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, *, start: int = 0) -> list[float]:
    rank = dist.get_rank()
    losses = []
    for s in range(start, start + steps):
        x, y = batch(s, rank)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded parameters (a collective over the shard mesh)."""
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def shard_digest(model: nn.Module) -> str:
    """Hash of this rank's local shards: equal across nodes iff replicas are bitwise equal."""
    h = hashlib.sha256()
    for _, p in sorted(model.named_parameters()):
        h.update(deto.replicators.base.local_tensor(p).detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def topo(nodes: int = 2, per_node: int = 2) -> deto.Topology:
    return deto.Topology(nodes=nodes, ranks_per_node=per_node, device="cpu")
