"""What the integrations need beyond deto's public API: recognising a sharded model, finding
deto's optimizer inside a framework's optimizer wrappers, and checking that a framework's
process world is the Topology's."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.fsdp import FSDPModule

from deto.optim import DecoupledOptimizer
from deto.topology import Topology


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(m, FSDPModule) for m in model.modules())


def find_decoupled(optimizer: Any) -> DecoupledOptimizer:
    """The :class:`DecoupledOptimizer` inside a framework's optimizer wrapper(s)."""
    seen = optimizer
    for _ in range(4):  # AcceleratedOptimizer.optimizer, LightningOptimizer._optimizer, ...
        if isinstance(seen, DecoupledOptimizer):
            return seen
        seen = getattr(seen, "optimizer", None) or getattr(seen, "_optimizer", None)
    raise TypeError(f"Expected a deto.DecoupledOptimizer (or a wrapper of one), got {optimizer!r}")


def check_world(
    framework: str, world_size: int, rank: int, device_type: str, topology: Topology, fix: str
) -> None:
    """``ValueError`` (one line, ending in ``fix``) unless the framework's process world is the
    topology's: same size, same rank, the same device type. A framework that sees another world
    hands every rank the wrong share of the data (often all of it), with no error of its own."""
    seen = (world_size, rank, device_type)
    wanted = (topology.world_size, topology.rank, topology.device_type)
    if seen != wanted:
        raise ValueError(
            f"{framework} sees {seen[0]} process(es), this one rank {seen[1]} on {seen[2]}, but "
            f"the Topology has {topology.nodes} node(s) x {topology.ranks_per_node} rank(s), "
            f"this one rank {wanted[1]} on {wanted[2]}: {fix}"
        )
